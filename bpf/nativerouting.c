// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The nativerouting module: pod traffic to another node leaves as it is,
 * routed by the kernel's FIB (direct routes to the owning nodes, or the
 * underlay's router) and sent with bpf_redirect_neigh, skipping the stack.
 */
#include "weir/fwd.h"

/* pod-egress/forward */
SEC("tc")
int nativerouting_forward(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	struct weir_ipcache_entry *e;
	int rc;

	if (ctx->l3 != WEIR_L3_IPV4)
		return weir_next(skb, ctx);
	e = weir_ipcache_lookup(ctx->daddr);
	if (!e || !(e->flags & WEIR_IPCACHE_REMOTE_POD))
		return weir_next(skb, ctx);
	rc = weir_fib_forward(skb, ctx);
	return rc >= 0 ? rc : weir_next(skb, ctx);
}

char __license[] SEC("license") = "Dual BSD/GPL";
