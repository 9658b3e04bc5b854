/* The node's local pods, for BPF host routing. Go mirror: datapath/endpoints.
 * Filled by whoever plugs pods in, when it attaches the datapath to them. */
#pragma once

#include "common.h"

struct endpoint_key {
	union v6addr addr;
	__u8 family;
	__u8 pad[7];
};

/* The pod's from-pod program runs at tc ingress of its host device (veth),
 * where bpf_redirect_peer is allowed; otherwise inside netkit's xmit. */
#define EP_F_TC_INGRESS 0x01

struct endpoint_info {
	__u32 ifindex;    /* the pod's host-side device, in the node netns */
	__u32 flags;      /* EP_F_* */
	__u8 mac[6];      /* the pod's own device's MAC (zero for L3 devices) */
	__u8 node_mac[6]; /* the host-side device's MAC */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_info);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sp_endpoints SEC(".maps");
