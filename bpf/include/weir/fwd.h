/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Forwarding between nodes: where an address lives (weir_ipcache) and
 * native forwarding through the kernel's FIB. */
#pragma once

#include "nat.h"
#include "stage.h"

#ifndef AF_INET
#define AF_INET 2
#endif

WEIR_INLINE struct weir_ipcache_entry *weir_ipcache_lookup(__be32 addr)
{
	struct weir_ipcache_key key = {.prefixlen = 32, .addr = addr};

	return bpf_map_lookup_elem(&weir_ipcache, &key);
}

/*
 * Forwards the IPv4 packet in ctx natively: the kernel's FIB picks the
 * egress device and next hop (a direct route to the owning node, or the
 * underlay's router), the neighbour subsystem fills in the MACs. Returns a
 * TC verdict, or -1 when the FIB has no answer and the kernel's stack
 * should take the packet as it is.
 */
WEIR_INLINE int weir_fib_forward(struct __sk_buff *skb, struct weir_ctx *ctx)
{
	struct bpf_fib_lookup fib = {};
	struct bpf_redir_neigh nh = {};
	long rc;
	int err;

	fib.family = AF_INET;
	fib.ifindex = ctx->ifindex;
	fib.l4_protocol = ctx->proto;
	fib.sport = ctx->sport;
	fib.dport = ctx->dport;
	fib.ipv4_src = ctx->saddr;
	fib.ipv4_dst = ctx->daddr;
	/* tot_len stays 0: the lookup checks no MTU (GSO packets carry a
	 * super-packet length); the pod's MTU already accounts for the path. */
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return -1;
	err = weir_ttl_dec(skb);
	if (err == -1)
		return weir_drop_ctx(skb, ctx, WEIR_DROP_TTL_EXCEEDED);
	if (err)
		return weir_drop_ctx(skb, ctx, WEIR_DROP_CSUM_REWRITE);
	nh.nh_family = AF_INET;
	nh.ipv4_nh = fib.ipv4_dst;
	weir_count(ctx->hook, WEIR_REASON_PASS, skb->len);
	weir_set_mark(skb, WEIR_MARK_FORWARDED);
	return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
}
