// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The endpoints module: answers a pod's ARP for its link-local gateway,
 * hands packets for local pods to the pod-ingress stages, and delivers them
 * into the pod's namespace with bpf_redirect_peer.
 */
#include "weir/parse.h"
#include "weir/nat.h"
#include "weir/stage.h"

/* The pods' default gateway, answered here rather than by any address. */
volatile const __be32 endpoints_gateway_ip = 0;

/* pod-egress/arp: reply to "who has <gateway>" from a known pod with the MAC
 * of the pod's host-side interface, straight back out of that interface. */
SEC("tc")
int endpoints_arp(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	struct weir_endpoint_key key = {};
	struct weir_endpoint *ep;
	struct {
		struct ethhdr eth;
		struct weir_arp arp;
	} __attribute__((packed)) reply = {};
	struct weir_arp req;

	if (ctx->l3 != WEIR_L3_ARP)
		return weir_next(skb, ctx);
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &req, sizeof(req)))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_ARP_MALFORMED);
	if (req.op != bpf_htons(ARPOP_REQUEST) || req.tpa != endpoints_gateway_ip)
		return weir_next(skb, ctx);
	key.addr = req.spa;
	ep = bpf_map_lookup_elem(&weir_endpoints, &key);
	/* Only a pod asking from its own interface gets an answer. */
	if (!ep || ep->ifindex != ctx->ifindex)
		return weir_next(skb, ctx);

	__builtin_memcpy(reply.eth.h_dest, req.sha, ETH_ALEN);
	__builtin_memcpy(reply.eth.h_source, ep->node_mac, ETH_ALEN);
	reply.eth.h_proto = bpf_htons(ETH_P_ARP);
	reply.arp.htype = bpf_htons(ARPHRD_ETHER);
	reply.arp.ptype = bpf_htons(ETH_P_IP);
	reply.arp.hlen = ETH_ALEN;
	reply.arp.plen = 4;
	reply.arp.op = bpf_htons(ARPOP_REPLY);
	__builtin_memcpy(reply.arp.sha, ep->node_mac, ETH_ALEN);
	reply.arp.spa = req.tpa;
	__builtin_memcpy(reply.arp.tha, req.sha, ETH_ALEN);
	reply.arp.tpa = req.spa;
	if (bpf_skb_store_bytes(skb, 0, &reply, sizeof(reply), 0))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_ARP_MALFORMED);
	weir_count(ctx->hook, WEIR_REASON_PASS, skb->len);
	return bpf_redirect(ctx->ifindex, 0);
}

/* pod-egress/local: a packet for a pod on this node continues in the
 * pod-ingress stages (reverse NAT, delivery). */
SEC("tc")
int endpoints_local(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	struct weir_endpoint_key key = {};
	struct weir_endpoint *ep;

	if (ctx->l3 != WEIR_L3_IPV4)
		return weir_next(skb, ctx);
	key.addr = ctx->daddr;
	ep = bpf_map_lookup_elem(&weir_endpoints, &key);
	if (!ep)
		return weir_next(skb, ctx);
	ctx->dst_ifindex = ep->ifindex;
	return weir_enter_hook(skb, ctx, WEIR_HOOK_POD_INGRESS);
}

/* pod-ingress/deliver: packets Weir routes (seen at tc ingress) go straight
 * into the pod's namespace, skipping the host stack; packets the host stack
 * already routed to the pod's veth go on as they are. */
SEC("tc")
int endpoints_deliver(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	struct weir_endpoint_key key = {};
	struct weir_endpoint *ep;
	int err;

	if (ctx->l3 != WEIR_L3_IPV4 || !(ctx->flags & WEIR_CTX_AT_INGRESS))
		return weir_next(skb, ctx);
	key.addr = ctx->daddr;
	ep = bpf_map_lookup_elem(&weir_endpoints, &key);
	if (!ep)
		return weir_next(skb, ctx);

	err = weir_ttl_dec(skb);
	if (err == -1)
		return weir_drop_ctx(skb, ctx, WEIR_DROP_TTL_EXCEEDED);
	if (err)
		return weir_drop_ctx(skb, ctx, WEIR_DROP_CSUM_REWRITE);
	if (bpf_skb_store_bytes(skb, 0, ep->mac, ETH_ALEN, 0) ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, ep->node_mac, ETH_ALEN, 0))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_REDIRECT);
	weir_count(ctx->hook, WEIR_REASON_PASS, skb->len);
	return bpf_redirect_peer(ep->ifindex, 0);
}

char __license[] SEC("license") = "Dual BSD/GPL";
