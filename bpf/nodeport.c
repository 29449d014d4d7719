// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The nodeport module: services reached from outside the cluster (NodePort
 * on the node's addresses, load-balancer IPs, external IPs) are served on
 * the uplink's ingress. A backend on this node gets the packet directly,
 * with the client's address; one on another node gets it over the node's
 * forwarding mode with the source translated to this node (SNAT, weir_nat),
 * so its replies come back here to be translated back.
 */
#include "weir/ct.h"
#include "weir/fwd.h"
#include "weir/lb.h"
#include "weir/snat.h"

/* Load-time settings (modules/nodeport). */
#define NODEPORT_MAX_ADDRS 8
volatile const __be32 nodeport_node_ip = 0; /* the source remote backends see */
volatile const __be32 nodeport_addrs[NODEPORT_MAX_ADDRS] = {};
volatile const __u32 nodeport_addr_count = 0;
volatile const __u32 nodeport_min = 30000; /* the NodePort range, host order */
volatile const __u32 nodeport_max = 32767;
volatile const __u32 nodeport_snat_min = 32768; /* ports SNAT gives flows */
volatile const __u32 nodeport_snat_max = 65535;

/* Whether the node serves NodePorts on addr. */
WEIR_INLINE int nodeport_listens(__be32 addr)
{
	for (int i = 0; i < NODEPORT_MAX_ADDRS; i++) {
		if (i >= nodeport_addr_count)
			break;
		if (nodeport_addrs[i] == addr)
			return 1;
	}
	return 0;
}

/* The frontend a packet from outside the cluster is addressed to: a
 * load-balancer or external IP, or a NodePort on one of the node's
 * addresses. ClusterIPs are not served from outside. Looked up in the
 * external scope: with externalTrafficPolicy Local it holds only this
 * node's backends. */
WEIR_INLINE struct weir_svc_val *nodeport_lookup(struct weir_svc_key *k, const struct weir_ctx *ctx)
{
	struct weir_svc_val *svc = weir_lb_lookup(k, ctx->daddr, ctx->dport, ctx->proto, 0);
	__u16 port = bpf_ntohs(ctx->dport);

	if (svc)
		return svc->type == WEIR_SVC_CLUSTER_IP ? NULL : svc;
	if (port < nodeport_min || port > nodeport_max || !nodeport_listens(ctx->daddr))
		return NULL;
	svc = weir_lb_lookup(k, 0, ctx->dport, ctx->proto, 0);
	return svc && svc->type == WEIR_SVC_NODE_PORT ? svc : NULL;
}

/* Whether the frontend svc in ctx takes no traffic from ctx's client: it
 * has loadBalancerSourceRanges and none holds the client. */
WEIR_INLINE int nodeport_refuses(const struct weir_ctx *ctx, const struct weir_svc_val *svc)
{
	struct weir_src_range_key rk = {.prefixlen = 96, .faddr = ctx->daddr, .fport = ctx->dport, .proto = ctx->proto,
					.client = ctx->saddr};

	if (!(svc->flags2 & WEIR_SVC_F2_SOURCE_RANGES))
		return 0;
	return !bpf_map_lookup_elem(&weir_src_ranges, &rk);
}

/* Sends a translated packet on toward its destination: a pod of another
 * node through the forwarding mode's stage, anything else by the FIB. */
WEIR_INLINE int nodeport_forward(struct __sk_buff *skb, struct weir_ctx *ctx)
{
	struct weir_ipcache_entry *e = weir_ipcache_lookup(ctx->daddr);
	int rc;

	if (e && (e->flags & WEIR_IPCACHE_REMOTE_POD))
		return weir_enter_slot(skb, ctx, WEIR_HOOK_POD_EGRESS, weir_slot_pod_forward);
	rc = weir_fib_forward(skb, ctx);
	return rc >= 0 ? rc : weir_drop_ctx(skb, ctx, WEIR_DROP_NO_ROUTE);
}

/*
 * The SNAT entries of the flow whose packets, translated to the backend,
 * are in ctx: found, repaired when the LRU evicted the reply half, or
 * made. Returns the OUT entry or NULL with *reason set.
 */
WEIR_INLINE struct weir_nat_entry *nodeport_snat(const struct weir_ctx *ctx, __u32 now, __u32 *reason)
{
	struct weir_nat_range r = {.min = nodeport_snat_min, .max = nodeport_snat_max};
	struct weir_nat_entry *o;
	struct weir_nat_key k;

	o = weir_snat_out(&k, ctx->saddr, ctx->daddr, ctx->sport, ctx->dport, ctx->proto);
	if (o) {
		if (weir_snat_owns(&k, o, now))
			return o;
		/* The port went to another flow meanwhile: take another. */
		bpf_map_delete_elem(&weir_nat, &k);
	}
	return weir_snat_create(&k, nodeport_node_ip, r, WEIR_NAT_NODEPORT, now, reason);
}

/* A packet of a flow from outside leaves as its conntrack entry says
 * (the backend as destination), and with the node as source when the
 * backend is elsewhere. */
WEIR_INLINE int nodeport_leave(struct __sk_buff *skb, struct weir_ctx *ctx, const struct weir_ct_key *key,
				struct weir_ct_entry *e, int fresh, __u32 now)
{
	struct weir_nat_entry *nat;
	__u32 reason = WEIR_DROP_CT_CREATE;

	if (weir_ct_apply(skb, ctx, e))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_CSUM_REWRITE);
	/* A local backend: the netdev-ingress local stage delivers it. */
	if (!(e->flags & WEIR_CT_F_SNAT))
		return weir_next(skb, ctx);
	nat = nodeport_snat(ctx, now, &reason);
	if (!nat) {
		/* A new flow that gets no port leaves no state: its retries
		 * start afresh, and may find a port freed meanwhile. */
		if (fresh)
			weir_ct_delete_flow(key, e);
		return weir_drop_ctx(skb, ctx, reason);
	}
	if (weir_nat4(skb, ctx, 1, nat->addr, nat->port))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_CSUM_REWRITE);
	return nodeport_forward(skb, ctx);
}

/* A reply of a remote backend to the node's translated source: back to
 * the client, from the frontend it called. */
WEIR_INLINE int nodeport_reply(struct __sk_buff *skb, struct weir_ctx *ctx, const struct weir_nat_entry *in, __u32 now)
{
	struct weir_ct_entry *e;
	struct weir_ct_key key;

	if (weir_nat4(skb, ctx, 0, in->addr, in->port))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_CSUM_REWRITE);
	weir_ct_key_set(&key, ctx->saddr, ctx->daddr, ctx->sport, ctx->dport, ctx->proto);
	e = bpf_map_lookup_elem(&weir_ct, &key);
	if (!e || e->dir != WEIR_CT_REPLY || weir_ct_expired(e, now))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_NAT_ORPHAN);
	weir_ct_touch(&key, e, ctx->tcp_flags, skb->len, now);
	if (weir_ct_apply(skb, ctx, e))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_CSUM_REWRITE);
	return nodeport_forward(skb, ctx);
}

/* Drops a flow's state: its conntrack entries and, for a remote backend,
 * its SNAT entries. */
WEIR_INLINE void nodeport_forget(const struct weir_ct_key *key, const struct weir_ct_entry *e)
{
	struct weir_nat_entry *nat;
	struct weir_nat_key k;

	if (e->flags & WEIR_CT_F_SNAT) {
		nat = weir_snat_out(&k, e->nat_saddr, e->nat_daddr, e->nat_sport, e->nat_dport, key->proto);
		if (nat)
			weir_snat_delete(&k, nat);
	}
	weir_ct_delete_flow(key, e);
}

/* netdev-ingress/nodeport */
SEC("tc")
int nodeport_ingress(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	struct weir_ct_entry o = {}, *e;
	struct weir_endpoint_key ep = {};
	struct weir_nat_entry *in;
	struct weir_svc_val *svc;
	struct weir_svc_key skey;
	struct weir_ct_key key;
	__u32 now, reason = 0;

	if (ctx->l3 != WEIR_L3_IPV4 || (ctx->proto != IPPROTO_TCP && ctx->proto != IPPROTO_UDP) ||
	    (ctx->flags & WEIR_CTX_FRAGMENT))
		return weir_next(skb, ctx);
	now = weir_now_sec();
	in = weir_snat_in(ctx->saddr, ctx->daddr, ctx->sport, ctx->dport, ctx->proto);
	if (in && in->owner == WEIR_NAT_NODEPORT)
		return nodeport_reply(skb, ctx, in, now);

	weir_ct_key_set(&key, ctx->saddr, ctx->daddr, ctx->sport, ctx->dport, ctx->proto);
	e = bpf_map_lookup_elem(&weir_ct, &key);
	/* Someone else's flow (a tunnelled pod's, say). */
	if (e && (e->dir != WEIR_CT_ORIG || !(e->flags & WEIR_CT_F_NODEPORT)))
		return weir_next(skb, ctx);
	svc = nodeport_lookup(&skey, ctx);
	if (e && (weir_ct_expired(e, now) || weir_ct_reopens(e, ctx->proto, ctx->tcp_flags) ||
		  !weir_lb_flow_current(e, svc))) {
		nodeport_forget(&key, e);
		e = NULL;
	}
	if (e) {
		weir_ct_touch(&key, e, ctx->tcp_flags, skb->len, now);
		return nodeport_leave(skb, ctx, &key, e, 0, now);
	}
	if (!svc)
		return weir_next(skb, ctx);
	if (nodeport_refuses(ctx, svc))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_SOURCE_RANGE);
	if (weir_lb_choose(&skey, svc, ctx->saddr, now, &o))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_NO_BACKEND);
	o.nat_saddr = ctx->saddr;
	o.nat_sport = ctx->sport;
	o.flags = WEIR_CT_F_NODEPORT;
	ep.addr = o.nat_daddr;
	if (!bpf_map_lookup_elem(&weir_endpoints, &ep))
		o.flags |= WEIR_CT_F_SNAT;
	e = weir_ct_create(&key, &o, ctx->tcp_flags, skb->len, now, &reason);
	if (!e)
		return weir_drop_ctx(skb, ctx, reason);
	return nodeport_leave(skb, ctx, &key, e, 1, now);
}

/* pod-egress/nodeport: a local backend's replies to a client outside
 * leave from the frontend the client called, straight out of the node. */
SEC("tc")
int nodeport_reply_local(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	struct weir_ct_entry *e;
	struct weir_ct_key key;
	__u32 now;

	if (ctx->l3 != WEIR_L3_IPV4 || (ctx->proto != IPPROTO_TCP && ctx->proto != IPPROTO_UDP) ||
	    (ctx->flags & WEIR_CTX_FRAGMENT))
		return weir_next(skb, ctx);
	now = weir_now_sec();
	weir_ct_key_set(&key, ctx->saddr, ctx->daddr, ctx->sport, ctx->dport, ctx->proto);
	e = bpf_map_lookup_elem(&weir_ct, &key);
	if (!e || e->dir != WEIR_CT_REPLY || !(e->flags & WEIR_CT_F_NODEPORT) || (e->flags & WEIR_CT_F_SNAT) ||
	    weir_ct_expired(e, now))
		return weir_next(skb, ctx);
	weir_ct_touch(&key, e, ctx->tcp_flags, skb->len, now);
	if (weir_ct_apply(skb, ctx, e))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_CSUM_REWRITE);
	return nodeport_forward(skb, ctx);
}

char __license[] SEC("license") = "Dual BSD/GPL";
