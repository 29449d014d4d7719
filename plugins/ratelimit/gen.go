package main

// The plugin's object includes Weir's shared headers, as in-tree modules'
// objects do, so its stage reads the same context and maps; -type
// generates the Go mirrors of the plugin's own structs, which user space
// writes into its maps.
//go:generate go tool bpf2go -tags linux -target bpfel -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu" -type ratelimit_frontend -type ratelimit_limit -type ratelimit_bucket_key ratelimit ratelimit.c -- -I../../bpf/include
