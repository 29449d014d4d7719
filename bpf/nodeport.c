// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The nodeport module: services reached from outside the cluster (NodePort
 * on the node's addresses, load-balancer IPs, external IPs) are served on
 * the uplink's ingress. A backend on this node gets the packet directly,
 * with the client's address; one on another node gets it over the node's
 * forwarding mode with the source translated to this node (SNAT, weir_nat),
 * so its replies come back here to be translated back.
 */
#define WEIR_MAGLEV
#include "weir/ct.h"
#include "weir/fwd.h"
#include "weir/icmp.h"
#include "weir/lb.h"
#include "weir/snat.h"

/* How flows to backends on other nodes are dispatched (the module that
 * loads this object): with the node as source (SNAT), or by DSR, the
 * service address travelling with the request and the backend's node
 * answering the client directly. */
#define NODEPORT_SNAT 0
#define NODEPORT_DSR_OPTION 1
#define NODEPORT_DSR_IPIP 2

#ifndef IPPROTO_IPIP
#define IPPROTO_IPIP 4
#endif
/* The outer header of DSR by IP-in-IP. */
#define IPIP_HLEN 20


/* The DSR IPv4 option (Cilium's layout): copied, class 0, number 26. */
#define DSR_OPT_TYPE 0x9a
#define DSR_OPT_LEN 8

struct dsr_opt {
	__u8 type;
	__u8 len;
	__be16 port; /* the service's, as the client called it */
	__be32 addr;
} __attribute__((packed));

/* Load-time settings (modules/nodeport, modules/dsr-*). */
volatile const __u32 nodeport_dispatch = NODEPORT_SNAT;
/* Protocols dispatched by DSR (bit 0 TCP, bit 1 UDP): the module's mode
 * (dsr: both; hybrid: TCP only). The rest use SNAT. */
volatile const __u32 nodeport_dsr_protos = 0;
/* DSR by IP-in-IP: outer sources from this network (host bits from the
 * flow's hash), so the backend's node spreads flows over its receive
 * queues; a zero mask: the node's own address. Network order. */
volatile const __be32 nodeport_ipip_src_net = 0;
volatile const __be32 nodeport_ipip_src_hostmask = 0;
/* 1: backends are chosen by Maglev (weir_maglev), else at random. */
volatile const __u32 nodeport_maglev = 0;
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

/* A flow's hash for Maglev, the same on every node: the client's address
 * and port, the port called and the protocol, not the address called
 * (NodePorts are called at each node's own). */
WEIR_INLINE __u32 nodeport_flow_hash(const struct weir_ctx *ctx)
{
	__u32 h = ctx->saddr;

	h ^= ((__u32)ctx->sport << 16 | ctx->dport) * 0x9e3779b1;
	h ^= (__u32)ctx->proto << 24;
	/* murmur3's finaliser */
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* The backend Maglev's table of the frontend gives the flow, or 0. */
WEIR_INLINE __u32 nodeport_maglev_pick(const struct weir_ctx *ctx, const struct weir_svc_val *svc)
{
	__u32 rev_nat = svc->rev_nat, idx;
	void *table;
	__u32 *id;

	if (!nodeport_maglev)
		return 0;
	table = bpf_map_lookup_elem(&weir_maglev, &rev_nat);
	if (!table)
		return 0;
	idx = nodeport_flow_hash(ctx) % WEIR_MAGLEV_M;
	id = bpf_map_lookup_elem(table, &idx);
	return id ? *id : 0;
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

/* Whether a new flow of proto to the frontend svc goes by DSR: the
 * service's own mode if it has one, else the pool's (the module's). */
WEIR_INLINE int nodeport_uses_dsr(__u8 proto, const struct weir_svc_val *svc)
{
	if (nodeport_dispatch == NODEPORT_SNAT || (svc->flags2 & WEIR_SVC_F2_MODE_SNAT))
		return 0;
	if (svc->flags2 & WEIR_SVC_F2_MODE_DSR)
		return proto == IPPROTO_TCP || proto == IPPROTO_UDP;
	if (proto == IPPROTO_TCP)
		return nodeport_dsr_protos & 1;
	return proto == IPPROTO_UDP && (nodeport_dsr_protos & 2);
}

/* Whether a packet of a DSR flow carries the service address: the TCP
 * SYN (the backend's node learns the flow from it), every UDP datagram. */
WEIR_INLINE int nodeport_dsr_carries(const struct weir_ctx *ctx)
{
	return ctx->proto == IPPROTO_UDP || weir_tcp_bare_syn(ctx->tcp_flags);
}

/* Whether the DSR option fits the path: a packet that would not gets
 * ICMP "fragmentation needed" with the room left (DF set) or is dropped
 * and counted. Returns -1 to go on, else a verdict. */
WEIR_INLINE int nodeport_dsr_mtu(struct __sk_buff *skb, struct weir_ctx *ctx)
{
	__u32 mtu = 0;
	__u8 frag;

	if (bpf_check_mtu(skb, 0, &mtu, DSR_OPT_LEN, 0) != BPF_MTU_CHK_RET_FRAG_NEEDED)
		return -1;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + 6, &frag, 1) == 0 && (frag & 0x40) && mtu > DSR_OPT_LEN + 68)
		return weir_icmp_frag_needed(skb, ctx, nodeport_node_ip, mtu - DSR_OPT_LEN);
	return weir_drop_ctx(skb, ctx, WEIR_DROP_FRAG_NEEDED);
}

/* Adds the DSR option with the service address addr:port after the IPv4
 * header (which has none), fixing IHL, the total length and the header
 * checksum; the L4 checksum does not cover them. */
WEIR_INLINE int nodeport_dsr_insert(struct __sk_buff *skb, struct weir_ctx *ctx, __be32 addr, __be16 port)
{
	struct dsr_opt opt = {.type = DSR_OPT_TYPE, .len = DSR_OPT_LEN, .port = port, .addr = addr};
	__be32 old_word, new_word;
	__u8 w[4]; /* version and IHL, TOS, total length */
	__u32 diff;

	if (ctx->l4_off != ETH_HLEN + sizeof(struct iphdr))
		return -1;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, w, sizeof(w)))
		return -1;
	__builtin_memcpy(&old_word, w, sizeof(old_word));
	w[0] += DSR_OPT_LEN / 4;
	*(__be16 *)&w[2] = bpf_htons(bpf_ntohs(*(__be16 *)&w[2]) + DSR_OPT_LEN);
	__builtin_memcpy(&new_word, w, sizeof(new_word));
	if (bpf_skb_adjust_room(skb, DSR_OPT_LEN, BPF_ADJ_ROOM_NET, BPF_F_ADJ_ROOM_FIXED_GSO))
		return -1;
	if (bpf_l3_csum_replace(skb, WEIR_IP_CSUM_OFF, old_word, new_word, sizeof(new_word)))
		return -1;
	diff = bpf_csum_diff(NULL, 0, (__be32 *)&opt, sizeof(opt), 0);
	if (bpf_l3_csum_replace(skb, WEIR_IP_CSUM_OFF, 0, diff, 0))
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, w, sizeof(w), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(struct iphdr), &opt, sizeof(opt), 0))
		return -1;
	ctx->l4_off += DSR_OPT_LEN;
	return 0;
}

/*
 * On the backend's node: a request carrying the DSR option for a local
 * pod starts (or refreshes) a conntrack entry keyed by the tuple the
 * client sent, whose REPLY half sends the pod's answers to the client
 * from the service address. Returns -1 to go on, else a verdict.
 */
/* A client's FIN or RST of a DSR flow (no option) to a local pod: it
 * reaches the flow's entry, found through the pod's side, so a closed
 * flow's entries expire on the closed flow's timers. Other segments need
 * nothing here (the pod's replies keep the entries alive), and pod traffic
 * arriving from other nodes pays no lookup for them. */
WEIR_INLINE void nodeport_dsr_follow(const struct weir_ctx *ctx, __u32 len, __u32 now)
{
	struct weir_endpoint_key ep = {.addr = ctx->daddr};
	struct weir_ct_entry *r, *o;
	struct weir_ct_key rk, ok;

	if (!bpf_map_lookup_elem(&weir_endpoints, &ep))
		return;
	weir_ct_key_set(&rk, ctx->daddr, ctx->saddr, ctx->dport, ctx->sport, ctx->proto);
	r = bpf_map_lookup_elem(&weir_ct, &rk);
	if (!r || r->dir != WEIR_CT_REPLY || !(r->flags & WEIR_CT_F_DSR))
		return;
	weir_ct_twin_key(&ok, r, ctx->proto);
	o = bpf_map_lookup_elem(&weir_ct, &ok);
	if (o && o->dir == WEIR_CT_ORIG && (o->flags & WEIR_CT_F_DSR) && !weir_ct_expired(o, now))
		weir_ct_touch(&ok, o, ctx->tcp_flags, len, now);
}

WEIR_INLINE int nodeport_dsr_receive(struct __sk_buff *skb, struct weir_ctx *ctx, __u32 now)
{
	struct weir_endpoint_key ep = {.addr = ctx->daddr};
	struct weir_ct_entry o = {}, *e;
	struct weir_ct_key key;
	struct dsr_opt opt;
	__u32 reason = WEIR_DROP_CT_CREATE;

	if (ctx->l4_off == ETH_HLEN + sizeof(struct iphdr)) {
		if (ctx->proto == IPPROTO_TCP && (ctx->tcp_flags & (WEIR_TCP_FIN | WEIR_TCP_RST)))
			nodeport_dsr_follow(ctx, skb->len, now);
		return -1;
	}
	if (ctx->l4_off < ETH_HLEN + sizeof(struct iphdr) + DSR_OPT_LEN ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(struct iphdr), &opt, sizeof(opt)) ||
	    opt.type != DSR_OPT_TYPE || opt.len != DSR_OPT_LEN || !bpf_map_lookup_elem(&weir_endpoints, &ep))
		return -1;
	weir_ct_key_set(&key, ctx->saddr, opt.addr, ctx->sport, opt.port, ctx->proto);
	e = bpf_map_lookup_elem(&weir_ct, &key);
	if (e && e->dir == WEIR_CT_ORIG && (e->flags & WEIR_CT_F_DSR) && !weir_ct_expired(e, now) &&
	    !weir_ct_reopens(e, ctx->proto, ctx->tcp_flags) && e->nat_daddr == ctx->daddr && e->nat_dport == ctx->dport) {
		weir_ct_touch(&key, e, ctx->tcp_flags, skb->len, now);
		return weir_next(skb, ctx);
	}
	if (e)
		weir_ct_delete_flow(&key, e);
	o.nat_saddr = ctx->saddr;
	o.nat_sport = ctx->sport;
	o.nat_daddr = ctx->daddr;
	o.nat_dport = ctx->dport;
	o.flags = WEIR_CT_F_NODEPORT | WEIR_CT_F_DSR;
	if (!weir_ct_create_dsr(&key, &o, 1, ctx->tcp_flags, skb->len, now, &reason))
		return weir_drop_ctx(skb, ctx, reason);
	return weir_next(skb, ctx);
}

/* The frontend a DSR request was addressed to, as the backend's node
 * sees it: a load-balancer or external IP, or a NodePort on one of the
 * receiving node's addresses (whichever: the request came from a node). */
WEIR_INLINE struct weir_svc_val *nodeport_dsr_frontend(struct weir_svc_key *k, __be32 addr, __be16 port, __u8 proto)
{
	struct weir_svc_val *svc = weir_lb_lookup(k, addr, port, proto, 0);

	if (svc)
		return svc->type == WEIR_SVC_CLUSTER_IP ? NULL : svc;
	svc = weir_lb_lookup(k, 0, port, proto, 0);
	return svc && svc->type == WEIR_SVC_NODE_PORT ? svc : NULL;
}

/* Sends a request of a DSR flow to its backend inside an outer IPv4
 * header (protocol 4) from this node to the backend's address, whose node
 * decapsulates it: the request itself is untouched, the client's address
 * and the address it called included. */
WEIR_INLINE int nodeport_ipip_send(struct __sk_buff *skb, struct weir_ctx *ctx, const struct weir_ct_entry *e)
{
	__u64 flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_FIXED_GSO;
	__u32 hash = nodeport_flow_hash(ctx);
	struct iphdr ip = {};
	__u32 mtu = 0;
	__u8 frag;
	int rc;

	if (bpf_check_mtu(skb, 0, &mtu, IPIP_HLEN, 0) == BPF_MTU_CHK_RET_FRAG_NEEDED) {
		if (!skb->gso_size && bpf_skb_load_bytes(skb, ETH_HLEN + 6, &frag, 1) == 0 && (frag & 0x40) &&
		    mtu > IPIP_HLEN + 68)
			return weir_icmp_frag_needed(skb, ctx, nodeport_node_ip, mtu - IPIP_HLEN);
		return weir_drop_ctx(skb, ctx, WEIR_DROP_FRAG_NEEDED);
	}
	if (bpf_skb_adjust_room(skb, IPIP_HLEN, BPF_ADJ_ROOM_MAC, flags))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_ENCAP);
	ip.version = 4;
	ip.ihl = 5;
	ip.tot_len = bpf_htons(skb->len - ETH_HLEN);
	/* The backend's port rides in the identification, free with DF
	 * (RFC 6864); the backend's node needs it only on a flow's first
	 * packet, never a GSO one whose segments would count it up. */
	ip.id = e->nat_dport;
	ip.frag_off = bpf_htons(0x4000); /* DF: the path MTU was checked */
	ip.ttl = 64;
	ip.protocol = IPPROTO_IPIP;
	ip.saddr = nodeport_node_ip;
	if (nodeport_ipip_src_hostmask)
		ip.saddr = nodeport_ipip_src_net | (bpf_htonl(hash) & nodeport_ipip_src_hostmask);
	ip.daddr = e->nat_daddr;
	ip.check = weir_csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&ip, sizeof(ip), 0));
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_ENCAP);
	/* The FIB routes the outer packet toward the backend's node. */
	ctx->saddr = ip.saddr;
	ctx->daddr = ip.daddr;
	ctx->proto = IPPROTO_IPIP;
	ctx->sport = ctx->dport = 0;
	ctx->l4_off = ETH_HLEN + IPIP_HLEN;
	rc = weir_fib_forward(skb, ctx);
	return rc >= 0 ? rc : weir_drop_ctx(skb, ctx, WEIR_DROP_NO_ROUTE);
}

/* Reads the request a decapsulated IP-in-IP packet carries into ctx.
 * Returns 0, or -1 for anything but an unfragmented TCP or UDP packet
 * with a plain IPv4 header. */
WEIR_INLINE int ipip_inner(struct __sk_buff *skb, struct weir_ctx *ctx)
{
	struct iphdr ip;
	__be16 ports[2];
	__u8 flags = 0;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.version != 4 || ip.ihl != 5 ||
	    (ip.frag_off & bpf_htons(0x3fff)) || (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP))
		return -1;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(ip), ports, sizeof(ports)))
		return -1;
	if (ip.protocol == IPPROTO_TCP && bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(ip) + 13, &flags, 1))
		return -1;
	ctx->saddr = ip.saddr;
	ctx->daddr = ip.daddr;
	ctx->proto = ip.protocol;
	ctx->sport = ports[0];
	ctx->dport = ports[1];
	ctx->tcp_flags = flags;
	ctx->l4_off = ETH_HLEN + sizeof(ip);
	ctx->ip_id = ip.id;
	ctx->flags &= WEIR_CTX_AT_INGRESS;
	ctx->len = skb->len;
	return 0;
}

/*
 * On the backend's node: an IP-in-IP request for a local pod loses its
 * outer header; the request inside, addressed to the service, goes to
 * that pod (the outer destination), and a conntrack entry keyed by the
 * tuple the client sent sends the pod's answers to the client from the
 * service address. Returns -1 to go on, else a verdict.
 */
WEIR_INLINE int nodeport_ipip_receive(struct __sk_buff *skb, struct weir_ctx *ctx, __u32 now)
{
	struct weir_backend_addr_key bk = {.addr = ctx->daddr, .port = ctx->ip_id};
	struct weir_endpoint_key ep = {.addr = ctx->daddr};
	struct weir_ipcache_entry *from = weir_ipcache_lookup(ctx->saddr);
	struct weir_ct_entry o = {}, *e;
	struct weir_svc_val *svc;
	struct weir_svc_key skey;
	struct weir_backend *be;
	struct weir_ct_key key;
	__be32 backend = ctx->daddr;
	__u32 reason = WEIR_DROP_CT_CREATE, *id;

	if (ctx->l4_off != ETH_HLEN + IPIP_HLEN || (ctx->flags & WEIR_CTX_FRAGMENT) ||
	    !bpf_map_lookup_elem(&weir_endpoints, &ep))
		return -1;
	/* Only a node of the cluster (or the network its outer sources come
	 * from) dispatches requests to local pods this way. */
	if (!(from && (from->flags & WEIR_IPCACHE_NODE)) &&
	    !(nodeport_ipip_src_hostmask && (ctx->saddr & ~nodeport_ipip_src_hostmask) == nodeport_ipip_src_net))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_DSR);
	if (bpf_skb_adjust_room(skb, -IPIP_HLEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_DECAP);
	/* What this stage needs of the request inside (a plain IPv4 header,
	 * TCP or UDP, not a fragment), read here: the full parser on top of
	 * conntrack would take the verifier past its budget. */
	if (ipip_inner(skb, ctx))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_DSR);
	weir_ct_key_set(&key, ctx->saddr, ctx->daddr, ctx->sport, ctx->dport, ctx->proto);
	e = bpf_map_lookup_elem(&weir_ct, &key);
	if (e && e->dir == WEIR_CT_ORIG && (e->flags & WEIR_CT_F_DSR) && !weir_ct_expired(e, now) &&
	    !weir_ct_reopens(e, ctx->proto, ctx->tcp_flags) && e->nat_daddr == backend) {
		weir_ct_touch(&key, e, ctx->tcp_flags, skb->len, now);
	} else {
		if (e)
			weir_ct_delete_flow(&key, e);
		svc = nodeport_dsr_frontend(&skey, ctx->daddr, ctx->dport, ctx->proto);
		bk.proto = ctx->proto;
		id = bpf_map_lookup_elem(&weir_backend_addrs, &bk);
		be = id ? bpf_map_lookup_elem(&weir_backends, id) : NULL;
		if (!svc || !be)
			return weir_drop_ctx(skb, ctx, WEIR_DROP_DSR);
		o.nat_saddr = ctx->saddr;
		o.nat_sport = ctx->sport;
		o.nat_daddr = be->addr;
		o.nat_dport = be->port;
		o.backend_id = *id;
		o.rev_nat = svc->rev_nat;
		o.flags = WEIR_CT_F_NODEPORT | WEIR_CT_F_DSR;
		/* This node sees every packet of the flow and sends its
		 * replies: a client port the pod's tuple cannot have is
		 * remapped on the way in and restored on the way out. */
		e = weir_ct_create(&key, &o, ctx->tcp_flags, skb->len, now, &reason);
		if (!e)
			return weir_drop_ctx(skb, ctx, reason);
	}
	if (weir_ct_apply(skb, ctx, e))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_CSUM_REWRITE);
	return weir_next(skb, ctx);
}

/* A packet of a flow from outside leaves as its conntrack entry says
 * (the backend as destination), and with the node as source when the
 * backend is elsewhere. */
WEIR_INLINE int nodeport_leave(struct __sk_buff *skb, struct weir_ctx *ctx, const struct weir_ct_key *key,
				struct weir_ct_entry *e, int fresh, __u32 now)
{
	struct weir_nat_entry *nat;
	__u32 reason = WEIR_DROP_CT_CREATE;

	/* A DSR flow that reaches its backend's own node (an ECMP rehash, a
	 * drained node): delivered here. */
	if (e->flags & WEIR_CT_F_DSR) {
		struct weir_endpoint_key lep = {.addr = e->nat_daddr};

		if (bpf_map_lookup_elem(&weir_endpoints, &lep)) {
			if (weir_ct_apply(skb, ctx, e))
				return weir_drop_ctx(skb, ctx, WEIR_DROP_CSUM_REWRITE);
			return weir_next(skb, ctx);
		}
	}
	if ((e->flags & WEIR_CT_F_DSR) && nodeport_dispatch == NODEPORT_DSR_IPIP) {
		if (ctx->proto == IPPROTO_TCP && !(ctx->tcp_flags & WEIR_TCP_SYN) && !(e->flags & WEIR_CT_F_ESTABLISHED))
			weir_ct_change(e, WEIR_CT_F_SEEN_REPLY | WEIR_CT_F_ESTABLISHED, 0, key->proto, now);
		return nodeport_ipip_send(skb, ctx, e);
	}
	if (e->flags & WEIR_CT_F_DSR) {
		int carries = nodeport_dsr_carries(ctx), rc;

		if (carries && (rc = nodeport_dsr_mtu(skb, ctx)) >= 0)
			return rc;
		/* The client answers the backend's SYN-ACK only once it came:
		 * the flow is established although this node never sees the
		 * replies (without this it would live as a SYN). */
		if (ctx->proto == IPPROTO_TCP && !(ctx->tcp_flags & WEIR_TCP_SYN) && !(e->flags & WEIR_CT_F_ESTABLISHED))
			weir_ct_change(e, WEIR_CT_F_SEEN_REPLY | WEIR_CT_F_ESTABLISHED, 0, key->proto, now);
		if (weir_ct_apply(skb, ctx, e))
			return weir_drop_ctx(skb, ctx, WEIR_DROP_CSUM_REWRITE);
		if (carries && nodeport_dsr_insert(skb, ctx, key->daddr, key->dport))
			return weir_drop_ctx(skb, ctx, WEIR_DROP_DSR);
		return nodeport_forward(skb, ctx);
	}
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
	/* Every member of the dispatch group takes requests other nodes
	 * send by DSR: the pools of a cluster may dispatch differently. */
	{
		int rc = nodeport_dsr_receive(skb, ctx, now);

		if (rc >= 0)
			return rc;
	}

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
	if (weir_lb_choose_pref(&skey, svc, ctx->saddr, now, &o, nodeport_maglev_pick(ctx, svc)))
		return (svc->flags2 & WEIR_SVC_F2_REJECT) ? weir_reject(skb, ctx)
							  : weir_drop_ctx(skb, ctx, WEIR_DROP_NO_BACKEND);
	o.nat_saddr = ctx->saddr;
	o.nat_sport = ctx->sport;
	o.flags = WEIR_CT_F_NODEPORT;
	ep.addr = o.nat_daddr;
	if (!bpf_map_lookup_elem(&weir_endpoints, &ep))
		o.flags |= nodeport_uses_dsr(ctx->proto, svc) ? WEIR_CT_F_DSR : WEIR_CT_F_SNAT;
	if (o.flags & WEIR_CT_F_DSR)
		e = weir_ct_create_dsr(&key, &o, 0, ctx->tcp_flags, skb->len, now, &reason);
	else
		e = weir_ct_create(&key, &o, ctx->tcp_flags, skb->len, now, &reason);
	if (!e)
		return weir_drop_ctx(skb, ctx, reason);
	return nodeport_leave(skb, ctx, &key, e, 1, now);
}

/* netdev-ingress/dsr-receive (dsr-ipip): IP-in-IP requests for local
 * pods are decapsulated and translated to their backend here, in a stage
 * of their own (the verifier checks it apart from the dispatch stage);
 * the dispatch stage then lets them through to delivery. */
SEC("tc")
int nodeport_dsr_decap(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	int rc;

	if (ctx->l3 != WEIR_L3_IPV4 || ctx->proto != IPPROTO_IPIP)
		return weir_next(skb, ctx);
	rc = nodeport_ipip_receive(skb, ctx, weir_now_sec());
	return rc >= 0 ? rc : weir_next(skb, ctx);
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
