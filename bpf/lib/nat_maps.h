/* Source NAT of north-south flows to remote backends. Go mirrors:
 * datapath/maps. */
#pragma once

#include "common.h"
#include "ct_maps.h"

/* A SNATed flow has two entries keyed by struct ct_key, told apart from
 * conntrack's by the flags:
 *  - NAT_F_OUT, keyed by the tuple before SNAT (client to backend, after
 *    DNAT): addr/port is the node's address and port the source became;
 *  - NAT_F_IN, keyed by the reply's tuple (backend to node:port): addr/port
 *    is the client's, written back as the destination.
 * The datapath deletes both at a TCP flow's last packet (snat_release),
 * the GC once the flow's conntrack entry is gone or expired. */
#define NAT_F_OUT 0x02
#define NAT_F_IN 0x04

struct nat_entry {
	union v6addr addr;
	__be16 port;
	__u8 pad[6];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct nat_entry);
	__uint(max_entries, 131072);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sp_nat SEC(".maps");

/* The node devices north-south programs run on, by ifindex: the address
 * a flow SNATed out of the device takes, per family (zero: none). */
struct netdev_info {
	union v6addr v4;
	union v6addr v6;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct netdev_info);
	__uint(max_entries, 256);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sp_netdevs SEC(".maps");
