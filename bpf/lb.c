// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The lb module: per-packet service load balancing. On pod egress a packet
 * to a service frontend is translated to a backend chosen at random, and the
 * choice is kept in conntrack for the life of the flow; on delivery to a pod
 * the replies are translated back to the frontend.
 */
#include "weir/ct.h"
#include "weir/lb.h"
#include "weir/nat.h"
#include "weir/stage.h"

WEIR_INLINE int weir_lb_l4(const struct weir_ctx *ctx)
{
	return ctx->l3 == WEIR_L3_IPV4 && (ctx->proto == IPPROTO_TCP || ctx->proto == IPPROTO_UDP) &&
	       !(ctx->flags & WEIR_CTX_LATER_FRAGMENT);
}

/* pod-egress/lb */
SEC("tc")
int lb_pod_egress(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	struct weir_ct_key ckey, rkey;
	struct weir_ct_entry *ce, *re;
	struct weir_backend *be = NULL;
	struct weir_svc_key skey;
	struct weir_svc_val *svc;
	__u32 backend_id = 0, now;

	if (!weir_lb_l4(ctx))
		return weir_next(skb, ctx);
	svc = weir_lb_lookup(&skey, ctx->daddr, ctx->dport, ctx->proto, 1);
	if (!svc)
		return weir_next(skb, ctx);
	/* Later fragments would miss the translation of the first one. */
	if (ctx->flags & WEIR_CTX_FRAGMENT)
		return weir_drop_ctx(skb, ctx, WEIR_DROP_FRAGMENT_TO_SERVICE);

	now = weir_now_sec();
	weir_ct_key_set(&ckey, ctx->saddr, ctx->daddr, ctx->sport, ctx->dport, ctx->proto, WEIR_CT_SERVICE);
	ce = bpf_map_lookup_elem(&weir_ct, &ckey);
	if (ce && !weir_ct_expired(ce, now) && !weir_ct_reopens(ce, ctx->proto, ctx->tcp_flags) &&
	    ce->rev_nat == svc->rev_nat) {
		backend_id = ce->backend_id;
		be = bpf_map_lookup_elem(&weir_backends, &backend_id);
		/* A backend that was removed (or quarantined) loses its flows;
		 * a terminating one keeps them. */
		if (be && be->state == WEIR_BACKEND_QUARANTINED)
			be = NULL;
	}
	if (!be) {
		be = weir_lb_affinity(svc, ctx->saddr, now, &backend_id);
		if (!be)
			be = weir_lb_pick(&skey, svc, &backend_id);
		if (!be)
			return weir_drop_ctx(skb, ctx, WEIR_DROP_NO_BACKEND);
		weir_lb_affinity_update(svc, ctx->saddr, backend_id, now);
		ce = weir_ct_create(&ckey, backend_id, svc->rev_nat, ctx->proto, ctx->tcp_flags, now);
	}
	if (ce)
		weir_ct_account(ce, ctx->proto, ctx->tcp_flags, skb->len, now);

	/* The reply entry is keyed by the tuple replies will carry. */
	weir_ct_key_set(&rkey, be->addr, ctx->saddr, be->port, ctx->sport, ctx->proto, WEIR_CT_REPLY);
	re = bpf_map_lookup_elem(&weir_ct, &rkey);
	if (!re || re->rev_nat != svc->rev_nat || re->backend_id != backend_id || weir_ct_expired(re, now))
		weir_ct_create(&rkey, backend_id, svc->rev_nat, ctx->proto, ctx->tcp_flags, now);
	else
		weir_ct_extend(re, ctx->proto, ctx->tcp_flags, now);

	if (weir_nat4(skb, ctx, 0, be->addr, be->port))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_CSUM_REWRITE);
	return weir_next(skb, ctx);
}

/* pod-ingress/lb-revnat: replies of translated flows get the frontend back
 * as their source before they reach the client pod. */
SEC("tc")
int lb_pod_ingress(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	struct weir_ct_key rkey = {}, ckey = {};
	struct weir_ct_entry *re, *ce;
	struct weir_revnat_entry *rn;
	__u16 rev_nat;
	__u32 now;

	if (!weir_lb_l4(ctx))
		return weir_next(skb, ctx);
	weir_ct_key_set(&rkey, ctx->saddr, ctx->daddr, ctx->sport, ctx->dport, ctx->proto, WEIR_CT_REPLY);
	re = bpf_map_lookup_elem(&weir_ct, &rkey);
	now = weir_now_sec();
	if (!re || weir_ct_expired(re, now))
		return weir_next(skb, ctx);
	rev_nat = re->rev_nat;
	rn = bpf_map_lookup_elem(&weir_revnat, &rev_nat);
	if (!rn)
		return weir_next(skb, ctx);
	if (ctx->flags & WEIR_CTX_FRAGMENT)
		return weir_drop_ctx(skb, ctx, WEIR_DROP_FRAGMENT_TO_SERVICE);
	weir_ct_account(re, ctx->proto, ctx->tcp_flags, skb->len, now);

	/* Keep the client's entry alive too: a flow whose client rarely
	 * speaks must not lose its backend while replies still flow. */
	weir_ct_key_set(&ckey, ctx->daddr, rn->addr, ctx->dport, rn->port, ctx->proto, WEIR_CT_SERVICE);
	ce = bpf_map_lookup_elem(&weir_ct, &ckey);
	if (ce && ce->rev_nat == rev_nat)
		weir_ct_extend(ce, ctx->proto, ctx->tcp_flags, now);

	if (weir_nat4(skb, ctx, 1, rn->addr, rn->port))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_CSUM_REWRITE);
	return weir_next(skb, ctx);
}

char __license[] SEC("license") = "Dual BSD/GPL";
