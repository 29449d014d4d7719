//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Programs of the misbehaving test plugin: one that is fine, one that
 * uses a core map the plugin may not declare, one the verifier refuses.
 */
#include "weir/stage.h"

SEC("tc")
int pass_stage(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	return weir_next(skb, ctx);
}

SEC("tc")
int uses_nat(struct __sk_buff *skb)
{
	struct weir_nat_key key = {};

	WEIR_STAGE_CTX(skb, ctx);
	if (bpf_map_lookup_elem(&weir_nat, &key))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_PLUGIN);
	return weir_next(skb, ctx);
}

SEC("tc")
int rejected(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct weir_ctx *ctx = bpf_map_lookup_elem(&weir_scratch, &zero);

	if (!ctx)
		return 0;
	/* Past the end of the value: the verifier refuses the load. */
	return *(volatile __u32 *)((char *)ctx + 4096);
}
