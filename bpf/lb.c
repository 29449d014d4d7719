// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The lb module: per-packet service load balancing. On pod egress a packet
 * to a service frontend is translated to a backend chosen at random, and the
 * choice is kept in conntrack for the life of the flow; on delivery to a pod
 * the replies are translated back to the frontend. Flows that are not
 * translated are tracked too where a translated flow could otherwise take
 * their tuple on the wire (ct.h). ICMP errors about tracked flows and later
 * fragments of their datagrams are translated like the flow.
 */
#include "weir/ct.h"
#include "weir/icmp.h"
#include "weir/lb.h"
#include "weir/stage.h"

/* How long the ports of a first fragment are kept for later ones, as
 * long as the kernel waits to reassemble (ipfrag_time): beyond, the IP id
 * may belong to another datagram. */
#define LB_FRAG_LIFETIME 30

/* Later fragments carry no ports: those of their datagram's first
 * fragment, if it was translated. Returns 0 when unknown. */
WEIR_INLINE int lb_frag_ports(struct weir_ctx *ctx, __u32 now)
{
	struct weir_frag_key k = {.saddr = ctx->saddr, .daddr = ctx->daddr, .id = ctx->ip_id, .proto = ctx->proto};
	struct weir_frag_entry *f = bpf_map_lookup_elem(&weir_frags, &k);

	if (!f || now - f->created > LB_FRAG_LIFETIME)
		return 0;
	ctx->sport = f->sport;
	ctx->dport = f->dport;
	return 1;
}

/* A first fragment whose flow is translated leaves its ports (as sent)
 * for the later ones. Returns 0 or a drop reason. */
WEIR_INLINE __u32 lb_frag_remember(const struct weir_ctx *ctx, __u32 now)
{
	struct weir_frag_key k = {.saddr = ctx->saddr, .daddr = ctx->daddr, .id = ctx->ip_id, .proto = ctx->proto};
	struct weir_frag_entry f = {.sport = ctx->sport, .dport = ctx->dport, .created = now};

	if ((ctx->flags & (WEIR_CTX_FRAGMENT | WEIR_CTX_LATER_FRAGMENT)) != WEIR_CTX_FRAGMENT)
		return 0;
	return bpf_map_update_elem(&weir_frags, &k, &f, BPF_ANY) ? WEIR_DROP_FRAG_STATE : 0;
}

WEIR_INLINE int lb_rewrites(const struct weir_ct_entry *e, const struct weir_ct_key *k)
{
	return e->nat_saddr != k->saddr || e->nat_daddr != k->daddr || e->nat_sport != k->sport ||
	       e->nat_dport != k->dport;
}

/* The packet leaves as its flow's entry e (keyed by key) says; a first
 * fragment leaves its ports for the later ones. */
WEIR_INLINE int lb_leave(struct __sk_buff *skb, struct weir_ctx *ctx, const struct weir_ct_entry *e,
			 const struct weir_ct_key *key, __u32 now)
{
	__u32 reason;

	if (!lb_rewrites(e, key))
		return weir_next(skb, ctx);
	reason = lb_frag_remember(ctx, now);
	if (reason)
		return weir_drop_ctx(skb, ctx, reason);
	if (weir_ct_apply(skb, ctx, e))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_CSUM_REWRITE);
	return weir_next(skb, ctx);
}

/* Whether a packet that starts no service flow is tracked: every TCP
 * connection (from its SYN), and UDP to a backend address or whose tuple
 * on the wire another flow holds. UDP carries no start-of-flow mark, and
 * tracking every datagram a server sends would fill the table. */
WEIR_INLINE int lb_track_direct(const struct weir_ctx *ctx, __u32 now)
{
	struct weir_backend_addr_key bk = {.addr = ctx->daddr, .port = ctx->dport, .proto = ctx->proto};
	struct weir_ct_key rkey;
	struct weir_ct_entry *r;

	if (ctx->proto == IPPROTO_TCP)
		return weir_tcp_bare_syn(ctx->tcp_flags);
	if (bpf_map_lookup_elem(&weir_backend_addrs, &bk))
		return 1;
	weir_ct_key_set(&rkey, ctx->daddr, ctx->saddr, ctx->dport, ctx->sport, ctx->proto);
	r = bpf_map_lookup_elem(&weir_ct, &rkey);
	return r && !weir_ct_expired(r, now);
}

/*
 * An ICMP error about a tracked flow is translated as that flow: the
 * quoted packet becomes the one its sender sent (before translation) and
 * the outer header follows. The error travels against the quoted packet,
 * so the flow's entry for the error's direction is keyed by the reverse of
 * the quote; dir says which entries this hook translates.
 */
WEIR_INLINE int lb_icmp_error(struct __sk_buff *skb, struct weir_ctx *ctx, __u8 dir)
{
	struct weir_icmp_quote q;
	struct weir_ct_entry *e;
	struct weir_ct_key key;
	__be32 outer_saddr;

	if (weir_icmp_error_quote(skb, ctx, &q) || q.ip.saddr != ctx->daddr)
		return weir_next(skb, ctx);
	weir_ct_key_set(&key, q.ip.daddr, q.ip.saddr, q.dport, q.sport, q.ip.protocol);
	e = bpf_map_lookup_elem(&weir_ct, &key);
	if (!e || e->dir != dir || weir_ct_expired(e, weir_now_sec()) || !lb_rewrites(e, &key))
		return weir_next(skb, ctx);
	/* An error the peer itself sent speaks for the address it now has;
	 * one from a router or a node on the path keeps its source. */
	outer_saddr = ctx->saddr == key.saddr ? e->nat_saddr : ctx->saddr;
	if (weir_icmp_rewrite(skb, ctx, &q, e->nat_daddr, e->nat_saddr, e->nat_dport, e->nat_sport, outer_saddr,
			      e->nat_daddr))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_CSUM_REWRITE);
	return weir_next(skb, ctx);
}

/* The frontend a pod's packet is addressed to: a ClusterIP, load-balancer
 * or external IP, or a NodePort on any node's address (in-cluster clients
 * of NodePorts are translated here, at their own node, as kube-proxy
 * does). The internal scope: in-cluster traffic uses every backend. A
 * packet that would start a flow (fresh) to a node's address must start
 * a connection: a pod's answer to a node (a SYN-ACK) whose port is also a
 * NodePort is not taken for a request to it. */
WEIR_INLINE struct weir_svc_val *lb_frontend(struct weir_svc_key *skey, const struct weir_ctx *ctx, int fresh)
{
	struct weir_svc_val *svc = weir_lb_lookup(skey, ctx->daddr, ctx->dport, ctx->proto, 1);
	struct weir_ipcache_key ik = {.prefixlen = 32, .addr = ctx->daddr};
	struct weir_ipcache_entry *node;

	if (svc)
		return svc;
	if (fresh && ctx->proto == IPPROTO_TCP && !weir_tcp_bare_syn(ctx->tcp_flags))
		return NULL;
	node = bpf_map_lookup_elem(&weir_ipcache, &ik);
	if (!node || !(node->flags & WEIR_IPCACHE_NODE))
		return NULL;
	svc = weir_lb_lookup(skey, 0, ctx->dport, ctx->proto, 1);
	return svc && svc->type == WEIR_SVC_NODE_PORT ? svc : NULL;
}

/* pod-egress/lb */
SEC("tc")
int lb_pod_egress(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	struct weir_ct_entry o = {}, *e;
	struct weir_svc_val *svc;
	struct weir_svc_key skey;
	struct weir_ct_key key;
	__u32 now, reason = 0;
	int later;

	if (ctx->l3 != WEIR_L3_IPV4)
		return weir_next(skb, ctx);
	if (ctx->proto == IPPROTO_ICMP)
		return lb_icmp_error(skb, ctx, WEIR_CT_ORIG);
	if (ctx->proto != IPPROTO_TCP && ctx->proto != IPPROTO_UDP)
		return weir_next(skb, ctx);
	now = weir_now_sec();
	later = ctx->flags & WEIR_CTX_LATER_FRAGMENT;
	if (later && !lb_frag_ports(ctx, now))
		return weir_next(skb, ctx);

	weir_ct_key_set(&key, ctx->saddr, ctx->daddr, ctx->sport, ctx->dport, ctx->proto);
	e = bpf_map_lookup_elem(&weir_ct, &key);
	if (e && e->dir != WEIR_CT_ORIG) {
		/* A pod answering itself through a service: the reply turns
		 * back here, to the frontend the pod called. */
		if ((e->flags & WEIR_CT_F_HAIRPIN) && !weir_ct_expired(e, now)) {
			weir_ct_touch(&key, e, ctx->tcp_flags, skb->len, now);
			return lb_leave(skb, ctx, e, &key, now);
		}
		/* A reply leaving a local server: translated on delivery. */
		return weir_next(skb, ctx);
	}
	/* A later fragment never revives or starts a flow. */
	if (later && (!e || weir_ct_expired(e, now)))
		return weir_next(skb, ctx);
	/* Only a new flow or a translated one needs its frontend: an
	 * established untranslated flow stays so (as with the kernel's
	 * conntrack), and pod-to-pod packets pay no service lookup. */
	svc = NULL;
	if (!e || e->rev_nat)
		svc = lb_frontend(&skey, ctx, !e);
	if (e && !later &&
	    (weir_ct_expired(e, now) || weir_ct_reopens(e, ctx->proto, ctx->tcp_flags) ||
	     (e->rev_nat && !weir_lb_flow_current(e, svc)))) {
		weir_ct_delete_flow(&key, e);
		e = NULL;
		svc = lb_frontend(&skey, ctx, 1);
	}
	if (e) {
		weir_ct_touch(&key, e, ctx->tcp_flags, skb->len, now);
	} else {
		o.nat_saddr = ctx->saddr;
		o.nat_sport = ctx->sport;
		o.nat_daddr = ctx->daddr;
		o.nat_dport = ctx->dport;
		if (svc) {
			if (weir_lb_choose(&skey, svc, ctx->saddr, now, &o))
				return (svc->flags2 & WEIR_SVC_F2_REJECT) ? weir_reject(skb, ctx)
									  : weir_drop_ctx(skb, ctx, WEIR_DROP_NO_BACKEND);
			if (o.nat_daddr == ctx->saddr) {
				o.nat_saddr = WEIR_HAIRPIN_ADDR;
				o.flags |= WEIR_CT_F_HAIRPIN;
			}
		} else if (!lb_track_direct(ctx, now)) {
			return weir_next(skb, ctx);
		}
		/* No state, no translation: a flow whose entries cannot be
		 * written is dropped, never sent on half-translated. */
		e = weir_ct_create(&key, &o, ctx->tcp_flags, skb->len, now, &reason);
		if (!e)
			return weir_drop_ctx(skb, ctx, reason);
	}
	return lb_leave(skb, ctx, e, &key, now);
}

/* pod-ingress/lb-revnat: replies of tracked flows leave as their flow
 * says (translated flows get the frontend back as their source) before
 * they reach the client pod. */
SEC("tc")
int lb_pod_ingress(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	struct weir_ct_entry *e;
	struct weir_ct_key key;
	__u32 now;

	if (ctx->l3 != WEIR_L3_IPV4)
		return weir_next(skb, ctx);
	if (ctx->proto == IPPROTO_ICMP)
		return lb_icmp_error(skb, ctx, WEIR_CT_REPLY);
	if (ctx->proto != IPPROTO_TCP && ctx->proto != IPPROTO_UDP)
		return weir_next(skb, ctx);
	now = weir_now_sec();
	if ((ctx->flags & WEIR_CTX_LATER_FRAGMENT) && !lb_frag_ports(ctx, now))
		return weir_next(skb, ctx);
	weir_ct_key_set(&key, ctx->saddr, ctx->daddr, ctx->sport, ctx->dport, ctx->proto);
	e = bpf_map_lookup_elem(&weir_ct, &key);
	if (!e || e->dir != WEIR_CT_REPLY || weir_ct_expired(e, now))
		return weir_next(skb, ctx);
	if (!(ctx->flags & WEIR_CTX_LATER_FRAGMENT))
		weir_ct_touch(&key, e, ctx->tcp_flags, skb->len, now);
	return lb_leave(skb, ctx, e, &key, now);
}

char __license[] SEC("license") = "Dual BSD/GPL";
