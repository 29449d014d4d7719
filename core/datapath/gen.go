package datapath

// The core object holds the hook entry programs and, through
// bpf/include/weir/maps.h, every shared map; -type generates the Go mirror
// of every shared struct and enum from that one header.
//go:generate go tool bpf2go -tags linux -target bpfel -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu" -type weir_ctx -type weir_svc_key -type weir_svc_val -type weir_backend -type weir_revnat_entry -type weir_ct_key -type weir_ct_entry -type weir_endpoint_key -type weir_endpoint -type weir_metric -type weir_affinity_key -type weir_ipcache_key -type weir_ipcache_entry -type weir_affinity_entry -type weir_event -type weir_hook -type weir_reason -type weir_scope -type weir_svc_type -type weir_svc_selection -type weir_backend_state -type weir_ct_dir -type weir_backend_addr_key -type weir_frag_key -type weir_frag_entry -type weir_l3 -type weir_sock_rev_state -type weir_sock_rev_entry -type weir_sock_affinity_key -type weir_sock_term_key -type weir_nat_key -type weir_nat_entry -type weir_nat_dir -type weir_nat_owner -type weir_nat_counters -type weir_src_range_key core ../../bpf/core.c -- -I../../bpf/include
