//go:build ignore

#include "weir/stage.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} hello_syns SEC(".maps");

SEC("tc")
int hello(struct __sk_buff *skb)
{
	__u32 zero = 0;
	__u64 *n;

	WEIR_STAGE_CTX(skb, ctx);
	if (ctx->proto == IPPROTO_TCP && (ctx->tcp_flags & 0x12) == 0x02) {
		n = bpf_map_lookup_elem(&hello_syns, &zero);
		if (n)
			(*n)++;
	}
	return weir_next(skb, ctx);
}

char __license[] SEC("license") = "Dual BSD/GPL";
