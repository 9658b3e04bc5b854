/* Bandwidth Manager maps (bpf/lib/edt.h). Go mirror: datapath/bandwidth.
 * The agent fills them from pods' kubernetes.io/egress-bandwidth. */
#pragma once

#include "common.h"

/* A rated pod, by its host-side device (the ifindex from_pod runs on):
 * unlike its source address, the pod cannot choose it. */
struct edt_pod {
	__u32 aggregate; /* key of sp_edt_rates, EDT_AGGREGATE_BIT set */
};

struct edt_rate {
	__u64 bytes_per_sec;
	/* Departure time (CLOCK_MONOTONIC ns) given to the aggregate's last
	 * packet. CPUs race on it unlocked, as in Cilium: a lost update lets
	 * one packet leave a little early, never holds one back. */
	__u64 t_last;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct edt_pod);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sp_edt_pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct edt_rate);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sp_edt_rates SEC(".maps");
