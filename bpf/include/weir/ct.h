/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Connection tracking (the weir_ct LRU map): flows as pairs of entries,
 * their TCP state, lifetimes, and creation that keeps every tuple on the
 * wire owned by one flow. maps.h describes the layout.
 */
#pragma once

#include "nat.h"

/*
 * Lifetimes in seconds. A flow whose handshake has not completed lives
 * briefly; an established one long. One FIN (half-closed) keeps the flow
 * while packets flow. Both FINs start a time-wait as long as the kernel's
 * conntrack keeps it (longer than a Linux server's 60 s TIME_WAIT, so a
 * client port reused for another frontend or directly is moved to another
 * port rather than meeting the server's old socket); a reset leaves only
 * stragglers to translate. Closed flows are not extended by later packets:
 * they expire on their own timers.
 */
#define WEIR_CT_LIFETIME_SYN 60
#define WEIR_CT_LIFETIME_TCP 21600
#define WEIR_CT_LIFETIME_HALF_CLOSED 120
#define WEIR_CT_LIFETIME_TIME_WAIT 120
#define WEIR_CT_LIFETIME_RST 10
#define WEIR_CT_LIFETIME_NONTCP 60
/* A packet other than RST from the side that did not send a reset, this
 * long after it, shows the reset did not close the connection. */
#define WEIR_CT_RST_GRACE 2

/* Client ports tried when a new flow's tuple on the wire is taken. */
#define WEIR_CT_REMAP_TRIES 32
#define WEIR_CT_REMAP_MIN 1024


#define WEIR_CT_F_FINS (WEIR_CT_F_FIN_ORIG | WEIR_CT_F_FIN_REPLY)

/* Fills a conntrack key for the tuple saddr:sport -> daddr:dport. */
WEIR_INLINE void weir_ct_key_set(struct weir_ct_key *k, __be32 saddr, __be32 daddr, __be16 sport, __be16 dport,
				 __u8 proto)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr = saddr;
	k->daddr = daddr;
	k->sport = sport;
	k->dport = dport;
	k->proto = proto;
}

/* The key of the other entry of e's flow: the reverse of the tuple e's
 * packets leave with. */
WEIR_INLINE void weir_ct_twin_key(struct weir_ct_key *twin, const struct weir_ct_entry *e, __u8 proto)
{
	weir_ct_key_set(twin, e->nat_daddr, e->nat_saddr, e->nat_dport, e->nat_sport, proto);
}

/* Whether other is the twin of the entry keyed by key. */
WEIR_INLINE int weir_ct_is_twin(const struct weir_ct_entry *other, const struct weir_ct_key *key)
{
	return other->nat_saddr == key->daddr && other->nat_daddr == key->saddr && other->nat_sport == key->dport &&
	       other->nat_dport == key->sport;
}

WEIR_INLINE int weir_ct_closed(__u16 flags)
{
	return (flags & WEIR_CT_F_RST) || (flags & WEIR_CT_F_FINS) == WEIR_CT_F_FINS;
}

WEIR_INLINE __u32 weir_ct_timeout(__u8 proto, __u16 flags)
{
	if (proto != IPPROTO_TCP)
		return WEIR_CT_LIFETIME_NONTCP;
	if (flags & WEIR_CT_F_RST)
		return WEIR_CT_LIFETIME_RST;
	if ((flags & WEIR_CT_F_FINS) == WEIR_CT_F_FINS)
		return WEIR_CT_LIFETIME_TIME_WAIT;
	if (flags & WEIR_CT_F_FINS)
		return WEIR_CT_LIFETIME_HALF_CLOSED;
	if (flags & WEIR_CT_F_ESTABLISHED)
		return WEIR_CT_LIFETIME_TCP;
	return WEIR_CT_LIFETIME_SYN;
}

WEIR_INLINE int weir_ct_expired(const struct weir_ct_entry *e, __u32 now)
{
	return e->lifetime <= now;
}

WEIR_INLINE int weir_tcp_bare_syn(__u8 tcp)
{
	return (tcp & (WEIR_TCP_SYN | WEIR_TCP_ACK | WEIR_TCP_RST)) == WEIR_TCP_SYN;
}

/* A bare SYN from the initiator on a flow past its handshake (established
 * or closing) is a new connection on the same tuple: it gets a fresh entry
 * and a fresh backend choice. Before the handshake it is a retransmission. */
WEIR_INLINE int weir_ct_reopens(const struct weir_ct_entry *e, __u8 proto, __u8 tcp)
{
	return proto == IPPROTO_TCP && e->dir == WEIR_CT_ORIG && weir_tcp_bare_syn(tcp) &&
	       (e->flags & (WEIR_CT_F_ESTABLISHED | WEIR_CT_F_FINS | WEIR_CT_F_RST));
}

/*
 * The flow state after one packet in direction dir (enum weir_ct_dir) with
 * TCP flags tcp, on an entry whose state is flags and whose lifetime is
 * lifetime (for the reset grace).
 */
WEIR_INLINE __u16 weir_ct_next_flags(__u16 flags, __u8 proto, __u8 dir, __u8 tcp, __u32 now, __u32 lifetime)
{
	int reply = dir == WEIR_CT_REPLY;

	if (reply)
		flags |= WEIR_CT_F_SEEN_REPLY;
	if (proto != IPPROTO_TCP)
		return flags;
	if (tcp & WEIR_TCP_RST) {
		if (!(flags & WEIR_CT_F_RST)) {
			flags |= WEIR_CT_F_RST;
			if (reply)
				flags |= WEIR_CT_F_RST_REPLY;
			else
				flags &= ~WEIR_CT_F_RST_REPLY;
		}
		return flags;
	}
	/* Packets after a reset: the side that sent it keeps talking, or the
	 * other side still does once stragglers would have arrived. Either
	 * way the reset did not end the connection. */
	if ((flags & WEIR_CT_F_RST) && !(tcp & WEIR_TCP_SYN)) {
		int same_side = !!reply == !!(flags & WEIR_CT_F_RST_REPLY);

		if (same_side || now + WEIR_CT_LIFETIME_RST >= lifetime + WEIR_CT_RST_GRACE)
			flags &= ~(WEIR_CT_F_RST | WEIR_CT_F_RST_REPLY);
	}
	if ((flags & WEIR_CT_F_SEEN_REPLY) && !(tcp & WEIR_TCP_SYN))
		flags |= WEIR_CT_F_ESTABLISHED;
	if (tcp & WEIR_TCP_FIN)
		flags |= reply ? WEIR_CT_F_FIN_REPLY : WEIR_CT_F_FIN_ORIG;
	return flags;
}

/* The lifetime after a transition from old to flags at now: closed flows
 * keep the timer set when they closed. */
WEIR_INLINE __u32 weir_ct_next_lifetime(__u16 old, __u16 flags, __u8 proto, __u32 now, __u32 lifetime)
{
	if (proto == IPPROTO_TCP && weir_ct_closed(old) && weir_ct_closed(flags) &&
	    ((old ^ flags) & WEIR_CT_F_RST) == 0)
		return lifetime;
	return now + weir_ct_timeout(proto, flags);
}

/* The 32-bit word holding an entry's flags (with dir and pad), for atomic
 * bit changes: BPF atomics work on 32 and 64 bits. */
WEIR_INLINE __u32 *weir_ct_flags_word(struct weir_ct_entry *e)
{
	return (__u32 *)&e->flags;
}

/*
 * Applies a state change (bits set, bits cleared) to an entry atomically,
 * so that changes from both directions on different CPUs (a FIN each way)
 * add up instead of overwriting each other, and sets the lifetime the
 * entry's resulting state gives it. Returns the new flags.
 */
WEIR_INLINE __u16 weir_ct_change(struct weir_ct_entry *e, __u16 set, __u16 clear, __u8 proto, __u32 now)
{
	__u16 before = e->flags, after;

	if (set)
		__sync_fetch_and_or(weir_ct_flags_word(e), (__u32)set);
	if (clear)
		__sync_fetch_and_and(weir_ct_flags_word(e), ~(__u32)clear);
	after = e->flags;
	e->lifetime = weir_ct_next_lifetime(before, after, proto, now, e->lifetime);
	return after;
}

/*
 * Carries a state change of the entry at key into the flow's other entry
 * (which the other direction's packets read), or writes that entry again
 * when it is gone (the LRU may evict one half of a pair): replies would
 * otherwise pass untranslated while the original direction is.
 */
WEIR_INLINE void weir_ct_mirror(const struct weir_ct_key *key, const struct weir_ct_entry *e, __u16 set, __u16 clear,
				__u32 now)
{
	struct weir_ct_key twin;
	struct weir_ct_entry *t;

	weir_ct_twin_key(&twin, e, key->proto);
	t = bpf_map_lookup_elem(&weir_ct, &twin);
	/* A DSR flow's entry on the node that received it has no twin: the
	 * replies never come back there. */
	if (!t && (e->flags & WEIR_CT_F_ONE_SIDED))
		return;
	if (!t) {
		struct weir_ct_entry r = {
			.created = now,
			.lifetime = e->lifetime,
			.nat_saddr = key->daddr,
			.nat_daddr = key->saddr,
			.nat_sport = key->dport,
			.nat_dport = key->sport,
			.backend_id = e->backend_id,
			.rev_nat = e->rev_nat,
			.flags = e->flags,
			.dir = e->dir == WEIR_CT_ORIG ? WEIR_CT_REPLY : WEIR_CT_ORIG,
		};
		/* Not over another flow that took the tuple meanwhile. */
		bpf_map_update_elem(&weir_ct, &twin, &r, BPF_NOEXIST);
		return;
	}
	if (t->dir == e->dir || !weir_ct_is_twin(t, key))
		return;
	weir_ct_change(t, set, clear, key->proto, now);
}

/*
 * Accounts one packet of len bytes to entry e (keyed by key), folds its
 * TCP flags into the flow's state and extends the lifetime. The twin is
 * written only when the state or the lifetime (in whole seconds) changed,
 * so a steady flow touches the other entry at most once a second.
 */
WEIR_INLINE void weir_ct_touch(const struct weir_ct_key *key, struct weir_ct_entry *e, __u8 tcp, __u32 len,
			       __u32 now)
{
	__u16 old = e->flags;
	__u16 flags = weir_ct_next_flags(old, key->proto, e->dir, tcp, now, e->lifetime);
	__u32 lifetime = weir_ct_next_lifetime(old, flags, key->proto, now, e->lifetime);
	__u16 set = flags & ~old, clear = old & ~flags;

	__sync_fetch_and_add(&e->packets, 1);
	__sync_fetch_and_add(&e->bytes, len);
	if (!set && !clear && lifetime == e->lifetime)
		return;
	weir_ct_change(e, set, clear, key->proto, now);
	weir_ct_mirror(key, e, set, clear, now);
}

/* Deletes the entry at key and, when it is still the one pointing back,
 * its twin: a flow being replaced leaves nothing that would claim its
 * tuples. */
WEIR_INLINE void weir_ct_delete_flow(const struct weir_ct_key *key, const struct weir_ct_entry *e)
{
	struct weir_ct_key twin;
	struct weir_ct_entry *t;

	weir_ct_twin_key(&twin, e, key->proto);
	t = bpf_map_lookup_elem(&weir_ct, &twin);
	if (t && t->dir != e->dir && weir_ct_is_twin(t, key))
		bpf_map_delete_elem(&weir_ct, &twin);
	bpf_map_delete_elem(&weir_ct, key);
}

/* A random client port for a remapped flow. */
WEIR_INLINE __be16 weir_ct_random_port(void)
{
	return bpf_htons(WEIR_CT_REMAP_MIN + bpf_get_prandom_u32() % (65536 - WEIR_CT_REMAP_MIN));
}

/* Fills o as the first packet of a new flow makes it (ORIG); what kind
 * of flow it is (set by the caller) stays with it. */
WEIR_INLINE void weir_ct_init(struct weir_ct_entry *o, __u8 proto, __u8 tcp, __u32 len, __u32 now)
{
	o->dir = WEIR_CT_ORIG;
	o->created = now;
	o->flags = (o->flags & WEIR_CT_F_KINDS) | weir_ct_next_flags(0, proto, WEIR_CT_ORIG, tcp, now, 0);
	o->lifetime = now + weir_ct_timeout(proto, o->flags);
	o->packets = 1;
	o->bytes = len;
}

/* Fills r as the REPLY entry of the flow whose first packet had okey and
 * whose ORIG entry is o: replies leave as the reverse of what the
 * initiator sent. */
WEIR_INLINE void weir_ct_reply_init(struct weir_ct_entry *r, const struct weir_ct_key *okey,
				    const struct weir_ct_entry *o, __u32 now)
{
	r->dir = WEIR_CT_REPLY;
	r->created = now;
	r->flags = o->flags;
	r->lifetime = o->lifetime;
	r->backend_id = o->backend_id;
	r->rev_nat = o->rev_nat;
	r->nat_saddr = okey->daddr;
	r->nat_daddr = okey->saddr;
	r->nat_sport = okey->dport;
	r->nat_dport = okey->sport;
}

/*
 * Creates the two entries of a new flow. okey is the tuple of its first
 * packet (ORIG); o holds how ORIG packets leave (nat_*: the initiator's
 * address and port, the destination after translation) and the lb fields.
 * The REPLY entry is claimed first, atomically (BPF_NOEXIST): if another
 * live flow holds that tuple on the wire, the initiator's port is changed
 * on the wire (o->nat_sport) until a free one is found, as the kernel's NAT
 * does; an expired holder is removed. The kind bits of o->flags
 * (WEIR_CT_F_KINDS) are kept. Returns the ORIG entry in the map or
 * NULL with *reason set.
 */
WEIR_INLINE struct weir_ct_entry *weir_ct_create(struct weir_ct_key *okey, struct weir_ct_entry *o, __u8 tcp,
						  __u32 len, __u32 now, __u32 *reason)
{
	struct weir_ct_entry r = {};
	struct weir_ct_key rkey;
	struct weir_ct_entry *cur;
	__u8 proto = okey->proto;
	int claimed = 0;

	weir_ct_init(o, proto, tcp, len, now);
	weir_ct_reply_init(&r, okey, o, now);

	for (int i = 0; i < WEIR_CT_REMAP_TRIES; i++) {
		long err;

		weir_ct_twin_key(&rkey, o, proto);
		err = bpf_map_update_elem(&weir_ct, &rkey, &r, BPF_NOEXIST);
		if (!err) {
			claimed = 1;
			break;
		}
		if (err != -17 /* EEXIST */) {
			*reason = WEIR_DROP_CT_CREATE;
			return NULL;
		}
		cur = bpf_map_lookup_elem(&weir_ct, &rkey);
		if (!cur)
			continue; /* gone meanwhile: claim it on the next try */
		if (!weir_ct_expired(cur, now) && cur->dir == WEIR_CT_REPLY && weir_ct_is_twin(cur, okey)) {
			struct weir_ct_entry *won = bpf_map_lookup_elem(&weir_ct, okey);
			struct weir_ct_key back;

			/* Another CPU is creating this very flow: its entries
			 * stand (a packet never uses one that was deleted). */
			if (won) {
				weir_ct_twin_key(&back, won, proto);
				if (back.saddr == rkey.saddr && back.daddr == rkey.daddr && back.sport == rkey.sport &&
				    back.dport == rkey.dport)
					return won;
			}
			/* The other CPU has not written the original entry
			 * yet: it will, with this reply tuple. */
			if (!won && cur->created == now) {
				*reason = WEIR_DROP_CT_CREATE;
				return NULL;
			}
		}
		if (weir_ct_expired(cur, now) || (cur->dir == WEIR_CT_REPLY && weir_ct_is_twin(cur, okey))) {
			/* An expired flow, or a leftover of this flow whose
			 * original entry is gone. */
			weir_ct_delete_flow(&rkey, cur);
			continue;
		}
		o->nat_sport = weir_ct_random_port();
		o->flags |= WEIR_CT_F_REMAPPED;
		r.flags = o->flags;
	}
	if (!claimed) {
		*reason = WEIR_DROP_NAT_NO_PORT;
		return NULL;
	}
	if (bpf_map_update_elem(&weir_ct, okey, o, BPF_ANY)) {
		bpf_map_delete_elem(&weir_ct, &rkey);
		*reason = WEIR_DROP_CT_CREATE;
		return NULL;
	}
	cur = bpf_map_lookup_elem(&weir_ct, okey);
	if (!cur)
		*reason = WEIR_DROP_CT_CREATE;
	return cur;
}

/*
 * The entries of a new DSR flow. Its tuple on the wire is the client's
 * own, which no translation here may change (the replies do not come back
 * through this node to be changed back): no client port is remapped.
 * With reply set (the backend's node), the REPLY entry is written too,
 * over a DSR flow that held its tuple (one the client's reuse of its port
 * ended: the pod has one socket for the tuple), never over a live flow of
 * another kind; without (the node that received the request), only ORIG
 * is, flagged WEIR_CT_F_ONE_SIDED. Returns the ORIG entry or NULL with
 * *reason set.
 */
WEIR_INLINE struct weir_ct_entry *weir_ct_create_dsr(struct weir_ct_key *okey, struct weir_ct_entry *o, int reply,
						      __u8 tcp, __u32 len, __u32 now, __u32 *reason)
{
	struct weir_ct_entry r = {}, *cur;
	struct weir_ct_key rkey;

	if (!reply)
		o->flags |= WEIR_CT_F_ONE_SIDED;
	weir_ct_init(o, okey->proto, tcp, len, now);
	if (reply) {
		weir_ct_twin_key(&rkey, o, okey->proto);
		cur = bpf_map_lookup_elem(&weir_ct, &rkey);
		/* A live flow of another kind holds the pod's tuple: this one
		 * cannot have it too. */
		if (cur && !(cur->flags & WEIR_CT_F_DSR) && !weir_ct_expired(cur, now)) {
			*reason = WEIR_DROP_NAT_NO_PORT;
			return NULL;
		}
		if (cur)
			weir_ct_delete_flow(&rkey, cur);
		weir_ct_reply_init(&r, okey, o, now);
		if (bpf_map_update_elem(&weir_ct, &rkey, &r, BPF_ANY)) {
			*reason = WEIR_DROP_CT_CREATE;
			return NULL;
		}
	}
	if (bpf_map_update_elem(&weir_ct, okey, o, BPF_ANY)) {
		if (reply)
			bpf_map_delete_elem(&weir_ct, &rkey);
		*reason = WEIR_DROP_CT_CREATE;
		return NULL;
	}
	cur = bpf_map_lookup_elem(&weir_ct, okey);
	if (!cur)
		*reason = WEIR_DROP_CT_CREATE;
	return cur;
}

/* Rewrites the packet in ctx to leave as entry e says. */
WEIR_INLINE int weir_ct_apply(struct __sk_buff *skb, struct weir_ctx *ctx, const struct weir_ct_entry *e)
{
	if ((e->nat_saddr != ctx->saddr || e->nat_sport != ctx->sport) &&
	    weir_nat4(skb, ctx, 1, e->nat_saddr, e->nat_sport))
		return -1;
	if ((e->nat_daddr != ctx->daddr || e->nat_dport != ctx->dport) &&
	    weir_nat4(skb, ctx, 0, e->nat_daddr, e->nat_dport))
		return -1;
	return 0;
}
