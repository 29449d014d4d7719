// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Core-owned hook entry programs. Each parses the packet once into the
 * per-CPU context and runs the hook's stages by tail call; modules fill the
 * stages. Attached by core/datapath.
 */
#include "weir/parse.h"
#include "weir/stage.h"

WEIR_INLINE int weir_entry(struct __sk_buff *skb, __u32 hook, int at_ingress)
{
	struct weir_ctx *ctx = weir_ctx_get();
	__u32 reason;

	if (!ctx)
		return weir_drop(skb, NULL, hook, WEIR_DROP_SCRATCH);
	__builtin_memset(ctx, 0, sizeof(*ctx));
	ctx->hook = hook;
	ctx->ifindex = skb->ifindex;
	ctx->len = skb->len;
	if (at_ingress)
		ctx->flags |= WEIR_CTX_AT_INGRESS;

	reason = weir_parse(skb, ctx);
	/* The node's own devices carry more than Weir handles (IPv6, LLDP,
	 * ...): that is the stack's business, not a drop. */
	if (reason == WEIR_DROP_UNSUPPORTED_L3 && (hook == WEIR_HOOK_NETDEV_INGRESS || hook == WEIR_HOOK_NETDEV_EGRESS)) {
		weir_count(hook, WEIR_REASON_PASS, skb->len);
		return TC_ACT_OK;
	}
	if (reason != WEIR_REASON_PASS)
		return weir_drop_ctx(skb, ctx, reason);

	ctx->next = weir_hook_first[hook & (WEIR_HOOK_MAX - 1)];
	ctx->last = weir_hook_last[hook & (WEIR_HOOK_MAX - 1)];
	return weir_next(skb, ctx);
}

/* pod-egress: tc ingress on the host side of a pod's veth. */
SEC("tc")
int weir_pod_egress(struct __sk_buff *skb)
{
	return weir_entry(skb, WEIR_HOOK_POD_EGRESS, 1);
}

/* pod-ingress: tc egress on the host side of a pod's veth, for packets the
 * node's stack sends to the pod. Packets Weir itself delivers enter the same
 * stages from pod-egress without passing here. */
SEC("tc")
int weir_pod_ingress(struct __sk_buff *skb)
{
	return weir_entry(skb, WEIR_HOOK_POD_INGRESS, 0);
}

/* Types the programs never name still need BTF for their generated Go
 * mirrors (core/datapath): these unused pointers emit it. */
const struct weir_ctx *weir_btf_ctx __attribute__((unused));
const struct weir_svc_key *weir_btf_svc_key __attribute__((unused));
const struct weir_svc_val *weir_btf_svc_val __attribute__((unused));
const struct weir_backend *weir_btf_backend __attribute__((unused));
const struct weir_revnat_entry *weir_btf_revnat_entry __attribute__((unused));
const struct weir_ct_key *weir_btf_ct_key __attribute__((unused));
const struct weir_ct_entry *weir_btf_ct_entry __attribute__((unused));
const struct weir_endpoint_key *weir_btf_endpoint_key __attribute__((unused));
const struct weir_endpoint *weir_btf_endpoint __attribute__((unused));
const struct weir_metric *weir_btf_metric __attribute__((unused));
const struct weir_affinity_key *weir_btf_affinity_key __attribute__((unused));
const struct weir_ipcache_key *weir_btf_ipcache_key __attribute__((unused));
const struct weir_ipcache_entry *weir_btf_ipcache_entry __attribute__((unused));
const struct weir_affinity_entry *weir_btf_affinity_entry __attribute__((unused));
const struct weir_event *weir_btf_event __attribute__((unused));
const enum weir_hook *weir_btf_hook __attribute__((unused));
const enum weir_reason *weir_btf_reason __attribute__((unused));
const enum weir_scope *weir_btf_scope __attribute__((unused));
const enum weir_svc_type *weir_btf_svc_type __attribute__((unused));
const enum weir_svc_selection *weir_btf_svc_selection __attribute__((unused));
const enum weir_backend_state *weir_btf_backend_state __attribute__((unused));
const enum weir_ct_dir *weir_btf_ct_dir __attribute__((unused));
const struct weir_backend_addr_key *weir_btf_backend_addr_key __attribute__((unused));
const struct weir_frag_key *weir_btf_frag_key __attribute__((unused));
const struct weir_frag_entry *weir_btf_frag_entry __attribute__((unused));
const enum weir_l3 *weir_btf_l3 __attribute__((unused));
const struct weir_nat_key *weir_btf_nat_key __attribute__((unused));
const struct weir_nat_entry *weir_btf_nat_entry __attribute__((unused));
const enum weir_nat_dir *weir_btf_nat_dir __attribute__((unused));
const enum weir_nat_owner *weir_btf_nat_owner __attribute__((unused));
const struct weir_nat_counters *weir_btf_nat_stats __attribute__((unused));
const struct weir_src_range_key *weir_btf_src_range_key __attribute__((unused));

/* netdev-ingress: tc ingress on the node's uplink: tunnel traffic to
 * decapsulate, and packets for local pods to deliver directly. */
SEC("tc")
int weir_netdev_ingress(struct __sk_buff *skb)
{
	return weir_entry(skb, WEIR_HOOK_NETDEV_INGRESS, 1);
}

/* netdev-egress: tc egress on the node's uplink: what the node's own stack
 * sends (to pods of other nodes through the tunnel). */
SEC("tc")
int weir_netdev_egress(struct __sk_buff *skb)
{
	/* Forwarded by a stage already (pod traffic, encapsulated or routed
	 * natively): nothing left to do. */
	if ((skb->mark & WEIR_MARK_MASK) == WEIR_MARK_FORWARDED) {
		weir_set_mark(skb, 0);
		return TC_ACT_OK;
	}
	return weir_entry(skb, WEIR_HOOK_NETDEV_EGRESS, 0);
}

/* Fills the slots of a plugin whose process is down while its
 * failurePolicy is closed: what would have reached its stage is dropped. */
SEC("tc")
int weir_plugin_down(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	return weir_drop_ctx(skb, ctx, WEIR_DROP_PLUGIN_DOWN);
}

char __license[] SEC("license") = "Dual BSD/GPL";
