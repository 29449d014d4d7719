/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every shared map and every struct layout of the Weir datapath.
 *
 * This header is the single source of truth: the Go mirrors in
 * core/datapath are generated from it by bpf2go (-type), and every object
 * includes it, so all objects of a node share these maps through pinning by
 * name in the node's bpffs directory. Change a layout here and nowhere else.
 */
#pragma once

#include "common.h"

/* Hooks: attach points owned by core. Each hook owns a contiguous range of
 * slots in weir_calls; the ranges are chosen by core at load time and
 * written into weir_hook_first/weir_hook_last of every object. */
enum weir_hook {
	WEIR_HOOK_POD_EGRESS = 0,  /* tc ingress on the host side of a pod veth */
	WEIR_HOOK_POD_INGRESS = 1, /* delivery to a local pod */
	WEIR_HOOK_NETDEV_INGRESS = 2,
	WEIR_HOOK_NETDEV_EGRESS = 3,
	WEIR_HOOK_MAX = 4,
};

/* Upper bound of slots a hook may own; also bounds the stage loop. */
#define WEIR_SLOTS_PER_HOOK 16
#define WEIR_MAX_SLOTS (WEIR_HOOK_MAX * WEIR_SLOTS_PER_HOOK)

/* Why a packet was dropped (or 0: it went on). Counted per hook in
 * weir_metrics and reported in weir_events. Names live in Go
 * (core/datapath/reasons.go), keyed by these numbers. */
enum weir_reason {
	WEIR_REASON_PASS = 0,
	WEIR_DROP_ETH_TRUNCATED = 1,
	WEIR_DROP_IP_TRUNCATED = 2,
	WEIR_DROP_IP_BAD_HEADER = 3,
	WEIR_DROP_IP_BAD_LENGTH = 4,
	WEIR_DROP_L4_TRUNCATED = 5,
	WEIR_DROP_TCP_BAD_OFFSET = 6,
	WEIR_DROP_ARP_MALFORMED = 7,
	WEIR_DROP_UNSUPPORTED_L3 = 8,
	WEIR_DROP_NO_BACKEND = 9,
	WEIR_DROP_FRAGMENT_TO_SERVICE = 10, /* retired: fragments are translated */
	WEIR_DROP_CSUM_REWRITE = 11,
	WEIR_DROP_TTL_EXCEEDED = 12,
	WEIR_DROP_SCRATCH = 13,
	WEIR_DROP_REDIRECT = 14,
	WEIR_DROP_TUNNEL_MALFORMED = 15,
	WEIR_DROP_ENCAP = 16,
	WEIR_DROP_DECAP = 17,
	WEIR_DROP_FRAG_NEEDED = 18,
	WEIR_DROP_CT_CREATE = 19,       /* conntrack entries could not be written */
	WEIR_DROP_NAT_NO_PORT = 20,     /* no free client port to keep a wire tuple unique */
	WEIR_DROP_MISSED_TAIL_CALL = 21, /* a filled slot could not be entered */
	WEIR_DROP_FRAG_STATE = 22,      /* a fragment's translation could not be remembered */
	WEIR_DROP_NAT_EXHAUSTED = 23,   /* no free port in the source NAT range */
	WEIR_DROP_NO_ROUTE = 24,        /* a translated packet has no route out */
	WEIR_DROP_NAT_ORPHAN = 25,      /* a reply to a source NAT whose flow is gone */
	WEIR_DROP_SOURCE_RANGE = 26,    /* client outside a frontend's loadBalancerSourceRanges */
	WEIR_DROP_DSR = 27,             /* the service address could not be added for DSR */
	WEIR_REJECT_NO_ENDPOINTS = 28,  /* answered with a reset or port unreachable: no endpoint at all */
	WEIR_DROP_PLUGIN = 29,          /* dropped by a datapath plugin's stage (its own counters say why) */
	WEIR_DROP_PLUGIN_DOWN = 30,     /* a plugin's process is down and its failurePolicy is closed */
	WEIR_REASON_MAX = 32,
};

/* skb->mark of packets a stage forwarded out of the uplink itself
 * (encapsulated, or routed natively): the uplink's egress entry lets them
 * go at once instead of parsing them again. Only the top byte is Weir's
 * ('W'), and the egress entry clears it, so nothing beyond the device
 * sees it. */
#define WEIR_MARK_MASK 0xff000000
#define WEIR_MARK_FORWARDED 0x57000000

/* Layer 3 seen by the entry parser. */
enum weir_l3 {
	WEIR_L3_NONE = 0,
	WEIR_L3_IPV4 = 1,
	WEIR_L3_ARP = 2,
};

/* weir_ctx.flags */
#define WEIR_CTX_FRAGMENT 0x01     /* a fragment: first (has L4) or later */
#define WEIR_CTX_LATER_FRAGMENT 0x02 /* no L4 header in this packet */
#define WEIR_CTX_AT_INGRESS 0x04   /* the entry ran at tc ingress (redirect_peer allowed) */
#define WEIR_CTX_DNAT 0x08         /* a stage translated the destination */
#define WEIR_CTX_SNAT 0x10         /* a stage translated the source */

/*
 * Per-packet state, written by the hook's entry program after it parsed the
 * packet once, read and updated by the stages it tail-calls. Lives in a
 * per-CPU array: tail calls run to completion on one CPU.
 */
struct weir_ctx {
	__u32 hook;        /* enum weir_hook the stages belong to */
	__u32 next;        /* next slot to try in weir_calls */
	__u32 last;        /* last slot of the hook */
	__u32 ifindex;     /* device the entry program ran on */
	__u32 dst_ifindex; /* local endpoint chosen for delivery, or 0 */
	__u32 len;         /* skb->len at entry */
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u16 l4_off;      /* offset of the L4 header from the start of the frame */
	__u8 l3;           /* enum weir_l3 */
	__u8 proto;        /* IPPROTO_* */
	__u8 tcp_flags;    /* the TCP flags byte, 0 for other protocols */
	__u8 flags;        /* WEIR_CTX_* */
	__be16 ip_id;      /* IPv4 identification, which ties fragments together */
};

/* weir_services: frontend (+ slot) -> master entry or backend slot.
 * Slot 0 is the master entry (count = backends); slots 1..count hold
 * backend ids. Written by the agent in the order backends, slots, reverse
 * NAT, master, leftover deletion, so a reader never sees a count larger
 * than the filled slots. */
struct weir_svc_key {
	__be32 addr;
	__be16 port;
	__u16 slot;
	__u8 proto;
	__u8 scope; /* enum weir_scope */
	__u8 pad[2];
};

enum weir_scope {
	WEIR_SCOPE_EXTERNAL = 0,
	WEIR_SCOPE_INTERNAL = 1,
};

/* weir_svc_val.type: the frontend type. Traffic from outside the cluster
 * is served by every type but ClusterIP. */
enum weir_svc_type {
	WEIR_SVC_CLUSTER_IP = 1,
	WEIR_SVC_NODE_PORT = 2,
	WEIR_SVC_LOAD_BALANCER = 3,
	WEIR_SVC_EXTERNAL_IP = 4,
};

/* weir_svc_val.flags2 */
#define WEIR_SVC_F2_AFFINITY 0x01
#define WEIR_SVC_F2_TWO_SCOPES 0x02 /* an internal-scope entry exists */
#define WEIR_SVC_F2_SOURCE_RANGES 0x04 /* clients from outside only from weir_src_ranges */
#define WEIR_SVC_F2_MODE_SNAT 0x08     /* flows to other nodes' backends by SNAT, whatever the pool says */
#define WEIR_SVC_F2_MODE_DSR 0x10      /* ... by DSR, where the pool's dispatch module can */
#define WEIR_SVC_F2_REJECT 0x20        /* no usable endpoint at all: reject, not drop */

/* weir_svc_val.backend_id of a master entry: why its slots hold the
 * backends they hold (kube-proxy's endpoint categorisation). Packets never
 * read it; operators do. */
enum weir_svc_selection {
	WEIR_SVC_SELECT_ALL = 0,   /* every ready endpoint (or serving-terminating) */
	WEIR_SVC_SELECT_LOCAL = 1, /* the node's own: a traffic policy Local */
	WEIR_SVC_SELECT_ZONE = 2,  /* hinted for the node's zone */
	WEIR_SVC_SELECT_NODE = 3,  /* hinted for the node (PreferSameNode) */
};

struct weir_svc_val {
	__u32 backend_id;       /* slots 1..count; master: enum weir_svc_selection */
	__u32 rev_nat;          /* reverse NAT id of this frontend */
	__u16 count;            /* master entry: number of backend slots */
	__u8 type;              /* enum weir_svc_type */
	__u8 flags2;            /* WEIR_SVC_F2_* */
	__u32 affinity_timeout; /* seconds, with WEIR_SVC_F2_AFFINITY */
};

/* weir_backends: backend id -> address. */
enum weir_backend_state {
	WEIR_BACKEND_ACTIVE = 0,
	WEIR_BACKEND_TERMINATING = 1, /* keeps its flows, gets no new ones */
	WEIR_BACKEND_QUARANTINED = 2,
};

struct weir_backend {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 state; /* enum weir_backend_state */
};

/* weir_backend_addrs: which addresses are backends of some service (to
 * the backend id), so that untranslated UDP to them is tracked too: a
 * translated flow must never take the wire tuple a direct flow uses. */
struct weir_backend_addr_key {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* weir_revnat: reverse NAT id -> the frontend replies appear to come from. */
struct weir_revnat_entry {
	__be32 addr;
	__be16 port;
	__u16 pad;
};

/*
 * weir_ct: connection tracking, as the kernel's conntrack does it. A flow
 * has two entries: ORIG, keyed by the tuple its first packet carried (as
 * the initiator sent it), and REPLY, keyed by the tuple its replies carry
 * on the wire. Each entry says how packets matching its key leave: the
 * nat_* tuple (equal to the key when nothing is translated). The other
 * entry of the flow is keyed by the reverse of that tuple. Every tracked
 * flow owns its REPLY key, so no two flows ever share a tuple on the wire:
 * a new flow whose tuple is taken gets another client port (as the
 * kernel's NAT does). Both entries carry the flow's state in flags.
 */
enum weir_ct_dir {
	WEIR_CT_ORIG = 1,
	WEIR_CT_REPLY = 2,
};

struct weir_ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* weir_ct_entry.flags: the flow's state (ct.h has the transitions). */
#define WEIR_CT_F_SEEN_REPLY 0x0001  /* the responder has answered */
#define WEIR_CT_F_ESTABLISHED 0x0002 /* TCP: handshake done */
#define WEIR_CT_F_FIN_ORIG 0x0004    /* TCP: the initiator sent FIN */
#define WEIR_CT_F_FIN_REPLY 0x0008   /* TCP: the responder sent FIN */
#define WEIR_CT_F_RST 0x0010         /* TCP: reset */
#define WEIR_CT_F_RST_REPLY 0x0020   /* ... by the responder (else the initiator) */
#define WEIR_CT_F_REMAPPED 0x0040    /* the client port was changed on the wire */
#define WEIR_CT_F_NODEPORT 0x0080    /* a flow from outside to a NodePort, LB or external IP */
#define WEIR_CT_F_SNAT 0x0100        /* ... whose source also leaves translated (weir_nat) */
#define WEIR_CT_F_HAIRPIN 0x0200     /* a pod reaching itself through a service */
#define WEIR_CT_F_DSR 0x0400         /* a NodePort flow whose backend answers the client directly */
#define WEIR_CT_F_ONE_SIDED 0x0800   /* ... seen only one way here (the node that received it): no twin */
/* The kinds of flow: set by whoever makes the flow, kept for its life. */
#define WEIR_CT_F_KINDS (WEIR_CT_F_NODEPORT | WEIR_CT_F_SNAT | WEIR_CT_F_HAIRPIN | WEIR_CT_F_DSR | WEIR_CT_F_ONE_SIDED)

/* The source a pod sees on packets it sent itself through a service (a
 * hairpin): its own address as source would be dropped as a martian. A
 * link-local address no pod or node holds. */
#define WEIR_HAIRPIN_ADDR bpf_htonl(0xa9fe2a01) /* 169.254.42.1 */

struct weir_ct_entry {
	__u64 packets;    /* of this entry's direction */
	__u64 bytes;
	__u32 created;    /* boot-clock seconds */
	__u32 lifetime;   /* boot-clock seconds at which the flow expires */
	__be32 nat_saddr; /* packets matching the key leave with this tuple */
	__be32 nat_daddr;
	__be16 nat_sport;
	__be16 nat_dport;
	__u32 backend_id; /* translated by lb: the backend chosen, else 0 */
	__u32 rev_nat;    /* translated by lb: the frontend, else 0 */
	__u16 flags;      /* WEIR_CT_F_* */
	__u8 dir;         /* enum weir_ct_dir */
	__u8 pad;
};

/* weir_frags: the ports of a fragmented datagram, from its first fragment
 * (the only one with an L4 header), so later fragments find the flow. */
struct weir_frag_key {
	__be32 saddr;
	__be32 daddr;
	__be16 id;
	__u8 proto;
	__u8 pad;
};

struct weir_frag_entry {
	__be16 sport;
	__be16 dport;
	__u32 created; /* boot-clock seconds */
};

/*
 * weir_nat: source NAT (NodePort to remote backends, masquerade). A flow
 * has two entries, written together or not at all: OUT, keyed by the
 * tuple as it reaches the translation (before it), says which source it
 * leaves with; IN, keyed by the replies' tuple on the wire (to the
 * translated source), says which destination they get back. The flow's
 * conntrack entry is keyed by the reverse of the OUT key: a NAT flow whose
 * conntrack entry is gone is an orphan the agent collects.
 */
enum weir_nat_dir {
	WEIR_NAT_OUT = 1,
	WEIR_NAT_IN = 2,
};

struct weir_nat_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir; /* enum weir_nat_dir */
	__u8 pad[2];
};

/* weir_nat_entry.owner: which use made the entry (its port range). */
enum weir_nat_owner {
	WEIR_NAT_NODEPORT = 1,
	WEIR_NAT_MASQUERADE = 2,
};

struct weir_nat_entry {
	__be32 addr;   /* OUT: the new source; IN: the original source */
	__be16 port;
	__u8 owner;    /* enum weir_nat_owner */
	__u8 pad;
	__u32 created; /* boot-clock seconds */
	__u32 pad2;
};

/* weir_nat_stats: per-CPU counts of port allocations, for the agent's
 * pressure signal: a rising share of retries means the range is filling. */
struct weir_nat_counters {
	__u64 allocated; /* flows that got a port */
	__u64 retries;   /* candidate ports found taken */
	__u64 exhausted; /* flows that found none */
};

/* weir_src_ranges: the loadBalancerSourceRanges of load-balancer
 * frontends flagged WEIR_SVC_F2_SOURCE_RANGES (LPM: the frontend exactly,
 * 64 bits, then the client's prefix). A flagged frontend takes only
 * clients a range here holds: closed, not open, while its ranges are
 * still being written. */
struct weir_src_range_key {
	__u32 prefixlen; /* 64 + the client prefix's bits */
	__be32 faddr;
	__be16 fport;
	__u8 proto;
	__u8 pad;
	__be32 client;
};

/* weir_maglev (the objects that choose by Maglev define WEIR_MAGLEV):
 * per frontend, by its reverse NAT id, a Maglev lookup table of
 * WEIR_MAGLEV_M backend ids, computed by the agent from the frontend's
 * backend addresses (so every node's table picks the same backend for a
 * flow) and swapped in whole. */
#define WEIR_MAGLEV_M 16381

#ifdef WEIR_MAGLEV
struct weir_maglev_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, WEIR_MAGLEV_M);
	__type(key, __u32);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct weir_maglev_table);
} weir_maglev SEC(".maps");
#endif

/* weir_endpoints: local pod address -> where and how to deliver. */
struct weir_endpoint_key {
	__be32 addr;
};

struct weir_endpoint {
	__u32 ifindex;     /* host side of the pod's veth */
	__u32 flags;
	__u8 mac[6];       /* the pod's interface */
	__u8 node_mac[6];  /* the host side: the pod's gateway */
};

/* weir_ipcache: which node an address lives on, by longest prefix: pod
 * CIDRs of every node and the nodes' own addresses. */
struct weir_ipcache_key {
	__u32 prefixlen; /* LPM trie: bits of addr that count */
	__be32 addr;
};

/* weir_ipcache_entry.flags */
#define WEIR_IPCACHE_LOCAL_POD 0x01  /* a pod CIDR of this node */
#define WEIR_IPCACHE_REMOTE_POD 0x02 /* a pod CIDR of another node */
#define WEIR_IPCACHE_NODE 0x04       /* a node's own address */
#define WEIR_IPCACHE_ENCAP 0x08      /* reach it through the tunnel */

struct weir_ipcache_entry {
	__be32 node_ip; /* the owning node: tunnel endpoint or next hop */
	__u16 flags;    /* WEIR_IPCACHE_* */
	__u16 pad;
};

/* weir_affinity: sessionAffinity ClientIP, the backend a client last got
 * from a frontend (by reverse NAT id) and when. */
struct weir_affinity_key {
	__be32 client;
	__u32 rev_nat;
};

struct weir_affinity_entry {
	__u32 backend_id;
	__u32 last_used; /* boot-clock seconds */
};

/* weir_sock_rev: socket-local storage of the translations socket LB made
 * on one socket, so recvmsg and getpeername answer with the service
 * address. The kernel frees it with the socket: nothing to collect and
 * nothing to leak. A socket keeps its last WEIR_SOCK_REV_SLOTS services
 * (one backend each: UDP picks by socket cookie). */
#define WEIR_SOCK_REV_SLOTS 4

struct weir_sock_rev_entry {
	__be32 backend_addr;
	__be32 svc_addr;
	__be16 backend_port;
	__be16 svc_port;
	__u32 rev_nat; /* the frontend, 0 for an empty slot */
};

struct weir_sock_rev_state {
	struct weir_sock_rev_entry e[WEIR_SOCK_REV_SLOTS];
	__u32 next; /* the slot the next new service takes */
	__u32 pad;
};

/* weir_sock_affinity: sessionAffinity for socket LB. A socket's source
 * address is not known at connect, so the client is its network
 * namespace (a pod; the node): the backend it last got from a frontend. */
struct weir_sock_affinity_key {
	__u64 netns_cookie;
	__u32 rev_nat;
	__u32 pad;
};

/* weir_sock_term: backends that left a frontend, by the frontend's reverse
 * NAT id: connected sockets socket LB sent there are destroyed by the
 * socket iterators (filled by the agent just before it runs them). */
struct weir_sock_term_key {
	__u32 rev_nat;
	__be32 backend_addr;
	__be16 backend_port;
	__u8 proto;
	__u8 pad;
};

/* weir_metrics: per-CPU counters, index = hook * WEIR_REASON_MAX + reason. */
struct weir_metric {
	__u64 packets;
	__u64 bytes;
};

/* weir_events: one record per drop. */
struct weir_event {
	__u64 ts_ns;
	__u32 ifindex;
	__u8 hook;
	__u8 reason;
	__u8 proto;
	__u8 pad;
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
};

/* Load-time constants, set by core in every object (core/datapath). */
volatile const __u32 weir_hook_first[WEIR_HOOK_MAX] = {};
volatile const __u32 weir_hook_last[WEIR_HOOK_MAX] = {};
/* The prog-array index of pod-egress/forward, where packets translated
 * elsewhere enter forwarding to another node. */
volatile const __u32 weir_slot_pod_forward = 0;

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, WEIR_MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_calls SEC(".maps");

/* Which slots hold a program: one bit per slot of a hook (WEIR_SLOTS_PER_HOOK
 * bits), written by core around every slot change, so the stage loop only
 * enters filled slots and a failed entry into one is a counted drop. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, WEIR_HOOK_MAX);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_slot_mask SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct weir_ctx);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct weir_svc_key);
	__type(value, struct weir_svc_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct weir_backend);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct weir_backend_addr_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_backend_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct weir_revnat_entry);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_revnat SEC(".maps");

/* Sized by the agent at load time (datapath.ctMaxEntries). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct weir_ct_key);
	__type(value, struct weir_ct_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct weir_frag_key);
	__type(value, struct weir_frag_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_frags SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__type(key, struct weir_ipcache_key);
	__type(value, struct weir_ipcache_entry);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct weir_affinity_key);
	__type(value, struct weir_affinity_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct weir_sock_rev_state);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_sock_rev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct weir_sock_affinity_key);
	__type(value, struct weir_affinity_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_sock_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct weir_sock_term_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_sock_term SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__type(key, struct weir_src_range_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_src_ranges SEC(".maps");

/* Sized by the agent at load time (datapath.natMaxEntries). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct weir_nat_key);
	__type(value, struct weir_nat_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_nat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct weir_nat_counters);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_nat_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct weir_endpoint_key);
	__type(value, struct weir_endpoint);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_HOOK_MAX * WEIR_REASON_MAX);
	__type(key, __u32);
	__type(value, struct weir_metric);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_metrics SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weir_events SEC(".maps");
