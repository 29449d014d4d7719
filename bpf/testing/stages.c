// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Stages for tests of the stage machinery itself (core/datapath/dptest):
 * one that does nothing but run the next stage, one that moves on to the
 * pod-ingress stages, and one that re-enters its own hook forever, so that
 * a chain runs into the kernel's tail-call limit.
 */
#include "weir/stage.h"

SEC("tc")
int stage_pass(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	return weir_next(skb, ctx);
}

SEC("tc")
int stage_reenter(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	return weir_enter_hook(skb, ctx, ctx->hook & (WEIR_HOOK_MAX - 1));
}

/* Hands the packet to the pod-ingress stages, as local delivery does. */
SEC("tc")
int stage_to_pod_ingress(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	return weir_enter_hook(skb, ctx, WEIR_HOOK_POD_INGRESS);
}

char __license[] SEC("license") = "Dual BSD/GPL";
