// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The socketlb module: service load balancing at the socket, once per
 * connection instead of once per packet. connect() of a TCP or UDP socket
 * to a service frontend goes to a backend instead (the socket never sends a
 * packet to the frontend, so the per-packet lb never sees the flow);
 * unconnected UDP is translated at every sendmsg(), and recvmsg() and
 * getpeername() answer with the frontend, from a record in the socket's
 * own storage. Same service, backend and policy maps as lb (lb.h).
 */
#include "weir/lb.h"

#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#endif

/* The errno a socket gets for a frontend without backends: what a kernel
 * REJECT answers with, so clients fail at once. */
#define SOCKETLB_NO_BACKEND_ERRNO 111 /* ECONNREFUSED */
/* The errno of a bind() to a service frontend's address and port. */
#define SOCKETLB_BIND_ERRNO 98 /* EADDRINUSE */

/* hostNamespaceOnly: translate only the sockets of the node's own network
 * namespace (its cookie); pods fall to the per-packet lb. */
volatile const __u8 socketlb_host_only = 0;
volatile const __u64 socketlb_host_netns = 0;

/* The protocol of a socket type socket LB serves, or 0. */
WEIR_INLINE __u8 socketlb_proto(__u32 type)
{
	if (type == SOCK_STREAM)
		return IPPROTO_TCP;
	if (type == SOCK_DGRAM)
		return IPPROTO_UDP;
	return 0;
}

WEIR_INLINE int socketlb_skip(void *ctx)
{
	return socketlb_host_only && bpf_get_netns_cookie(ctx) != socketlb_host_netns;
}

/* Records on the socket that its peer backend:port stands for the
 * frontend svc:port, reusing the frontend's slot when it has one. */
WEIR_INLINE void socketlb_remember(struct bpf_sock_addr *ctx, __be32 svc_addr, __be16 svc_port, __u32 rev_nat,
				   const struct weir_backend *be)
{
	struct weir_sock_rev_state *rev;
	__u32 i, slot;

	if (!ctx->sk)
		return;
	rev = bpf_sk_storage_get(&weir_sock_rev, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!rev)
		return;
	slot = rev->next % WEIR_SOCK_REV_SLOTS;
	for (i = 0; i < WEIR_SOCK_REV_SLOTS; i++) {
		if (rev->e[i].rev_nat == rev_nat) {
			slot = i;
			break;
		}
	}
	if (slot == rev->next % WEIR_SOCK_REV_SLOTS)
		rev->next = slot + 1;
	rev->e[slot].backend_addr = be->addr;
	rev->e[slot].backend_port = be->port;
	rev->e[slot].svc_addr = svc_addr;
	rev->e[slot].svc_port = svc_port;
	rev->e[slot].rev_nat = rev_nat;
}

/* Translates the destination of a connect or sendmsg. Returns 1 to let the
 * call go on, 0 (with the errno set) to fail it. */
WEIR_INLINE int socketlb_translate(struct bpf_sock_addr *ctx, int per_socket)
{
	__be32 addr = ctx->user_ip4;
	__be16 port = (__be16)ctx->user_port;
	struct weir_sock_affinity_key akey = {};
	struct weir_affinity_entry aval = {};
	struct weir_backend *be = NULL;
	struct weir_svc_val *svc;
	struct weir_svc_key key;
	__u32 backend_id = 0, now;
	__u8 proto;

	if (ctx->user_family != 2 /* AF_INET */ || socketlb_skip(ctx))
		return 1;
	proto = socketlb_proto(ctx->type);
	if (!proto || (ctx->protocol && ctx->protocol != proto))
		return 1;
	/* Sockets are in-cluster clients: the internal traffic policy holds. */
	svc = weir_lb_lookup(&key, addr, port, proto, 1);
	if (!svc)
		return 1;
	if (svc->count == 0) {
		bpf_set_retval(-SOCKETLB_NO_BACKEND_ERRNO);
		return 0;
	}
	now = weir_now_sec();
	if (svc->flags2 & WEIR_SVC_F2_AFFINITY) {
		akey.netns_cookie = bpf_get_netns_cookie(ctx);
		akey.rev_nat = svc->rev_nat;
		be = weir_lb_affinity_check(svc, bpf_map_lookup_elem(&weir_sock_affinity, &akey), now, &backend_id);
	}
	if (!be) {
		/* A UDP socket sticks to one backend per service, so every
		 * datagram of a resolver's socket reaches the same server. */
		__u32 hash = per_socket ? (__u32)bpf_get_socket_cookie(ctx) : bpf_get_prandom_u32();

		be = weir_lb_pick_by(&key, svc, hash, &backend_id);
	}
	if (!be) {
		bpf_set_retval(-SOCKETLB_NO_BACKEND_ERRNO);
		return 0;
	}
	if (svc->flags2 & WEIR_SVC_F2_AFFINITY) {
		aval.backend_id = backend_id;
		aval.last_used = now;
		bpf_map_update_elem(&weir_sock_affinity, &akey, &aval, BPF_ANY);
	}
	socketlb_remember(ctx, addr, port, svc->rev_nat, be);
	ctx->user_ip4 = be->addr;
	ctx->user_port = (__u32)be->port;
	return 1;
}

/* The frontend a socket's peer stands for, if socket LB translated it and
 * the frontend still exists as it was. */
WEIR_INLINE void socketlb_reverse(struct bpf_sock_addr *ctx)
{
	__be32 addr = ctx->user_ip4;
	__be16 port = (__be16)ctx->user_port;
	struct weir_revnat_entry *rn;
	struct weir_sock_rev_state *rev;
	__u32 i;

	if (ctx->user_family != 2 || !ctx->sk)
		return;
	rev = bpf_sk_storage_get(&weir_sock_rev, ctx->sk, 0, 0);
	if (!rev)
		return;
	for (i = 0; i < WEIR_SOCK_REV_SLOTS; i++) {
		struct weir_sock_rev_entry *e = &rev->e[i];

		if (e->rev_nat == 0 || e->backend_addr != addr || e->backend_port != port)
			continue;
		rn = bpf_map_lookup_elem(&weir_revnat, &e->rev_nat);
		if (!rn || rn->addr != e->svc_addr || rn->port != e->svc_port)
			return; /* the service is gone or changed: the peer is what it is */
		ctx->user_ip4 = e->svc_addr;
		ctx->user_port = (__u32)e->svc_port;
		return;
	}
}

SEC("cgroup/connect4")
int sock4_connect(struct bpf_sock_addr *ctx)
{
	return socketlb_translate(ctx, ctx->type == SOCK_DGRAM);
}

SEC("cgroup/sendmsg4")
int sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	return socketlb_translate(ctx, 1);
}

SEC("cgroup/recvmsg4")
int sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	socketlb_reverse(ctx);
	return 1;
}

SEC("cgroup/getpeername4")
int sock4_getpeername(struct bpf_sock_addr *ctx)
{
	socketlb_reverse(ctx);
	return 1;
}

/* A socket bound to a frontend's address and port would take the
 * service's traffic on this node (with IP_FREEBIND, or where the address
 * is local, as LoadBalancer and external IPs can be): refused. */
SEC("cgroup/post_bind4")
int sock4_post_bind(struct bpf_sock *ctx)
{
	struct weir_svc_key key;
	__u8 proto;

	if (socketlb_skip(ctx) || ctx->src_port == 0)
		return 1;
	proto = socketlb_proto(ctx->type);
	if (!proto)
		return 1;
	if (!weir_lb_lookup(&key, ctx->src_ip4, bpf_htons((__u16)ctx->src_port), proto, 0))
		return 1;
	bpf_set_retval(-SOCKETLB_BIND_ERRNO);
	return 0;
}


/*
 * Terminating sockets to backends that left their frontend, so clients
 * reconnect to a live backend instead of hanging on a dead one. The agent
 * lists the departed (frontend, backend) pairs in weir_sock_term and runs
 * these iterators in every network namespace of the node's cgroup; a
 * connected socket (TCP in any state but listening, UDP only when
 * connected: unconnected UDP sockets serve every peer, cilium#48564) whose
 * record says socket LB sent it to such a pair is destroyed
 * (bpf_sock_destroy, Linux 6.5): its owner sees ECONNABORTED.
 */

/* Kernel types, by name and field (CO-RE): only what is read. */
struct sock_common {
	__be32 skc_daddr;
	__be16 skc_dport;
	unsigned short skc_family;
	volatile unsigned char skc_state;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
} __attribute__((preserve_access_index));

struct inet_sock {
	struct sock sk;
} __attribute__((preserve_access_index));

struct udp_sock {
	struct inet_sock inet;
} __attribute__((preserve_access_index));

struct bpf_iter_meta {
	void *seq;
} __attribute__((preserve_access_index));

struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
} __attribute__((preserve_access_index));

struct bpf_iter__udp {
	struct bpf_iter_meta *meta;
	struct udp_sock *udp_sk;
} __attribute__((preserve_access_index));

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

#define SOCKETLB_TCP_LISTEN 10      /* TCP_LISTEN */
#define SOCKETLB_UDP_CONNECTED 1    /* TCP_ESTABLISHED: a connected UDP socket */

/* Whether socket LB sent sk to a backend that has left its frontend. */
WEIR_INLINE int socketlb_departed(struct sock *sk, __u8 proto)
{
	struct sock_common *skc = &sk->__sk_common;
	struct weir_sock_term_key key = {.proto = proto};
	struct weir_sock_rev_state *rev;
	__u32 i;

	if (skc->skc_family != 2 /* AF_INET */)
		return 0;
	rev = bpf_sk_storage_get(&weir_sock_rev, sk, 0, 0);
	if (!rev)
		return 0;
	for (i = 0; i < WEIR_SOCK_REV_SLOTS; i++) {
		struct weir_sock_rev_entry *e = &rev->e[i];

		if (e->rev_nat == 0 || e->backend_addr != skc->skc_daddr || e->backend_port != skc->skc_dport)
			continue;
		key.rev_nat = e->rev_nat;
		key.backend_addr = e->backend_addr;
		key.backend_port = e->backend_port;
		return bpf_map_lookup_elem(&weir_sock_term, &key) != NULL;
	}
	return 0;
}

SEC("iter/tcp")
int sock_term_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;

	if (!skc || skc->skc_state == SOCKETLB_TCP_LISTEN)
		return 0;
	if (socketlb_departed((struct sock *)skc, IPPROTO_TCP))
		bpf_sock_destroy(skc);
	return 0;
}

SEC("iter/udp")
int sock_term_udp(struct bpf_iter__udp *ctx)
{
	struct udp_sock *udp = ctx->udp_sk;

	if (!udp || udp->inet.sk.__sk_common.skc_state != SOCKETLB_UDP_CONNECTED)
		return 0;
	if (socketlb_departed(&udp->inet.sk, IPPROTO_UDP))
		bpf_sock_destroy(&udp->inet.sk.__sk_common);
	return 0;
}

char __license[] SEC("license") = "Dual BSD/GPL";
