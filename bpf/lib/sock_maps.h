/* Socket-layer load balancing state. Go mirrors: datapath/maps. */
#pragma once

#include "common.h"

/* What a socket really talks to (backend) and what it believes it talks to
 * (the VIP), per socket: recvmsg and getpeername rewrite only flows this
 * socket sent to a service, never traffic that came straight from a pod. */
struct sock_revnat_key {
	__u64 cookie;
	union v6addr addr; /* backend */
	__be16 port;
	__u8 family;
	__u8 pad[5];
};

struct sock_revnat_value {
	union v6addr addr; /* VIP */
	__be16 port;
	__u8 pad[6];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct sock_revnat_key);
	__type(value, struct sock_revnat_value);
	__uint(max_entries, 262144);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sp_sock_revnat SEC(".maps");

/* One translation a socket made: the VIP it asked for and the backend it
 * got. Addresses as in sock_revnat_*: IPv4 in p[0], v4-mapped unmapped. */
struct sock_flow {
	union v6addr vip;
	union v6addr backend;
	__u32 backend_id;
	__be16 vip_port;
	__be16 backend_port;
	__u8 family; /* 0: slot unused */
	__u8 proto;
	__u8 pad[6];
};

/* A socket's flows: what connect() chose, in flow[0] while conn is set,
 * and its unconnected sends, one flow per backend that may have replies
 * in flight (a resolver's parallel A and AAAA), the oldest reused. Three
 * flows keep an element within the kernel's 256-byte allocation class. */
#define SOCK_CTX_FLOWS 3

struct sock_ctx {
	struct sock_flow flow[SOCK_CTX_FLOWS];
	__u8 conn; /* flow[0] is connect()'s: what socket destroy matches */
	__u8 next; /* the flow a send to a new backend takes */
	__u8 pad[6];
};

/* The socket's own storage (cfg_sock_state == SOCK_STATE_STORAGE): freed
 * with the socket, so no LRU to evict and no stale entry to collect. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_ctx);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sp_sock_ctx SEC(".maps");

/* Sockets to destroy, filled by user space just before it runs the socket
 * iterators: a backend that left a frontend, so only sockets that frontend
 * sent to that backend go. */
struct sock_destroy_key {
	union v6addr backend;
	union v6addr vip;
	__be16 backend_port;
	__be16 vip_port;
	__u8 proto;
	__u8 family;
	__u8 pad[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct sock_destroy_key);
	__type(value, __u8);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} sp_sock_destroy SEC(".maps");
