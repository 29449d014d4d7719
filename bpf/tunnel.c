// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The tunnel module: pod traffic to another node is encapsulated in VXLAN
 * or Geneve toward the owning node and decapsulated there, both here in BPF
 * (the kernel needs no tunnel device, nor a geneve module). Peers that do not
 * tunnel the same way are reached natively.
 */
#include "weir/fwd.h"
#include "weir/icmp.h"

/* Load-time settings (modules/tunnel). */
volatile const __be32 tunnel_node_ip = 0;
volatile const __be16 tunnel_port = 0;
volatile const __u32 tunnel_geneve = 0; /* 0: VXLAN, 1: Geneve */
volatile const __u32 tunnel_vni = 1;
volatile const __u32 tunnel_uplink = 0; /* ifindex */

#define VXLAN_FLAG_VNI 0x08000000
#define GENEVE_PROTO_TEB 0x6558
/* Outer IPv4 + UDP + tunnel header + inner Ethernet. */
#define TUNNEL_OVERHEAD (20 + 8 + 8 + ETH_HLEN)
#define GENEVE_OPTS_MAX 252

struct tunnel_hdr {
	struct iphdr ip;
	struct udphdr udp;
	__be32 word0; /* VXLAN flags, or Geneve ver/len/flags/protocol */
	__be32 word1; /* VNI << 8 */
	struct ethhdr inner;
} __attribute__((packed));

WEIR_INLINE int tunnel_encap(struct __sk_buff *skb, struct weir_ctx *ctx, __be32 remote)
{
	__u64 flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH |
		      BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN) |
		      /* the inner MSS is what it was: segments just grow headers */
		      BPF_F_ADJ_ROOM_FIXED_GSO;
	struct bpf_redir_neigh nh = {};
	struct tunnel_hdr h = {};
	struct iphdr ip = {};
	__u16 sport;
	__u32 hash;

	if (bpf_skb_load_bytes(skb, 0, &h.inner, sizeof(h.inner)))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_ENCAP);
	/* Spread flows over ECMP paths: the source port follows the flow. */
	hash = bpf_get_hash_recalc(skb);
	sport = 49152 + (hash % 16384);
	if (bpf_skb_adjust_room(skb, TUNNEL_OVERHEAD, BPF_ADJ_ROOM_MAC, flags))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_ENCAP);

	ip.version = 4;
	ip.ihl = 5;
	ip.tot_len = bpf_htons(skb->len - ETH_HLEN);
	/* The pod MTU leaves room for the headers: never fragment outside. */
	ip.frag_off = bpf_htons(0x4000);
	ip.ttl = 64;
	ip.protocol = IPPROTO_UDP;
	ip.saddr = tunnel_node_ip;
	ip.daddr = remote;
	ip.check = weir_csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&ip, sizeof(ip), 0));
	__builtin_memcpy(&h.ip, &ip, sizeof(ip));
	h.udp.source = bpf_htons(sport);
	h.udp.dest = tunnel_port;
	h.udp.len = bpf_htons(skb->len - ETH_HLEN - sizeof(struct iphdr));
	/* A zero UDP checksum: allowed for VXLAN and Geneve over IPv4, and the
	 * inner packet keeps its own. */
	if (tunnel_geneve)
		h.word0 = bpf_htonl(GENEVE_PROTO_TEB);
	else
		h.word0 = bpf_htonl(VXLAN_FLAG_VNI);
	h.word1 = bpf_htonl(tunnel_vni << 8);
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &h, sizeof(h), 0))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_ENCAP);

	nh.nh_family = AF_INET;
	nh.ipv4_nh = remote;
	weir_count(ctx->hook, WEIR_REASON_PASS, skb->len);
	/* The uplink's egress entry lets it go without a second look. */
	weir_set_mark(skb, WEIR_MARK_FORWARDED);
	return bpf_redirect_neigh(tunnel_uplink, &nh, sizeof(nh), 0);
}

/* Whether the packet, once encapsulated, exceeds the uplink's MTU (read
 * now: the path may have shrunk since the pod got its MTU). A GSO packet
 * is cut into segments later; each must fit. *mtu gets the uplink's. */
WEIR_INLINE int tunnel_too_big(struct __sk_buff *skb, struct weir_ctx *ctx, __u32 *mtu)
{
	__u32 seg;
	__u8 doff;
	long rc;

	*mtu = 0;
	rc = bpf_check_mtu(skb, tunnel_uplink, mtu, TUNNEL_OVERHEAD, 0);
	if (rc < 0)
		return 0;
	if (!skb->gso_size)
		return rc == BPF_MTU_CHK_RET_FRAG_NEEDED;
	seg = (ctx->l4_off - ETH_HLEN) + skb->gso_size;
	if (ctx->proto == IPPROTO_TCP && bpf_skb_load_bytes(skb, (ctx->l4_off & 0x7f) + 12, &doff, 1) == 0)
		seg += (doff >> 4) * 4;
	return seg + TUNNEL_OVERHEAD > *mtu;
}

/* pod-egress/forward: to a pod on another node, or to the address of a
 * node this one tunnels to. */
SEC("tc")
int tunnel_forward(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	struct weir_ipcache_entry *e;
	__be32 remote;
	__u32 mtu;
	__u8 frag;
	int rc;

	if (ctx->l3 != WEIR_L3_IPV4)
		return weir_next(skb, ctx);
	e = weir_ipcache_lookup(ctx->daddr);
	if (!e || (!(e->flags & WEIR_IPCACHE_REMOTE_POD) &&
		   (e->flags & (WEIR_IPCACHE_NODE | WEIR_IPCACHE_ENCAP)) != (WEIR_IPCACHE_NODE | WEIR_IPCACHE_ENCAP)))
		return weir_next(skb, ctx);
	remote = e->node_ip;
	if (!(e->flags & WEIR_IPCACHE_ENCAP)) {
		rc = weir_fib_forward(skb, ctx);
		return rc >= 0 ? rc : weir_next(skb, ctx);
	}
	/* Too big for the path once encapsulated: the sender hears of it
	 * (DF set), or the packet is dropped and counted (no DF: BPF cannot
	 * fragment, and the pod's MTU normally prevents this). A GSO packet
	 * cannot become an ICMP error; TCP resends one segment, which can. */
	if (tunnel_too_big(skb, ctx, &mtu)) {
		if (!skb->gso_size && bpf_skb_load_bytes(skb, ETH_HLEN + 6, &frag, 1) == 0 && (frag & 0x40) &&
		    mtu > TUNNEL_OVERHEAD + 68)
			return weir_icmp_frag_needed(skb, ctx, tunnel_node_ip, mtu - TUNNEL_OVERHEAD);
		return weir_drop_ctx(skb, ctx, WEIR_DROP_FRAG_NEEDED);
	}
	return tunnel_encap(skb, ctx, remote);
}

/* netdev-egress/tunnel: the node's own packets to pods of other nodes,
 * routed out of the uplink toward the peer (core/ipcache installs those
 * routes, with the MTU less the encapsulation), are encapsulated here. */
SEC("tc")
int tunnel_host_egress(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	struct weir_ipcache_entry *e;
	__u32 mtu;

	if (ctx->l3 != WEIR_L3_IPV4)
		return weir_next(skb, ctx);
	e = weir_ipcache_lookup(ctx->daddr);
	if (!e || (e->flags & (WEIR_IPCACHE_REMOTE_POD | WEIR_IPCACHE_ENCAP)) != (WEIR_IPCACHE_REMOTE_POD | WEIR_IPCACHE_ENCAP))
		return weir_next(skb, ctx);
	if (tunnel_too_big(skb, ctx, &mtu))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_FRAG_NEEDED);
	return tunnel_encap(skb, ctx, e->node_ip);
}

/* netdev-ingress/tunnel: tunnel packets for this node lose their outer
 * headers and continue as the pod packet they carry. */
SEC("tc")
int tunnel_decap(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	__u32 off, hdrlen, reason;
	__be32 words[2];
	struct ethhdr inner;

	if (ctx->l3 != WEIR_L3_IPV4 || ctx->proto != IPPROTO_UDP || ctx->dport != tunnel_port ||
	    ctx->daddr != tunnel_node_ip || (ctx->flags & WEIR_CTX_FRAGMENT))
		return weir_next(skb, ctx);
	off = (ctx->l4_off & 0x7f) + sizeof(struct udphdr);
	if (bpf_skb_load_bytes(skb, off, words, sizeof(words)))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_TUNNEL_MALFORMED);
	hdrlen = 8;
	if (tunnel_geneve) {
		__u32 w0 = bpf_ntohl(words[0]);

		/* Version 0, Ethernet payload; options are skipped. */
		if ((w0 >> 30) != 0 || (w0 & 0xffff) != GENEVE_PROTO_TEB)
			return weir_drop_ctx(skb, ctx, WEIR_DROP_TUNNEL_MALFORMED);
		hdrlen += ((w0 >> 24) & 0x3f) * 4;
	} else if (!(bpf_ntohl(words[0]) & VXLAN_FLAG_VNI)) {
		return weir_drop_ctx(skb, ctx, WEIR_DROP_TUNNEL_MALFORMED);
	}
	if ((bpf_ntohl(words[1]) >> 8) != tunnel_vni)
		return weir_drop_ctx(skb, ctx, WEIR_DROP_TUNNEL_MALFORMED);
	if (bpf_skb_load_bytes(skb, (off + hdrlen) & 0x1ff, &inner, sizeof(inner)))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_TUNNEL_MALFORMED);
	if (inner.h_proto != bpf_htons(ETH_P_IP))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_UNSUPPORTED_L3);
	/* Outer IP, UDP, tunnel header and inner Ethernet go; the outer
	 * Ethernet header stays in front of the inner IP packet. */
	if (bpf_skb_adjust_room(skb, -(__s32)(off - ETH_HLEN + hdrlen + ETH_HLEN), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO))
		return weir_drop_ctx(skb, ctx, WEIR_DROP_DECAP);
	reason = weir_reparse(skb, ctx);
	if (reason != WEIR_REASON_PASS)
		return weir_drop_ctx(skb, ctx, reason);
	return weir_next(skb, ctx);
}

char __license[] SEC("license") = "Dual BSD/GPL";
