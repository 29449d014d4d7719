// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The masquerade module: traffic from local pods to destinations outside
 * the cluster (not a pod CIDR, not a node, not a non-masquerade CIDR)
 * leaves the uplink with the node's address as source, translated in BPF
 * on weir_nat; replies are translated back on the uplink's ingress and
 * delivered to the pod. TCP, UDP and ICMP echo.
 */
#include "weir/ct.h"
#include "weir/fwd.h"
#include "weir/snat.h"

/* Load-time settings (modules/masquerade). */
#define MASQ_MAX_SKIP 16
volatile const __be32 masq_node_ip = 0;
volatile const __u32 masq_min = 61000; /* source ports, host order */
volatile const __u32 masq_max = 65535;
/* nonMasqueradeCIDRs: address and mask, network order. */
volatile const __be32 masq_skip_addr[MASQ_MAX_SKIP] = {};
volatile const __be32 masq_skip_mask[MASQ_MAX_SKIP] = {};
volatile const __u32 masq_skip_count = 0;

#define ICMP_ECHOREPLY 0
#define ICMP_ECHO 8

/* Whether the destination is one the pod's address must reach unchanged:
 * a pod or node of the cluster, or a non-masquerade CIDR. */
WEIR_INLINE int masq_keeps(__be32 daddr)
{
	if (weir_ipcache_lookup(daddr))
		return 1;
	for (int i = 0; i < MASQ_MAX_SKIP; i++) {
		if (i >= masq_skip_count)
			break;
		if ((daddr & masq_skip_mask[i]) == masq_skip_addr[i])
			return 1;
	}
	return 0;
}

/* Reads an ICMP message's type and echo identifier. */
WEIR_INLINE int masq_icmp(struct __sk_buff *skb, const struct weir_ctx *ctx, __u8 *type, __be16 *id)
{
	__u8 hdr[6];

	if (bpf_skb_load_bytes(skb, ctx->l4_off & 0x7f, hdr, sizeof(hdr)))
		return -1;
	*type = hdr[0];
	__builtin_memcpy(id, &hdr[4], sizeof(*id));
	return 0;
}

/* Rewrites the source (src) or destination address of an ICMP echo and
 * its identifier: the ICMP checksum covers no pseudo header, only the
 * identifier. */
WEIR_INLINE int masq_icmp_rewrite(struct __sk_buff *skb, struct weir_ctx *ctx, int src, __be32 addr, __be16 old_id,
				  __be16 id)
{
	__u32 off = ETH_HLEN + (src ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
	__u32 l4 = ctx->l4_off & 0x7f;

	if (weir_l3_addr(skb, off, WEIR_IP_CSUM_OFF, src ? ctx->saddr : ctx->daddr, addr))
		return -1;
	if (old_id != id) {
		if (bpf_l4_csum_replace(skb, l4 + 2, old_id, id, sizeof(id)))
			return -1;
		if (bpf_skb_store_bytes(skb, l4 + 4, &id, sizeof(id), 0))
			return -1;
	}
	if (src)
		ctx->saddr = addr;
	else
		ctx->daddr = addr;
	return 0;
}

/* netdev-egress/masquerade */
SEC("tc")
int masq_egress(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	struct weir_nat_range r = {.min = masq_min, .max = masq_max};
	struct weir_ipcache_entry *src;
	struct weir_ct_entry o = {}, *e;
	struct weir_nat_entry *nat;
	struct weir_nat_key k;
	struct weir_ct_key key;
	__be16 sport = ctx->sport, dport = ctx->dport;
	__u32 now, reason = WEIR_DROP_CT_CREATE;
	__u8 type = 0;
	int icmp = ctx->proto == IPPROTO_ICMP, fresh = 0;

	if (ctx->l3 != WEIR_L3_IPV4 || (ctx->flags & WEIR_CTX_FRAGMENT) ||
	    (ctx->proto != IPPROTO_TCP && ctx->proto != IPPROTO_UDP && !icmp))
		return weir_next(skb, ctx);
	src = weir_ipcache_lookup(ctx->saddr);
	if (!src || !(src->flags & WEIR_IPCACHE_LOCAL_POD) || masq_keeps(ctx->daddr))
		return weir_next(skb, ctx);
	if (icmp) {
		/* Echo requests only: the identifier plays the port. */
		if (masq_icmp(skb, ctx, &type, &sport) || type != ICMP_ECHO)
			return weir_next(skb, ctx);
		dport = 0;
	}
	now = weir_now_sec();
	/* The flow's conntrack entry, which keeps its NAT entries alive:
	 * made here when lb did not (UDP, ICMP). lb keeps TCP and UDP ones
	 * up to date on the pod's side; ICMP has only this module. */
	weir_ct_key_set(&key, ctx->saddr, ctx->daddr, sport, dport, ctx->proto);
	e = bpf_map_lookup_elem(&weir_ct, &key);
	if (e && weir_ct_expired(e, now)) {
		weir_ct_delete_flow(&key, e);
		e = NULL;
	}
	/* The pod answers a connection that came from outside: it answers
	 * with the address it was called at (as the kernel's MASQUERADE,
	 * which translates only connections started from inside). */
	if (e && e->dir == WEIR_CT_REPLY) {
		weir_ct_touch(&key, e, ctx->tcp_flags, skb->len, now);
		return weir_next(skb, ctx);
	}
	/* A TCP packet past the handshake starts no connection; it goes on
	 * as a translated flow only when its NAT entries say it is one whose
	 * conntrack entry was lost. */
	if (!e && ctx->proto == IPPROTO_TCP && !weir_tcp_bare_syn(ctx->tcp_flags) &&
	    !weir_snat_out(&k, ctx->saddr, ctx->daddr, sport, dport, ctx->proto))
		return weir_next(skb, ctx);
	if (!e) {
		o.nat_saddr = ctx->saddr;
		o.nat_daddr = ctx->daddr;
		o.nat_sport = sport;
		o.nat_dport = dport;
		e = weir_ct_create(&key, &o, ctx->tcp_flags, skb->len, now, &reason);
		if (!e)
			return weir_drop_ctx(skb, ctx, reason);
		fresh = 1;
	} else if (icmp) {
		weir_ct_touch(&key, e, 0, skb->len, now);
	}
	nat = weir_snat_out(&k, ctx->saddr, ctx->daddr, sport, dport, ctx->proto);
	if (nat && !weir_snat_owns(&k, nat, now)) {
		/* The port went to another flow: this one takes a port anew. */
		bpf_map_delete_elem(&weir_nat, &k);
		nat = NULL;
	}
	if (!nat) {
		nat = weir_snat_create(&k, masq_node_ip, r, WEIR_NAT_MASQUERADE, now, &reason);
		if (!nat) {
			/* A flow that gets no port leaves no state of ours. */
			if (fresh)
				weir_ct_delete_flow(&key, e);
			return weir_drop_ctx(skb, ctx, reason);
		}
	}
	if (icmp) {
		if (masq_icmp_rewrite(skb, ctx, 1, nat->addr, sport, nat->port))
			return weir_drop_ctx(skb, ctx, WEIR_DROP_CSUM_REWRITE);
	} else if (weir_nat4(skb, ctx, 1, nat->addr, nat->port)) {
		return weir_drop_ctx(skb, ctx, WEIR_DROP_CSUM_REWRITE);
	}
	return weir_next(skb, ctx);
}

/* Tracks a connection from outside the cluster to a local pod (one whose
 * client masquerade would translate), so that the pod's answers keep the
 * pod's address: their conntrack entry is the REPLY of this one. */
WEIR_INLINE int masq_track_inbound(struct __sk_buff *skb, struct weir_ctx *ctx)
{
	struct weir_ipcache_entry *dst;
	struct weir_ct_entry o = {}, *e;
	struct weir_ct_key key;
	__u32 now, reason = WEIR_DROP_CT_CREATE;

	if (ctx->proto != IPPROTO_TCP && ctx->proto != IPPROTO_UDP)
		return weir_next(skb, ctx);
	dst = weir_ipcache_lookup(ctx->daddr);
	if (!dst || !(dst->flags & WEIR_IPCACHE_LOCAL_POD) || masq_keeps(ctx->saddr))
		return weir_next(skb, ctx);
	now = weir_now_sec();
	weir_ct_key_set(&key, ctx->saddr, ctx->daddr, ctx->sport, ctx->dport, ctx->proto);
	e = bpf_map_lookup_elem(&weir_ct, &key);
	if (e && !weir_ct_expired(e, now)) {
		if (e->dir == WEIR_CT_ORIG && !e->rev_nat)
			weir_ct_touch(&key, e, ctx->tcp_flags, skb->len, now);
		return weir_next(skb, ctx);
	}
	if (ctx->proto == IPPROTO_TCP && !weir_tcp_bare_syn(ctx->tcp_flags))
		return weir_next(skb, ctx);
	if (e)
		weir_ct_delete_flow(&key, e);
	o.nat_saddr = ctx->saddr;
	o.nat_daddr = ctx->daddr;
	o.nat_sport = ctx->sport;
	o.nat_dport = ctx->dport;
	if (!weir_ct_create(&key, &o, ctx->tcp_flags, skb->len, now, &reason))
		return weir_drop_ctx(skb, ctx, reason);
	return weir_next(skb, ctx);
}

/* netdev-ingress/masquerade: replies to a masqueraded flow get the pod
 * back as their destination and go on to delivery; connections from
 * outside to a pod are tracked so that its answers are not masqueraded. */
SEC("tc")
int masq_ingress(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	struct weir_nat_entry *in;
	struct weir_ct_entry *e;
	struct weir_ct_key key;
	__be16 sport = ctx->sport, dport = ctx->dport;
	__u8 type = 0;
	int icmp = ctx->proto == IPPROTO_ICMP;

	if (ctx->l3 != WEIR_L3_IPV4 || (ctx->flags & WEIR_CTX_FRAGMENT) ||
	    (ctx->proto != IPPROTO_TCP && ctx->proto != IPPROTO_UDP && !icmp))
		return weir_next(skb, ctx);
	if (ctx->daddr != masq_node_ip)
		return masq_track_inbound(skb, ctx);
	if (icmp) {
		if (masq_icmp(skb, ctx, &type, &dport) || type != ICMP_ECHOREPLY)
			return weir_next(skb, ctx);
		sport = 0;
	}
	in = weir_snat_in(ctx->saddr, ctx->daddr, sport, dport, ctx->proto);
	if (!in || in->owner != WEIR_NAT_MASQUERADE)
		return weir_next(skb, ctx);
	if (icmp) {
		if (masq_icmp_rewrite(skb, ctx, 0, in->addr, dport, in->port))
			return weir_drop_ctx(skb, ctx, WEIR_DROP_CSUM_REWRITE);
		weir_ct_key_set(&key, ctx->saddr, ctx->daddr, 0, in->port, ctx->proto);
		e = bpf_map_lookup_elem(&weir_ct, &key);
		if (e && e->dir == WEIR_CT_REPLY)
			weir_ct_touch(&key, e, 0, skb->len, weir_now_sec());
	} else if (weir_nat4(skb, ctx, 0, in->addr, in->port)) {
		return weir_drop_ctx(skb, ctx, WEIR_DROP_CSUM_REWRITE);
	}
	return weir_next(skb, ctx);
}

char __license[] SEC("license") = "Dual BSD/GPL";
