/* Service and backend maps. Go mirrors: datapath/maps. Sizes are defaults;
 * the loader sets max_entries at load time. */
#pragma once

#include "common.h"
#include "config.h"

/* One frontend (VIP, port, protocol) occupies slot 0 (the master) and
 * slots 1..total, each naming a backend id. New flows pick among slots
 * 1..count (active backends); slots count+1..total hold terminating
 * backends, kept so their flows live on and user space can find them. */
struct lb_svc_key {
	union v6addr addr;
	__be16 port;
	__u8 proto;
	__u8 family;
	__u16 slot;
	__u8 scope; /* LB_SCOPE_* */
	__u8 pad;
};

/* The scopes of a frontend's entries. An externalTrafficPolicy Local
 * frontend serves clients from outside the cluster with this node's
 * backends (EXT); clients inside it, this node's pods and the host, get
 * all of the service's from a second entry (INT), as kube-proxy sends
 * them to every endpoint. */
#define LB_SCOPE_EXT 0
#define LB_SCOPE_INT 1

/* Frontend kinds and behaviours, in a master's flags. A NodePort or
 * HostPort frontend's address is all zero: it answers on every address of
 * the node. */
#define SVC_F_NODEPORT 0x01
#define SVC_F_EXTERNAL_IP 0x02
#define SVC_F_LOADBALANCER 0x04
#define SVC_F_HOSTPORT 0x08
/* externalTrafficPolicy Local: the slots hold this node's backends only;
 * with none, traffic is dropped (the node does not answer). In-cluster
 * clients look for the LB_SCOPE_INT entry first. */
#define SVC_F_ETP_LOCAL 0x10
/* loadBalancerSourceRanges: only clients in sp_src_ranges[svc_id]. */
#define SVC_F_SOURCE_RANGES 0x20
/* New flows pick their backend from the Maglev table sp_maglev[svc_id]. */
#define SVC_F_MAGLEV 0x40
/* North-south to a remote backend: DSR instead of SNAT; with HYBRID for
 * TCP only (UDP is SNATed); dispatched by IPIP instead of an IP option. */
#define SVC_F_DSR 0x80
#define SVC_F_DSR_HYBRID 0x100
#define SVC_F_DSR_IPIP 0x200
/* internalTrafficPolicy Local: the slots hold this node's backends only;
 * with none, packets are dropped, as kube-proxy drops them. */
#define SVC_F_ITP_LOCAL 0x400

#define SVC_F_EXTERNAL (SVC_F_NODEPORT | SVC_F_EXTERNAL_IP | SVC_F_LOADBALANCER | SVC_F_HOSTPORT)

struct lb_svc_value {
	__u32 backend_id;       /* slots >= 1 */
	__u16 count;            /* slot 0: active backends */
	__u16 total;            /* slot 0: active + terminating backends */
	__u32 affinity_timeout; /* slot 0: sessionAffinity ClientIP, seconds; 0 = off */
	__u16 flags;            /* slot 0: SVC_F_* */
	__u16 pad;
	__u32 svc_id;           /* slot 0: keys sp_maglev and sp_src_ranges; unique per frontend */
};

enum backend_state {
	BACKEND_ACTIVE = 0,
	BACKEND_TERMINATING = 1,
};

struct lb_backend {
	union v6addr addr;
	__be16 port;
	__u8 proto;
	__u8 family;
	__u8 state;
	__u8 pad[3];
};

/* Userspace bookkeeping so a later CLI run knows who owns a frontend;
 * no program reads it. */
struct lb_svc_meta {
	char name[128];
	char port_name[64];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_svc_key);
	__type(value, struct lb_svc_value);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sp_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb_backend);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sp_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_svc_key);
	__type(value, struct lb_svc_meta);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sp_svc_meta SEC(".maps");

/* Session affinity: a client keeps its backend while it keeps coming back
 * within the service's timeout. The socket hooks know a client by its
 * netns cookie, the per-packet path by its IP: one map for both. */
struct lb_affinity_key {
	union v6addr client; /* client IP, or the netns cookie in d[0] */
	union v6addr vip;
	__be16 port;
	__u8 proto;
	__u8 family;
	__u8 by_cookie;
	__u8 pad[3];
};

struct lb_affinity_value {
	__u64 last_used; /* CLOCK_MONOTONIC ns */
	__u32 backend_id;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_affinity_key);
	__type(value, struct lb_affinity_value);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sp_affinity SEC(".maps");

/* Maglev lookup tables: svc_id -> backend ids, cfg_maglev_size of them
 * (the loader sets the value size). */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, MAGLEV_DEFAULT_SIZE * sizeof(__u32));
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sp_maglev SEC(".maps");

/* loadBalancerSourceRanges: one prefix per (frontend, range). The prefix
 * length counts svc_id and family too: 64 + the range's bits. The address
 * is a plain array: union v6addr's 8-byte alignment would put padding
 * inside the prefix. */
struct src_range_key {
	__u32 prefixlen;
	__u32 svc_id;
	__u8 family;
	__u8 pad[3];
	__be32 addr[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct src_range_key);
	__type(value, __u8);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sp_src_ranges SEC(".maps");

/* The node's own addresses, for NodePort and the ExternalIP rule. */
struct node_addr_key {
	union v6addr addr;
	__u8 family;
	__u8 pad[7];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct node_addr_key);
	__type(value, __u8);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sp_node_addrs SEC(".maps");

static __always_inline int is_node_addr(const union v6addr *a, __u8 family)
{
	struct node_addr_key k = {.addr = *a, .family = family};

	return bpf_map_lookup_elem(&sp_node_addrs, &k) != 0;
}

/* Every address a frontend has (ClusterIP, ExternalIP, LoadBalancer; not
 * NodePort's all-zero one), keyed like sp_node_addrs: what a later
 * fragment, which names no port, is checked against (bpf/lib/frag.h). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct node_addr_key);
	__type(value, __u8);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sp_frontend_addrs SEC(".maps");

static __always_inline int is_frontend_addr(const union v6addr *a, __u8 family)
{
	struct node_addr_key k = {.addr = *a, .family = family};

	return bpf_map_lookup_elem(&sp_frontend_addrs, &k) != 0;
}

static __always_inline int is_loopback(const union v6addr *a, __u8 family)
{
	if (family == SP_AF_INET)
		return (bpf_ntohl(a->p[0]) >> 24) == 127;
	return a->p[0] == 0 && a->p[1] == 0 && a->p[2] == 0 && a->p[3] == bpf_htonl(1);
}
