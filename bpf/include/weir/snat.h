/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Source NAT on weir_nat: a port from a use's range for a new flow, the
 * two entries of the flow written together or not at all, and the lookups
 * both directions need. maps.h describes the layout.
 */
#pragma once

#include "maps.h"

/* Candidate ports tried for a new flow before it is refused: the client's
 * own when it is in the range, else a random one, then the ports after it
 * in order (a range fills unevenly: a random probe keeps hitting the full
 * part while the next ports are often free). */
#define WEIR_NAT_TRIES 64

/* A range of ports, in host order, inclusive. */
struct weir_nat_range {
	__u16 min;
	__u16 max;
};

WEIR_INLINE void weir_nat_key_set(struct weir_nat_key *k, __be32 saddr, __be32 daddr, __be16 sport, __be16 dport,
				  __u8 proto, __u8 dir)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr = saddr;
	k->daddr = daddr;
	k->sport = sport;
	k->dport = dport;
	k->proto = proto;
	k->dir = dir;
}

WEIR_INLINE void weir_nat_count(__u32 allocated, __u32 retries, __u32 exhausted)
{
	__u32 zero = 0;
	struct weir_nat_counters *st = bpf_map_lookup_elem(&weir_nat_stats, &zero);

	if (!st)
		return;
	/* Per-CPU value: no atomics needed. */
	st->allocated += allocated;
	st->retries += retries;
	st->exhausted += exhausted;
}

/* A NAT flow is not written at once with its conntrack entry: younger
 * than this, it is never taken for an orphan. */
#define WEIR_NAT_MIN_AGE 2

/*
 * Frees the port the IN entry at in holds when its flow is over: the
 * flow's conntrack entry (keyed by the reverse of its OUT tuple) is gone
 * or expired. The collector would delete it later; a range that is full
 * gets its port back now. Returns 1 when the port was freed.
 */
WEIR_INLINE int weir_snat_reclaim(const struct weir_nat_key *in, __u32 now)
{
	struct weir_nat_entry *held = bpf_map_lookup_elem(&weir_nat, in), *o;
	struct weir_nat_key out;
	struct weir_ct_entry *ct;
	struct weir_ct_key ck = {};

	if (!held || now - held->created < WEIR_NAT_MIN_AGE)
		return 0;
	ck.saddr = in->saddr;
	ck.daddr = held->addr;
	ck.sport = in->sport;
	ck.dport = held->port;
	ck.proto = in->proto;
	ct = bpf_map_lookup_elem(&weir_ct, &ck);
	if (ct && ct->lifetime > now)
		return 0;
	weir_nat_key_set(&out, held->addr, in->saddr, held->port, in->sport, in->proto, WEIR_NAT_OUT);
	o = bpf_map_lookup_elem(&weir_nat, &out);
	/* The OUT half goes only while it still points here. */
	if (o && o->addr == in->daddr && o->port == in->dport)
		bpf_map_delete_elem(&weir_nat, &out);
	bpf_map_delete_elem(&weir_nat, in);
	return 1;
}

/* The search for a free port, shared with its bpf_loop callback: the
 * verifier checks the callback once instead of every try. */
struct weir_snat_search {
	struct weir_nat_key in;        /* the IN key; dport is the candidate */
	struct weir_nat_entry in_val;
	__u32 now;
	__u32 retries;
	__u16 port; /* the candidate, host order */
	__u16 min;
	__u16 max;
	__u16 span;
	int result; /* 0: searching, 1: claimed, -1: a map error */
};

/* One try: the client's port (or a random one) first, a random one
 * second, then the ports after it; a range no larger than the tries is
 * walked from the first candidate, so every port of it is tried. Returns
 * 1 to stop. */
static __attribute__((noinline)) long weir_snat_try(__u32 i, void *data)
{
	struct weir_snat_search *s = data;
	long err;

	if (s->span == 0)
		return 1;
	if (i == 1 && s->span > WEIR_NAT_TRIES)
		s->port = s->min + bpf_get_prandom_u32() % s->span;
	else if (i > 0)
		s->port = s->port >= s->max ? s->min : s->port + 1;
	s->in.dport = bpf_htons(s->port);
	/* The IN entry claims the port: atomically, so two flows never get
	 * one tuple on the wire. */
	err = bpf_map_update_elem(&weir_nat, &s->in, &s->in_val, BPF_NOEXIST);
	if (err == -17 /* EEXIST */ && weir_snat_reclaim(&s->in, s->now))
		err = bpf_map_update_elem(&weir_nat, &s->in, &s->in_val, BPF_NOEXIST);
	if (err == -17 /* EEXIST */) {
		s->retries++;
		return 0;
	}
	s->result = err ? -1 : 1;
	return 1;
}

/*
 * Gives the flow whose packets reach the translation as out (saddr:sport
 * -> daddr:dport, dir OUT) the source to_addr and a port of range r.
 * Returns the OUT entry (in the map) or NULL with *reason set: a flow that
 * gets no port is refused whole, and entries of other flows are never
 * touched.
 */
WEIR_INLINE struct weir_nat_entry *weir_snat_create(const struct weir_nat_key *out, __be32 to_addr,
						     struct weir_nat_range r, __u8 owner, __u32 now, __u32 *reason)
{
	struct weir_nat_entry out_val = {.addr = to_addr, .owner = owner, .created = now};
	struct weir_snat_search s = {
		.in_val = {.addr = out->saddr, .port = out->sport, .owner = owner, .created = now},
		.now = now,
		.min = r.min,
		.max = r.max,
	};
	__u32 tries;
	long err;

	if (r.min == 0 || r.max < r.min) {
		*reason = WEIR_DROP_NAT_EXHAUSTED;
		return NULL;
	}
	s.span = r.max - r.min + 1;
	weir_nat_key_set(&s.in, out->daddr, to_addr, out->dport, 0, out->proto, WEIR_NAT_IN);
	/* Keep the client's port when the range holds it: what the server
	 * sees stays closer to what the client sent. */
	s.port = bpf_ntohs(out->sport);
	if (s.port < r.min || s.port > r.max)
		s.port = r.min + bpf_get_prandom_u32() % s.span;
	tries = s.span < WEIR_NAT_TRIES ? s.span : WEIR_NAT_TRIES;
	bpf_loop(tries, weir_snat_try, &s, 0);
	if (s.result == 0) {
		weir_nat_count(0, s.retries, 1);
		*reason = WEIR_DROP_NAT_EXHAUSTED;
		return NULL;
	}
	if (s.result < 0) {
		weir_nat_count(0, s.retries, 0);
		*reason = WEIR_DROP_CT_CREATE;
		return NULL;
	}
	out_val.port = s.in.dport;
	err = bpf_map_update_elem(&weir_nat, out, &out_val, BPF_NOEXIST);
	if (err) {
		struct weir_nat_entry *won;

		bpf_map_delete_elem(&weir_nat, &s.in);
		/* Another CPU translated this very flow meanwhile: its
		 * entries stand. */
		won = err == -17 ? bpf_map_lookup_elem(&weir_nat, out) : NULL;
		if (!won)
			*reason = WEIR_DROP_CT_CREATE;
		weir_nat_count(0, s.retries, 0);
		return won;
	}
	weir_nat_count(1, s.retries, 0);
	return bpf_map_lookup_elem(&weir_nat, out);
}

/* Deletes both entries of the flow whose OUT key is out and entry e. */
WEIR_INLINE void weir_snat_delete(const struct weir_nat_key *out, const struct weir_nat_entry *e)
{
	struct weir_nat_entry *back;
	struct weir_nat_key in;

	weir_nat_key_set(&in, out->daddr, e->addr, out->dport, e->port, out->proto, WEIR_NAT_IN);
	back = bpf_map_lookup_elem(&weir_nat, &in);
	/* The port may belong to another flow by now: its entry stays. */
	if (back && back->addr == out->saddr && back->port == out->sport)
		bpf_map_delete_elem(&weir_nat, &in);
	bpf_map_delete_elem(&weir_nat, out);
}

/* Whether the IN entry of the flow whose OUT key is out and entry o
 * exists and points back to it: the flow owns its port. A missing IN
 * entry (the LRU took it) is written again when the port is still free;
 * returns 0 when the port went to another flow. */
WEIR_INLINE int weir_snat_owns(const struct weir_nat_key *out, const struct weir_nat_entry *o, __u32 now)
{
	struct weir_nat_entry back = {.addr = out->saddr, .port = out->sport, .owner = o->owner, .created = now};
	struct weir_nat_entry *in;
	struct weir_nat_key ik;

	weir_nat_key_set(&ik, out->daddr, o->addr, out->dport, o->port, out->proto, WEIR_NAT_IN);
	in = bpf_map_lookup_elem(&weir_nat, &ik);
	if (!in && bpf_map_update_elem(&weir_nat, &ik, &back, BPF_NOEXIST) == 0)
		return 1;
	/* Written meanwhile by another CPU repairing the same flow, or
	 * taken by another flow. */
	if (!in)
		in = bpf_map_lookup_elem(&weir_nat, &ik);
	return in && in->addr == out->saddr && in->port == out->sport;
}

/* The OUT entry of the flow saddr:sport -> daddr:dport, or NULL. */
WEIR_INLINE struct weir_nat_entry *weir_snat_out(struct weir_nat_key *k, __be32 saddr, __be32 daddr, __be16 sport,
						  __be16 dport, __u8 proto)
{
	weir_nat_key_set(k, saddr, daddr, sport, dport, proto, WEIR_NAT_OUT);
	return bpf_map_lookup_elem(&weir_nat, k);
}

/* The IN entry of a reply saddr:sport -> daddr:dport on the wire, or NULL. */
WEIR_INLINE struct weir_nat_entry *weir_snat_in(__be32 saddr, __be32 daddr, __be16 sport, __be16 dport, __u8 proto)
{
	struct weir_nat_key k;

	weir_nat_key_set(&k, saddr, daddr, sport, dport, proto, WEIR_NAT_IN);
	return bpf_map_lookup_elem(&weir_nat, &k);
}
