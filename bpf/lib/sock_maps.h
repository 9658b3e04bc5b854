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
