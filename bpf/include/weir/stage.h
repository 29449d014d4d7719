/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Running stages: the per-packet context, moving to the next filled slot of
 * a hook, entering another hook, and accounting for drops.
 */
#pragma once

#include "maps.h"

/* Sets Weir's byte of skb->mark (WEIR_MARK_MASK) to v, the rest kept. A
 * whole-word store: the verifier refuses narrower writes to skb->mark. */
WEIR_INLINE void weir_set_mark(struct __sk_buff *skb, __u32 v)
{
	__u32 mark = (skb->mark & ~WEIR_MARK_MASK) | v;

	*(volatile __u32 *)&skb->mark = mark;
}

WEIR_INLINE struct weir_ctx *weir_ctx_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&weir_scratch, &zero);
}

WEIR_INLINE void weir_count(__u32 hook, __u32 reason, __u32 len)
{
	__u32 idx = hook * WEIR_REASON_MAX + reason;
	struct weir_metric *m;

	if (hook >= WEIR_HOOK_MAX || reason >= WEIR_REASON_MAX)
		return;
	m = bpf_map_lookup_elem(&weir_metrics, &idx);
	if (m) {
		/* Per-CPU value: no atomics needed. */
		m->packets++;
		m->bytes += len;
	}
}

/* Drops the packet, counting the reason and reporting it as an event. The
 * context may be NULL when the scratch map itself failed. */
WEIR_INLINE int weir_drop(struct __sk_buff *skb, struct weir_ctx *ctx, __u32 hook, __u32 reason)
{
	struct weir_event *ev;

	weir_count(hook, reason, skb->len);
	ev = bpf_ringbuf_reserve(&weir_events, sizeof(*ev), 0);
	if (ev) {
		__builtin_memset(ev, 0, sizeof(*ev));
		ev->ts_ns = bpf_ktime_get_boot_ns();
		ev->ifindex = skb->ifindex;
		ev->hook = hook;
		ev->reason = reason;
		if (ctx) {
			ev->proto = ctx->proto;
			ev->saddr = ctx->saddr;
			ev->daddr = ctx->daddr;
			ev->sport = ctx->sport;
			ev->dport = ctx->dport;
		}
		bpf_ringbuf_submit(ev, 0);
	}
	return TC_ACT_SHOT;
}

WEIR_INLINE int weir_drop_ctx(struct __sk_buff *skb, struct weir_ctx *ctx, __u32 reason)
{
	return weir_drop(skb, ctx, ctx->hook, reason);
}

/*
 * Runs the next filled slot of the current hook. Only slots that hold a
 * program (weir_slot_mask) are entered, so an absent optional module costs
 * nothing and every tail call of a chain is one that does work: the kernel
 * counts failed calls against its limit of 33 too. When the hook has no
 * more filled slots the packet continues to the kernel (TC_ACT_OK). A tail
 * call only returns when it failed: into a filled slot that is a counted
 * drop, never a silent pass (unless core emptied the slot meanwhile).
 */
WEIR_INLINE int weir_next(struct __sk_buff *skb, struct weir_ctx *ctx)
{
	__u32 hook = ctx->hook & (WEIR_HOOK_MAX - 1);
	__u32 base = hook * WEIR_SLOTS_PER_HOOK;
	__u32 *mask = bpf_map_lookup_elem(&weir_slot_mask, &hook);

	if (!mask)
		return weir_drop_ctx(skb, ctx, WEIR_DROP_SCRATCH);
	for (int n = 0; n < WEIR_SLOTS_PER_HOOK; n++) {
		__u32 slot = ctx->next;
		__u32 bit;

		if (slot > ctx->last || slot >= WEIR_MAX_SLOTS || slot < base)
			break;
		ctx->next = slot + 1;
		bit = 1u << ((slot - base) & (WEIR_SLOTS_PER_HOOK - 1));
		if (!(*mask & bit))
			continue;
		bpf_tail_call(skb, &weir_calls, slot);
		if (!(*mask & bit))
			continue;
		return weir_drop_ctx(skb, ctx, WEIR_DROP_MISSED_TAIL_CALL);
	}
	weir_count(ctx->hook, WEIR_REASON_PASS, skb->len);
	return TC_ACT_OK;
}

/* Continues the packet in the stages of another hook: the forwarding stage
 * uses this to hand a packet for a local pod to the pod-ingress stages. */
WEIR_INLINE int weir_enter_hook(struct __sk_buff *skb, struct weir_ctx *ctx, __u32 hook)
{
	if (hook >= WEIR_HOOK_MAX)
		return weir_drop_ctx(skb, ctx, WEIR_DROP_SCRATCH);
	ctx->hook = hook;
	ctx->next = weir_hook_first[hook];
	ctx->last = weir_hook_last[hook];
	return weir_next(skb, ctx);
}

/* Continues the packet in the stages of hook from the slot at index slot
 * on: a packet translated outside the pod hooks enters forwarding. */
WEIR_INLINE int weir_enter_slot(struct __sk_buff *skb, struct weir_ctx *ctx, __u32 hook, __u32 slot)
{
	if (hook >= WEIR_HOOK_MAX || slot < weir_hook_first[hook] || slot > weir_hook_last[hook])
		return weir_drop_ctx(skb, ctx, WEIR_DROP_SCRATCH);
	ctx->hook = hook;
	ctx->next = slot;
	ctx->last = weir_hook_last[hook];
	return weir_next(skb, ctx);
}

/* Stage prologue: fetch the context or drop (only if the kernel failed to
 * give the per-CPU scratch, which would be a bug). */
#define WEIR_STAGE_CTX(skb, ctx)                                                \
	struct weir_ctx *ctx = weir_ctx_get();                                  \
	if (!ctx)                                                               \
		return weir_drop(skb, NULL, 0, WEIR_DROP_SCRATCH)
