/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Header rewrites with checksum fix-ups through the kernel's csum helpers,
 * which also handle CHECKSUM_PARTIAL and CHECKSUM_COMPLETE skbs. */
#pragma once

#include "maps.h"

#ifndef offsetof
#define offsetof(type, member) __builtin_offsetof(type, member)
#endif

#define WEIR_IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))

/* Offset of the L4 checksum, or 0 when the protocol has none we keep. */
WEIR_INLINE __u32 weir_l4_csum_off(struct weir_ctx *ctx, __u64 *flags)
{
	switch (ctx->proto) {
	case IPPROTO_TCP:
		*flags = 0;
		return ctx->l4_off + offsetof(struct tcphdr, check);
	case IPPROTO_UDP:
		/* A zero UDP checksum means "none" and must stay zero. */
		*flags = BPF_F_MARK_MANGLED_0;
		return ctx->l4_off + offsetof(struct udphdr, check);
	}
	return 0;
}

/*
 * Rewrites the source (src != 0) or destination address and port of the
 * IPv4/TCP-or-UDP packet described by ctx, fixing the IP header checksum and
 * the L4 checksum (pseudo header included), and keeps ctx in step. Later
 * fragments get their address rewritten only.
 * Returns 0 or a negative error from a helper.
 */
WEIR_INLINE int weir_nat4(struct __sk_buff *skb, struct weir_ctx *ctx, int src, __be32 addr, __be16 port)
{
	__u32 addr_off = ETH_HLEN + (src ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
	__u32 port_off = ctx->l4_off + (src ? 0 : sizeof(__be16));
	__be32 old_addr = src ? ctx->saddr : ctx->daddr;
	__be16 old_port = src ? ctx->sport : ctx->dport;
	__u64 l4flags = 0;
	__u32 csum_off = weir_l4_csum_off(ctx, &l4flags);
	/* A later fragment has no L4 header: its checksum, in the first
	 * fragment, was fixed there for the whole datagram. */
	int l3_only = ctx->flags & WEIR_CTX_LATER_FRAGMENT;

	if (l3_only)
		csum_off = 0;
	if (old_addr != addr) {
		if (csum_off && bpf_l4_csum_replace(skb, csum_off, old_addr, addr,
						    l4flags | BPF_F_PSEUDO_HDR | sizeof(addr)))
			return -1;
		if (bpf_l3_csum_replace(skb, WEIR_IP_CSUM_OFF, old_addr, addr, sizeof(addr)))
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, &addr, sizeof(addr), 0))
			return -1;
	}
	if (old_port != port && !l3_only) {
		if (csum_off && bpf_l4_csum_replace(skb, csum_off, old_port, port, l4flags | sizeof(port)))
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &port, sizeof(port), 0))
			return -1;
	}
	if (src) {
		ctx->saddr = addr;
		ctx->sport = port;
		ctx->flags |= WEIR_CTX_SNAT;
	} else {
		ctx->daddr = addr;
		ctx->dport = port;
		ctx->flags |= WEIR_CTX_DNAT;
	}
	return 0;
}

/* Rewrites the 4-byte address at off (an IPv4 header's source or
 * destination) fixing only the header checksum at csum_off: for headers
 * whose L4 checksum covers no pseudo header (ICMP). */
WEIR_INLINE int weir_l3_addr(struct __sk_buff *skb, __u32 off, __u32 csum_off, __be32 old, __be32 new)
{
	if (old == new)
		return 0;
	if (bpf_l3_csum_replace(skb, csum_off, old, new, sizeof(new)))
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0) ? -1 : 0;
}

/* Decrements the IPv4 TTL of a packet we route. Returns -1 when the TTL is
 * exhausted (the caller drops), -2 on a helper error. */
WEIR_INLINE int weir_ttl_dec(struct __sk_buff *skb)
{
	__u32 off = ETH_HLEN + offsetof(struct iphdr, ttl);
	__u8 hdr[2]; /* ttl, protocol: one 16-bit word of the header */
	__be16 old_word, new_word;

	if (bpf_skb_load_bytes(skb, off, hdr, sizeof(hdr)))
		return -2;
	if (hdr[0] <= 1)
		return -1;
	__builtin_memcpy(&old_word, hdr, sizeof(old_word));
	hdr[0]--;
	__builtin_memcpy(&new_word, hdr, sizeof(new_word));
	if (bpf_l3_csum_replace(skb, WEIR_IP_CSUM_OFF, old_word, new_word, sizeof(new_word)))
		return -2;
	if (bpf_skb_store_bytes(skb, off, hdr, 1, 0))
		return -2;
	return 0;
}
