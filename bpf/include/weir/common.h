/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Common includes and small helpers shared by every Weir BPF object. */
#pragma once

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Everything is inlined: tail calls and BPF-to-BPF calls mix badly (stack
 * limits per frame), and the stages are small. */
#define WEIR_INLINE static __always_inline

#ifndef NSEC_PER_SEC
#define NSEC_PER_SEC 1000000000ULL
#endif

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

#define ARPOP_REQUEST 1
#define ARPOP_REPLY 2
#define ARPHRD_ETHER 1

/* Seconds on the boot clock: conntrack lifetimes are stored in seconds so
 * that the agent can compare them with CLOCK_BOOTTIME. */
WEIR_INLINE __u32 weir_now_sec(void)
{
	return (__u32)(bpf_ktime_get_boot_ns() / NSEC_PER_SEC);
}

/* TCP header flags. */
#define WEIR_TCP_FIN 0x01
#define WEIR_TCP_SYN 0x02
#define WEIR_TCP_RST 0x04
#define WEIR_TCP_ACK 0x10
