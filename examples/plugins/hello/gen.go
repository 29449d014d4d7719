package main

//go:generate go tool bpf2go -tags linux -target bpfel -cc clang-16 -strip llvm-strip-16 -no-global-types -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu" hello hello.c -- -I../../../bpf/include
