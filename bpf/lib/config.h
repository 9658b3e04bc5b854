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

/* Socket-layer knobs. The loader probes the kernel and fills these in. */
volatile const __u32 cfg_have_set_retval = 0;
/* Translate only in the host netns; pods use the per-packet path. */
volatile const __u32 cfg_sock_lb_host_only = 0;
volatile const __u64 cfg_host_netns_cookie = 0;

/* Host routing of what pods send (bpf/lib/fib.h). The loader probes for
 * bpf_fib_lookup, bpf_redirect_neigh and bpf_redirect_peer. */
enum host_routing {
	HOST_ROUTING_STACK = 0, /* the node's upper stack routes */
	HOST_ROUTING_BPF = 1,   /* BPF routes: redirect_peer / redirect_neigh */
};

volatile const __u32 cfg_host_routing = HOST_ROUTING_STACK;

/* Ports SNAT of north-south flows may take on the node's address. The
 * default stays clear of Linux's default ephemeral range (32768-60999), so
 * a SNATed flow never takes the port of a node socket's connection. */
volatile const __u32 cfg_nat_port_min = 61000;
volatile const __u32 cfg_nat_port_max = 65535;

/* Maglev table size, a prime: the loader makes sp_maglev's values this
 * many backend ids and sets this to match. */
#define MAGLEV_DEFAULT_SIZE 16381
volatile const __u32 cfg_maglev_size = MAGLEV_DEFAULT_SIZE;

/* Where socket-LB keeps a socket's reverse translation (loader.SockState). */
enum sock_state {
	SOCK_STATE_MAP = 0,     /* sp_sock_revnat, an LRU keyed by socket cookie */
	SOCK_STATE_STORAGE = 1, /* sp_sock_ctx, the socket's own storage (probed) */
};

volatile const __u32 cfg_sock_state = SOCK_STATE_MAP;

/* Hairpin: a pod whose service flow was sent to itself gets this source
 * instead of its own (bpf/lib/lb_packet.h: lb_forward). No pod may own it, and every
 * pod must route it out of its device, so the reply comes back through the
 * datapath; should it leak, routers discard it. IPv4: Cilium's link-local
 * 169.254.42.1. IPv6: 100::1 of the discard prefix (RFC 6666), not Cilium's
 * fe80::1, since a pod answers a link-local peer from its own link-local
 * address (RFC 6724), which would miss the flow. Set by the loader
 * (loader.Config.HairpinIPv4/6). */
volatile const __be32 cfg_hairpin_ipv4 = __bpf_constant_htonl(0xa9fe2a01);
volatile const union v6addr cfg_hairpin_ipv6 = {.addr = {0x01, 0x00, [15] = 0x01}};

/* The kernel lets these hooks use socket storage (probed). Unconnected
 * UDP keeps its backend per destination there in either sock_state. */
volatile const __u32 cfg_have_sk_storage = 0;
