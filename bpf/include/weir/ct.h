/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Connection tracking for translated flows (the weir_ct LRU map). */
#pragma once

#include "maps.h"

/* Lifetimes in seconds, chosen as the kernel's conntrack and Cilium do:
 * an established TCP flow lives long, a half-open or closing one briefly. */
#define WEIR_CT_LIFETIME_TCP 21600
#define WEIR_CT_LIFETIME_SYN 60
#define WEIR_CT_LIFETIME_FIN 120
#define WEIR_CT_LIFETIME_RST 10
#define WEIR_CT_LIFETIME_NONTCP 60

#define WEIR_TCP_FIN 0x01
#define WEIR_TCP_SYN 0x02
#define WEIR_TCP_RST 0x04
#define WEIR_TCP_ACK 0x10

/* Fills a conntrack key for the tuple saddr:sport -> daddr:dport. */
WEIR_INLINE void weir_ct_key_set(struct weir_ct_key *k, __be32 saddr, __be32 daddr, __be16 sport, __be16 dport,
				 __u8 proto, __u8 kind)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr = saddr;
	k->daddr = daddr;
	k->sport = sport;
	k->dport = dport;
	k->proto = proto;
	k->kind = kind;
}

WEIR_INLINE __u16 weir_ct_flags_of(__u8 proto, __u8 tcp)
{
	__u16 f = 0;

	if (proto != IPPROTO_TCP)
		return 0;
	if (tcp & WEIR_TCP_SYN)
		f |= WEIR_CT_F_SYN;
	else if (tcp & WEIR_TCP_ACK)
		f |= WEIR_CT_F_ESTABLISHED;
	if (tcp & WEIR_TCP_FIN)
		f |= WEIR_CT_F_FIN;
	if (tcp & WEIR_TCP_RST)
		f |= WEIR_CT_F_RST;
	return f;
}

WEIR_INLINE __u32 weir_ct_timeout(__u8 proto, __u16 flags)
{
	if (proto != IPPROTO_TCP)
		return WEIR_CT_LIFETIME_NONTCP;
	if (flags & WEIR_CT_F_RST)
		return WEIR_CT_LIFETIME_RST;
	if (flags & WEIR_CT_F_FIN)
		return WEIR_CT_LIFETIME_FIN;
	if (flags & WEIR_CT_F_ESTABLISHED)
		return WEIR_CT_LIFETIME_TCP;
	return WEIR_CT_LIFETIME_SYN;
}

WEIR_INLINE int weir_ct_expired(const struct weir_ct_entry *e, __u32 now)
{
	return e->lifetime <= now;
}

/* A bare SYN on an entry whose connection was closing starts a new
 * connection on the same tuple: it gets a fresh backend choice. */
WEIR_INLINE int weir_ct_reopens(const struct weir_ct_entry *e, __u8 proto, __u8 tcp)
{
	return proto == IPPROTO_TCP && (tcp & WEIR_TCP_SYN) && !(tcp & WEIR_TCP_ACK) &&
	       (e->flags & (WEIR_CT_F_FIN | WEIR_CT_F_RST));
}

/* Folds the packet's TCP flags into the entry and extends its lifetime.
 * Writes only when something changed, at most once a second for a steady
 * flow, to keep the shared cache line quiet. */
WEIR_INLINE void weir_ct_extend(struct weir_ct_entry *e, __u8 proto, __u8 tcp, __u32 now)
{
	__u16 flags = e->flags | weir_ct_flags_of(proto, tcp);
	__u32 lifetime = now + weir_ct_timeout(proto, flags);

	if (flags != e->flags)
		e->flags = flags;
	if (lifetime != e->lifetime)
		e->lifetime = lifetime;
}

/* Accounts one packet of len bytes to the entry's direction and extends it. */
WEIR_INLINE void weir_ct_account(struct weir_ct_entry *e, __u8 proto, __u8 tcp, __u32 len, __u32 now)
{
	__sync_fetch_and_add(&e->packets, 1);
	__sync_fetch_and_add(&e->bytes, len);
	weir_ct_extend(e, proto, tcp, now);
}

/* Creates (or replaces) an entry. Returns the stored entry or NULL. */
WEIR_INLINE struct weir_ct_entry *weir_ct_create(struct weir_ct_key *key, __u32 backend_id, __u16 rev_nat,
						  __u8 proto, __u8 tcp, __u32 now)
{
	struct weir_ct_entry e = {
		.created = now,
		.backend_id = backend_id,
		.rev_nat = rev_nat,
		.flags = weir_ct_flags_of(proto, tcp),
	};

	e.lifetime = now + weir_ct_timeout(proto, e.flags);
	if (bpf_map_update_elem(&weir_ct, key, &e, BPF_ANY))
		return NULL;
	return bpf_map_lookup_elem(&weir_ct, key);
}
