/* Runtime knobs: set by the Go loader in the object's rodata at load time. */
#pragma once

#include "common.h"

enum no_backend_action {
	NO_BACKEND_REJECT = 0, /* ICMP/ICMPv6 port unreachable, as kube-proxy */
	NO_BACKEND_DROP = 1,
};

volatile const __u32 cfg_no_backend_action = NO_BACKEND_REJECT;

/* Conntrack lifetimes in seconds, Cilium's defaults. */
volatile const __u32 cfg_ct_tcp_syn_s = 60;
volatile const __u32 cfg_ct_tcp_established_s = 21600;
volatile const __u32 cfg_ct_tcp_close_s = 10;
volatile const __u32 cfg_ct_nontcp_s = 60;
