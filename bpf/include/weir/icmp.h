/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* ICMP errors built from the packet that caused them. */
#pragma once

#include "nat.h"
#include "parse.h"
#include "stage.h"

/* The quote: the IP header and 8 bytes of L4, or the 20-byte TCP header
 * (see weir_icmp_frag_needed). */
#define WEIR_ICMP_QUOTE_MAX (WEIR_MAX_IP_HLEN + 20)
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
WEIR_INLINE int weir_icmp_unreach(struct __sk_buff *skb, struct weir_ctx *ctx, __be32 src, __u8 code, __u16 mtu,
				  __u32 count_as)
{
	struct {
		struct iphdr ip;
		struct weir_icmp_unreach icmp;
	} hdr = {}; /* 28 bytes, no padding */
	__u8 quote[WEIR_ICMP_QUOTE_MAX];
	struct ethhdr eth;
	__u32 qlen, csum;
	__u8 mac[ETH_ALEN];

	/* A TCP segment whose checksum the stack left to offload
	 * (CHECKSUM_PARTIAL) cannot be cut short of its checksum field: the
	 * kernel refuses to shrink it below. Quote the whole basic TCP
	 * header; more than 8 bytes is allowed (RFC 1812 asks for more). */
	qlen = (ctx->l4_off - ETH_HLEN) + (ctx->proto == IPPROTO_TCP ? 20 : 8);
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
	hdr.icmp.code = code;
	hdr.icmp.mtu = bpf_htons(mtu);
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&hdr.icmp, sizeof(hdr.icmp), 0);
	csum = bpf_csum_diff(NULL, 0, (__be32 *)quote, qlen & 0x7c, csum);
	hdr.icmp.checksum = weir_csum_fold(csum);

	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &hdr, sizeof(hdr), 0))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_FRAG_NEEDED);
	weir_count(ctx->hook, count_as, skb->len);
	return bpf_redirect(ctx->ifindex, 0);
}

/* "Fragmentation needed" (code 4) announcing mtu. */
WEIR_INLINE int weir_icmp_frag_needed(struct __sk_buff *skb, struct weir_ctx *ctx, __be32 src, __u16 mtu)
{
	return weir_icmp_unreach(skb, ctx, src, WEIR_ICMP_FRAG_NEEDED, mtu, WEIR_DROP_FRAG_NEEDED);
}

#define WEIR_ICMP_PORT_UNREACH 3

/* TCP header flags (linux/tcp.h would pull in libc headers). */
struct weir_tcp_min {
	__be16 source;
	__be16 dest;
	__be32 seq;
	__be32 ack_seq;
	__u8 doff_res; /* data offset << 4 */
	__u8 flags;
	__be16 window;
	__sum16 check;
	__be16 urg_ptr;
};

/*
 * Answers a TCP segment with a reset from src:sport (the address and port
 * it was sent to), as a closed port does (RFC 9293 3.10.7.1): the packet
 * itself becomes the reset, sent back out of the device it came in on.
 * count_as is the reason it is counted under.
 */
WEIR_INLINE int weir_tcp_reset(struct __sk_buff *skb, struct weir_ctx *ctx, __be32 src, __be16 sport, __u32 count_as)
{
	struct {
		struct iphdr ip;
		struct weir_tcp_min tcp;
	} hdr = {};
	struct {
		__be32 saddr;
		__be32 daddr;
		__u8 zero;
		__u8 proto;
		__be16 len;
	} pseudo = {};
	struct weir_tcp_min in;
	struct ethhdr eth;
	__u8 mac[ETH_ALEN];
	__be16 tot;
	__u32 seglen, csum;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) || bpf_skb_load_bytes(skb, ETH_HLEN + 2, &tot, sizeof(tot)) ||
	    bpf_skb_load_bytes(skb, ctx->l4_off & 0x7f, &in, sizeof(in)))
		return weir_drop_ctx(skb, ctx, count_as);
	if (in.flags & WEIR_TCP_RST)
		return weir_drop_ctx(skb, ctx, count_as); /* never answer a reset */
	seglen = bpf_ntohs(tot) - (ctx->l4_off - ETH_HLEN) - (in.doff_res >> 4) * 4;
	if (in.flags & WEIR_TCP_SYN)
		seglen++;
	if (in.flags & WEIR_TCP_FIN)
		seglen++;
	hdr.ip.version = 4;
	hdr.ip.ihl = 5;
	hdr.ip.tot_len = bpf_htons(sizeof(hdr));
	hdr.ip.ttl = 64;
	hdr.ip.protocol = IPPROTO_TCP;
	hdr.ip.saddr = src;
	hdr.ip.daddr = ctx->saddr;
	hdr.ip.check = weir_csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&hdr.ip, sizeof(hdr.ip), 0));
	hdr.tcp.source = sport;
	hdr.tcp.dest = ctx->sport;
	hdr.tcp.doff_res = 5 << 4;
	if (in.flags & WEIR_TCP_ACK) {
		hdr.tcp.seq = in.ack_seq;
		hdr.tcp.flags = WEIR_TCP_RST;
	} else {
		hdr.tcp.ack_seq = bpf_htonl(bpf_ntohl(in.seq) + seglen);
		hdr.tcp.flags = WEIR_TCP_RST | WEIR_TCP_ACK;
	}
	pseudo.saddr = hdr.ip.saddr;
	pseudo.daddr = hdr.ip.daddr;
	pseudo.proto = IPPROTO_TCP;
	pseudo.len = bpf_htons(sizeof(hdr.tcp));
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&pseudo, sizeof(pseudo), 0);
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&hdr.tcp, sizeof(hdr.tcp), csum);
	hdr.tcp.check = weir_csum_fold(csum);

	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(hdr), 0))
		return weir_drop_ctx(skb, ctx, count_as);
	__builtin_memcpy(mac, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, mac, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &hdr, sizeof(hdr), 0))
		return weir_drop_ctx(skb, ctx, count_as);
	weir_count(ctx->hook, count_as, skb->len);
	return bpf_redirect(ctx->ifindex, 0);
}

/* Rejects a packet to a frontend without any usable endpoint, as
 * kube-proxy does: TCP gets a reset, UDP an ICMP port unreachable, both
 * from the address the client called. */
WEIR_INLINE int weir_reject(struct __sk_buff *skb, struct weir_ctx *ctx)
{
	if (ctx->proto == IPPROTO_TCP)
		return weir_tcp_reset(skb, ctx, ctx->daddr, ctx->dport, WEIR_REJECT_NO_ENDPOINTS);
	return weir_icmp_unreach(skb, ctx, ctx->daddr, WEIR_ICMP_PORT_UNREACH, 0, WEIR_REJECT_NO_ENDPOINTS);
}

#define WEIR_ICMP_TIME_EXCEEDED 11
#define WEIR_ICMP_PARAMETER_PROBLEM 12

/* The start of the packet an ICMP error quotes: its IPv4 header (without
 * options) and the first 8 bytes of its L4 header (ports, and the UDP
 * checksum). */
struct weir_icmp_quote {
	struct iphdr ip;
	__be16 sport;
	__be16 dport;
	__be16 l4_word2; /* UDP length, or half of the TCP sequence number */
	__be16 l4_word3; /* UDP checksum, or the other half */
};

/* Offsets in an ICMP error packet (no outer IP options: l4_off is
 * checked by the caller). */
#define WEIR_ICMP_QUOTE_OFF(l4_off) ((l4_off) + sizeof(struct weir_icmp_unreach))

/*
 * Loads the quoted packet of an ICMP error (destination unreachable, time
 * exceeded, parameter problem) into q. Returns 0, or -1 when the packet is
 * no such error or quotes something other than the start of a TCP or UDP
 * packet with a plain IPv4 header.
 */
WEIR_INLINE int weir_icmp_error_quote(struct __sk_buff *skb, struct weir_ctx *ctx, struct weir_icmp_quote *q)
{
	__u8 type;
	__u32 off = ctx->l4_off & 0x7f;

	if (ctx->proto != IPPROTO_ICMP || (ctx->flags & WEIR_CTX_FRAGMENT))
		return -1;
	if (bpf_skb_load_bytes(skb, off, &type, 1))
		return -1;
	if (type != WEIR_ICMP_DEST_UNREACH && type != WEIR_ICMP_TIME_EXCEEDED && type != WEIR_ICMP_PARAMETER_PROBLEM)
		return -1;
	if (bpf_skb_load_bytes(skb, WEIR_ICMP_QUOTE_OFF(off), q, sizeof(*q)))
		return -1;
	if (q->ip.version != 4 || q->ip.ihl != 5 || (q->ip.protocol != IPPROTO_TCP && q->ip.protocol != IPPROTO_UDP))
		return -1;
	/* Only a first fragment (or a whole packet) quotes ports. */
	if (q->ip.frag_off & bpf_htons(IP_OFFSET))
		return -1;
	return 0;
}

/* The checksum field old after data whose one's-complement sum changed by
 * diff (a bpf_csum_diff result). */
WEIR_INLINE __sum16 weir_csum_update(__sum16 old, __u32 diff)
{
	__u32 sum = (__u16)~old;

	sum += diff & 0xffff;
	sum += diff >> 16;
	return weir_csum_fold(sum);
}

/*
 * Rewrites an ICMP error so that it describes the packet as its sender
 * knows it: the quoted addresses and ports become saddr:sport ->
 * daddr:dport, the quoted IP checksum is recomputed, the quoted UDP or TCP
 * checksum (when present) and the ICMP checksum follow. The outer header
 * gets outer_saddr and outer_daddr. ctx follows the outer header.
 */
WEIR_INLINE int weir_icmp_rewrite(struct __sk_buff *skb, struct weir_ctx *ctx, const struct weir_icmp_quote *old,
				  __be32 saddr, __be32 daddr, __be16 sport, __be16 dport, __be32 outer_saddr,
				  __be32 outer_daddr)
{
	__u32 off = ctx->l4_off & 0x7f;
	__u32 qoff = WEIR_ICMP_QUOTE_OFF(off);
	__u32 icmp_csum = off + offsetof(struct weir_icmp_unreach, checksum);
	struct weir_icmp_quote q = *old;
	__be32 from[3], to[3];
	__u32 l4diff, diff;

	q.ip.saddr = saddr;
	q.ip.daddr = daddr;
	q.sport = sport;
	q.dport = dport;
	q.ip.check = 0;
	q.ip.check = weir_csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&q.ip, sizeof(q.ip), 0));

	/* What the quoted L4 checksum covers that changed: pseudo header
	 * addresses and both ports. */
	from[0] = old->ip.saddr;
	from[1] = old->ip.daddr;
	from[2] = ((__u32)old->dport << 16) | old->sport;
	to[0] = saddr;
	to[1] = daddr;
	to[2] = ((__u32)dport << 16) | sport;
	l4diff = (__u32)bpf_csum_diff(from, sizeof(from), to, sizeof(to), 0);
	if (q.ip.protocol == IPPROTO_UDP && old->l4_word3) {
		q.l4_word3 = weir_csum_update(old->l4_word3, l4diff);
		if (!q.l4_word3)
			q.l4_word3 = 0xffff;
	}
	diff = (__u32)bpf_csum_diff((__be32 *)old, sizeof(*old), (__be32 *)&q, sizeof(q), 0);
	if (q.ip.protocol == IPPROTO_TCP) {
		__u32 tcp_csum = qoff + sizeof(struct iphdr) + offsetof(struct tcphdr, check);
		__be32 oldc = 0, newc = 0;

		/* Quoted beyond the 8 bytes ICMP promises: keep it right. */
		if (tcp_csum + 2 <= skb->len && !bpf_skb_load_bytes(skb, tcp_csum, &oldc, 2)) {
			newc = weir_csum_update((__sum16)oldc, l4diff);
			diff = (__u32)bpf_csum_diff(&oldc, 4, &newc, 4, diff);
			if (bpf_skb_store_bytes(skb, tcp_csum, &newc, 2, 0))
				return -1;
		}
	}
	if (bpf_l4_csum_replace(skb, icmp_csum, 0, diff, 0))
		return -1;
	if (bpf_skb_store_bytes(skb, qoff, &q, sizeof(q), 0))
		return -1;
	if (weir_l3_addr(skb, ETH_HLEN + offsetof(struct iphdr, saddr), WEIR_IP_CSUM_OFF, ctx->saddr, outer_saddr) ||
	    weir_l3_addr(skb, ETH_HLEN + offsetof(struct iphdr, daddr), WEIR_IP_CSUM_OFF, ctx->daddr, outer_daddr))
		return -1;
	if (outer_saddr != ctx->saddr)
		ctx->flags |= WEIR_CTX_SNAT;
	if (outer_daddr != ctx->daddr)
		ctx->flags |= WEIR_CTX_DNAT;
	ctx->saddr = outer_saddr;
	ctx->daddr = outer_daddr;
	return 0;
}
