/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* ICMP errors built from the packet that caused them. */
#pragma once

#include "parse.h"
#include "stage.h"

#define WEIR_ICMP_QUOTE_MAX (WEIR_MAX_IP_HLEN + 8)
#define WEIR_ICMP_DEST_UNREACH 3
#define WEIR_ICMP_FRAG_NEEDED 4

/* The ICMP header of a "destination unreachable" (linux/icmp.h would pull
 * in libc headers). */
struct weir_icmp_unreach {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 unused;
	__be16 mtu;
};

WEIR_INLINE __sum16 weir_csum_fold(__u32 csum)
{
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return (__sum16)~csum;
}

/*
 * Answers a packet too big for the path with ICMP "fragmentation needed"
 * (RFC 1191) announcing mtu, from src, sent back out of the device the
 * packet came in on: the sender lowers its path MTU instead of losing
 * packets silently. The packet itself becomes the error (its IP header
 * and first 8 bytes of payload are quoted).
 */
WEIR_INLINE int weir_icmp_frag_needed(struct __sk_buff *skb, struct weir_ctx *ctx, __be32 src, __u16 mtu)
{
	struct {
		struct iphdr ip;
		struct weir_icmp_unreach icmp;
	} hdr = {}; /* 28 bytes, no padding */
	__u8 quote[WEIR_ICMP_QUOTE_MAX];
	struct ethhdr eth;
	__u32 qlen, csum;
	__u8 mac[ETH_ALEN];

	qlen = (ctx->l4_off - ETH_HLEN) + 8;
	if (qlen < sizeof(struct iphdr) + 8 || qlen > WEIR_ICMP_QUOTE_MAX)
		return weir_drop_ctx(skb, ctx, WEIR_DROP_FRAG_NEEDED);
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) || bpf_skb_load_bytes(skb, ETH_HLEN, quote, qlen))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_FRAG_NEEDED);
	if (bpf_skb_adjust_room(skb, sizeof(hdr), BPF_ADJ_ROOM_MAC, 0) ||
	    bpf_skb_change_tail(skb, ETH_HLEN + sizeof(hdr) + qlen, 0))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_FRAG_NEEDED);

	__builtin_memcpy(mac, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, mac, ETH_ALEN);
	hdr.ip.version = 4;
	hdr.ip.ihl = 5;
	hdr.ip.tot_len = bpf_htons(sizeof(hdr) + qlen);
	hdr.ip.ttl = 64;
	hdr.ip.protocol = IPPROTO_ICMP;
	hdr.ip.saddr = src;
	hdr.ip.daddr = ctx->saddr;
	hdr.ip.check = weir_csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&hdr.ip, sizeof(hdr.ip), 0));
	hdr.icmp.type = WEIR_ICMP_DEST_UNREACH;
	hdr.icmp.code = WEIR_ICMP_FRAG_NEEDED;
	hdr.icmp.mtu = bpf_htons(mtu);
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&hdr.icmp, sizeof(hdr.icmp), 0);
	csum = bpf_csum_diff(NULL, 0, (__be32 *)quote, qlen & 0x7c, csum);
	hdr.icmp.checksum = weir_csum_fold(csum);

	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &hdr, sizeof(hdr), 0))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_FRAG_NEEDED);
	weir_count(ctx->hook, WEIR_DROP_FRAG_NEEDED, skb->len);
	return bpf_redirect(ctx->ifindex, 0);
}
