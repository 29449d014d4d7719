//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The ratelimit plugin: a token bucket per (service frontend, client
 * address) on the rate of NEW connections. It runs in
 * pod-egress/plugin-early, before lb translates the destination, so the
 * frontend is the one the client addressed, which is what limits are
 * written for. Packets of connections already let in are never limited:
 * only their first packet pays.
 *
 * The go:build constraint keeps the go command off this file (Go refuses C
 * beside a package's Go files unless the package uses cgo); bpf2go
 * compiles it.
 */
#include "weir/ct.h"
#include "weir/stage.h"

/* One connection, in nanotokens: fine-grained enough that a refill of
 * elapsed_ns * rate needs no division per packet. */
#define RATELIMIT_TOKEN NSEC_PER_SEC

enum ratelimit_counter {
	RATELIMIT_ALLOWED = 0, /* new connections to limited frontends let in */
	RATELIMIT_LIMITED = 1, /* ... dropped over the limit */
	RATELIMIT_COUNTERS = 2,
};

struct ratelimit_frontend {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct ratelimit_limit {
	__u32 rate;  /* new connections per second */
	__u32 burst; /* bucket size, in connections */
};

struct ratelimit_bucket_key {
	struct ratelimit_frontend front;
	__be32 client;
};

struct ratelimit_bucket {
	__u64 tokens; /* nanotokens: RATELIMIT_TOKEN per connection */
	__u64 last_ns; /* boot clock of the last refill */
};

/* The plugin's maps are not pinned by name: the host that loads the
 * object decides where (and whether) they live. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct ratelimit_frontend);
	__type(value, struct ratelimit_limit);
} ratelimit_limits SEC(".maps");

/* LRU: clients come and go, and a forgotten bucket only means a client
 * starts again with a full one. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ratelimit_bucket_key);
	__type(value, struct ratelimit_bucket);
} ratelimit_buckets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RATELIMIT_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} ratelimit_counters SEC(".maps");

WEIR_INLINE void ratelimit_count(__u32 idx)
{
	__u64 *n = bpf_map_lookup_elem(&ratelimit_counters, &idx);

	/* Per-CPU value: no atomics needed. */
	if (n)
		(*n)++;
}

/*
 * Whether the packet opens a connection. TCP: a SYN without ACK (a SYN
 * with RST or FIN opens nothing, but is charged too rather than being a way
 * around the limit). UDP has no such mark: a datagram opens a flow when lb
 * has no live conntrack entry for its tuple yet. This stage runs before lb,
 * so the tuple as the pod sent it is exactly the ORIG key lb gives the
 * flow; lb creates that entry right after this stage lets the first
 * datagram through, and replaces it once expired, so an expired one means
 * a new flow here too. A live entry in the other direction means the
 * datagram answers a flow, which is not a new one either.
 */
WEIR_INLINE int ratelimit_opens(const struct weir_ctx *ctx)
{
	struct weir_ct_entry *e;
	struct weir_ct_key key;

	if (ctx->proto == IPPROTO_TCP)
		return (ctx->tcp_flags & (WEIR_TCP_SYN | WEIR_TCP_ACK)) == WEIR_TCP_SYN;
	weir_ct_key_set(&key, ctx->saddr, ctx->daddr, ctx->sport, ctx->dport, ctx->proto);
	e = bpf_map_lookup_elem(&weir_ct, &key);
	return !e || weir_ct_expired(e, weir_now_sec());
}

/* The bucket after refilling it for the time since its last refill. */
WEIR_INLINE __u64 ratelimit_refill(const struct ratelimit_bucket *b, const struct ratelimit_limit *l, __u64 cap,
				   __u64 now)
{
	__u64 tokens = b->tokens, elapsed;

	/* Another CPU may have refilled it later than this packet's clock
	 * reading. */
	if (now <= b->last_ns || !l->rate)
		return tokens < cap ? tokens : cap;
	elapsed = now - b->last_ns;
	/* Past the time an empty bucket takes to fill it is full, and below
	 * it elapsed * rate < cap (at most 2^32 * 1e9), which cannot
	 * overflow. */
	if (elapsed >= cap / l->rate)
		return cap;
	tokens += elapsed * l->rate;
	return tokens < cap ? tokens : cap;
}

/*
 * Takes one connection from the client's bucket for the frontend. Returns
 * 1 when it had one. The read-refill-write is not atomic: two CPUs opening
 * connections of one client to one frontend at the same moment may both
 * take the same token. That lets a burst through by at most one connection
 * per CPU, which a rate limiter can live with; a lock per bucket would cost
 * every new connection more than that.
 */
WEIR_INLINE int ratelimit_take(const struct ratelimit_bucket_key *k, const struct ratelimit_limit *l)
{
	__u64 cap = (__u64)l->burst * RATELIMIT_TOKEN;
	__u64 now = bpf_ktime_get_boot_ns();
	struct ratelimit_bucket *b, fresh;
	__u64 tokens;

	if (cap < RATELIMIT_TOKEN)
		return 0;
	b = bpf_map_lookup_elem(&ratelimit_buckets, k);
	if (!b) {
		/* A new client starts with a full bucket, less this one. */
		fresh.tokens = cap - RATELIMIT_TOKEN;
		fresh.last_ns = now;
		if (!bpf_map_update_elem(&ratelimit_buckets, k, &fresh, BPF_NOEXIST))
			return 1;
		/* Another CPU made it meanwhile: take from that one. */
		b = bpf_map_lookup_elem(&ratelimit_buckets, k);
		/* No bucket could be kept (the map failed): a limiter that
		 * cannot count lets the connection in rather than cut a
		 * client off. */
		if (!b)
			return 1;
	}
	tokens = ratelimit_refill(b, l, cap, now);
	if (now > b->last_ns)
		b->last_ns = now;
	if (tokens < RATELIMIT_TOKEN) {
		b->tokens = tokens;
		return 0;
	}
	b->tokens = tokens - RATELIMIT_TOKEN;
	return 1;
}

/* pod-egress/plugin-early */
SEC("tc")
int ratelimit(struct __sk_buff *skb)
{
	WEIR_STAGE_CTX(skb, ctx);
	struct ratelimit_bucket_key k = {};
	struct ratelimit_limit *l;

	if (ctx->l3 != WEIR_L3_IPV4 || (ctx->proto != IPPROTO_TCP && ctx->proto != IPPROTO_UDP))
		return weir_next(skb, ctx);
	/* Later fragments carry no ports and never open a flow. */
	if (ctx->flags & WEIR_CTX_LATER_FRAGMENT)
		return weir_next(skb, ctx);
	k.front.addr = ctx->daddr;
	k.front.port = ctx->dport;
	k.front.proto = ctx->proto;
	k.client = ctx->saddr;
	/* The frontend first: traffic to frontends without a limit, most of
	 * it, pays one hash lookup and no conntrack lookup. */
	l = bpf_map_lookup_elem(&ratelimit_limits, &k.front);
	if (!l || !ratelimit_opens(ctx))
		return weir_next(skb, ctx);
	if (!ratelimit_take(&k, l)) {
		ratelimit_count(RATELIMIT_LIMITED);
		return weir_drop_ctx(skb, ctx, WEIR_DROP_PLUGIN);
	}
	ratelimit_count(RATELIMIT_ALLOWED);
	return weir_next(skb, ctx);
}

char __license[] SEC("license") = "Dual BSD/GPL";
