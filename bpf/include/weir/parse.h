/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The one packet parser: entry programs call weir_parse once per packet and
 * stages read the result from struct weir_ctx instead of parsing again.
 */
#pragma once

#include "maps.h"

/* The ARP body for Ethernet and IPv4, as on the wire. */
struct weir_arp {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[ETH_ALEN];
	__be32 spa;
	__u8 tha[ETH_ALEN];
	__be32 tpa;
} __attribute__((packed));

#define WEIR_MAX_IP_HLEN 60

/* Makes the first n bytes of the frame linear, pulling only when they are
 * not already (a pull can unclone the skb, which is not free). */
WEIR_INLINE int weir_linear(struct __sk_buff *skb, __u32 n)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (data + n <= data_end)
		return 0;
	if (n > skb->len)
		return -1;
	return bpf_skb_pull_data(skb, n) ? -1 : 0;
}

/* Returns the L4 header of the packet in ctx with at least size bytes in
 * bounds, or NULL. */
WEIR_INLINE void *weir_l4(struct __sk_buff *skb, struct weir_ctx *ctx, __u32 size)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	/* The mask bounds the offset for the verifier (an L4 offset is at
	 * most 14 + 60 < 128); a range check alone gets compiled into a form
	 * it cannot follow. */
	__u32 off = ctx->l4_off & 0x7f;

	if (off < ETH_HLEN + sizeof(struct iphdr))
		return NULL;
	if (data + off + size > data_end)
		return NULL;
	return data + off;
}

WEIR_INLINE __u32 weir_parse_arp(struct __sk_buff *skb, struct weir_ctx *ctx)
{
	struct weir_arp *arp;
	void *data, *data_end;

	if (weir_linear(skb, ETH_HLEN + sizeof(*arp)))
		return WEIR_DROP_ARP_MALFORMED;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	arp = data + ETH_HLEN;
	if ((void *)(arp + 1) > data_end)
		return WEIR_DROP_ARP_MALFORMED;
	if (arp->htype != bpf_htons(ARPHRD_ETHER) || arp->ptype != bpf_htons(ETH_P_IP) ||
	    arp->hlen != ETH_ALEN || arp->plen != 4)
		return WEIR_DROP_ARP_MALFORMED;
	ctx->l3 = WEIR_L3_ARP;
	ctx->saddr = arp->spa;
	ctx->daddr = arp->tpa;
	return WEIR_REASON_PASS;
}

WEIR_INLINE __u32 weir_parse_l4(struct __sk_buff *skb, struct weir_ctx *ctx, __u32 l4_len)
{
	__u32 need;
	__u8 *l4;

	switch (ctx->proto) {
	case IPPROTO_TCP:
		need = sizeof(struct tcphdr);
		break;
	case IPPROTO_UDP:
		need = sizeof(struct udphdr);
		break;
	case IPPROTO_ICMP:
		need = 8;
		break;
	default:
		return WEIR_REASON_PASS;
	}
	if (l4_len < need)
		return WEIR_DROP_L4_TRUNCATED;
	if (weir_linear(skb, ctx->l4_off + need))
		return WEIR_DROP_L4_TRUNCATED;
	if (ctx->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = weir_l4(skb, ctx, sizeof(*tcp));

		if (!tcp)
			return WEIR_DROP_L4_TRUNCATED;
		if (tcp->doff < 5 || tcp->doff * 4 > l4_len)
			return WEIR_DROP_TCP_BAD_OFFSET;
		ctx->sport = tcp->source;
		ctx->dport = tcp->dest;
		ctx->tcp_flags = ((__u8 *)tcp)[13];
	} else if (ctx->proto == IPPROTO_UDP) {
		struct udphdr *udp = weir_l4(skb, ctx, sizeof(*udp));

		if (!udp)
			return WEIR_DROP_L4_TRUNCATED;
		ctx->sport = udp->source;
		ctx->dport = udp->dest;
	} else {
		l4 = weir_l4(skb, ctx, 8);
		if (!l4)
			return WEIR_DROP_L4_TRUNCATED;
	}
	return WEIR_REASON_PASS;
}

WEIR_INLINE __u32 weir_parse_ipv4(struct __sk_buff *skb, struct weir_ctx *ctx)
{
	void *data, *data_end;
	struct iphdr *ip;
	__u32 ihl, tot, frag;

	if (skb->len < ETH_HLEN + sizeof(*ip))
		return WEIR_DROP_IP_TRUNCATED;
	if (weir_linear(skb, ETH_HLEN + sizeof(*ip)))
		return WEIR_DROP_IP_TRUNCATED;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > data_end)
		return WEIR_DROP_IP_TRUNCATED;
	if (ip->version != 4 || ip->ihl < 5)
		return WEIR_DROP_IP_BAD_HEADER;
	ihl = ip->ihl * 4;
	tot = bpf_ntohs(ip->tot_len);
	/* Trailing padding (tot < frame) is fine; a header claiming more bytes
	 * than the frame holds is not. */
	if (tot < ihl || ETH_HLEN + tot > skb->len)
		return WEIR_DROP_IP_BAD_LENGTH;

	ctx->l3 = WEIR_L3_IPV4;
	ctx->saddr = ip->saddr;
	ctx->daddr = ip->daddr;
	ctx->proto = ip->protocol;
	ctx->l4_off = ETH_HLEN + ihl;
	ctx->ip_id = ip->id;

	frag = bpf_ntohs(ip->frag_off);
	if (frag & (IP_MF | IP_OFFSET)) {
		ctx->flags |= WEIR_CTX_FRAGMENT;
		if (frag & IP_OFFSET) {
			/* Later fragments carry no L4 header. */
			ctx->flags |= WEIR_CTX_LATER_FRAGMENT;
			return WEIR_REASON_PASS;
		}
	}
	if (weir_linear(skb, ETH_HLEN + ihl))
		return WEIR_DROP_IP_TRUNCATED;
	return weir_parse_l4(skb, ctx, tot - ihl);
}

/* Parses L2 to L4 into ctx. Returns WEIR_REASON_PASS or the drop reason. */
WEIR_INLINE __u32 weir_parse(struct __sk_buff *skb, struct weir_ctx *ctx)
{
	void *data, *data_end;
	struct ethhdr *eth;

	if (skb->len < ETH_HLEN || weir_linear(skb, ETH_HLEN))
		return WEIR_DROP_ETH_TRUNCATED;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return WEIR_DROP_ETH_TRUNCATED;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return weir_parse_ipv4(skb, ctx);
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return weir_parse_arp(skb, ctx);
	return WEIR_DROP_UNSUPPORTED_L3;
}

/* Parses again after the packet changed shape (decapsulation): the
 * context keeps its hook, device and slot position, and gets the new
 * packet's headers. */
WEIR_INLINE __u32 weir_reparse(struct __sk_buff *skb, struct weir_ctx *ctx)
{
	ctx->l3 = WEIR_L3_NONE;
	ctx->saddr = ctx->daddr = 0;
	ctx->sport = ctx->dport = 0;
	ctx->proto = ctx->tcp_flags = 0;
	ctx->l4_off = 0;
	ctx->ip_id = 0;
	ctx->flags &= WEIR_CTX_AT_INGRESS;
	ctx->len = skb->len;
	return weir_parse(skb, ctx);
}
