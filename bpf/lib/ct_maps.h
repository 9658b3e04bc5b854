/* Connection tracking and fragment tracking maps. Go mirrors: datapath/maps. */
#pragma once

#include "common.h"

#define CT_F_SERVICE 0x01

/* A load-balanced flow has two entries:
 *  - the service entry, keyed by the client's tuple to the VIP (CT_F_SERVICE),
 *    names the chosen backend: nat_addr/nat_port is where to DNAT;
 *  - the flow entry, keyed by the tuple after DNAT (client to backend),
 *    carries TCP state; nat_addr/nat_port is the VIP replies are rewritten to.
 * Replies find the flow entry by reversing their own tuple. */
struct ct_key {
	union v6addr saddr;
	union v6addr daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u8 flags;
	__u8 pad;
};

enum ct_state_bits {
	CT_S_ESTABLISHED = 0x01, /* a packet without SYN was seen */
	CT_S_REPLIED = 0x02,
	CT_S_FWD_FIN = 0x04,
	CT_S_REV_FIN = 0x08,
	CT_S_RST = 0x10,
	/* fwd_seq / rev_seq hold the sender's next sequence number. */
	CT_S_FWD_SEQ = 0x20,
	CT_S_REV_SEQ = 0x40,
	/* How this node forwards a north-south flow to a remote backend. */
	CT_S_NS_SNAT = 0x100,
	CT_S_NS_DSR = 0x200,
	CT_S_NS_DSR_IPIP = 0x400,
	/* A DSR flow learned on the backend's node: a flow entry without a
	 * service entry, by design. */
	CT_S_NS_LEARNED = 0x800,
};

#define CT_S_NS_MASK (CT_S_NS_SNAT | CT_S_NS_DSR | CT_S_NS_DSR_IPIP)

struct ct_entry {
	__u64 expires; /* CLOCK_MONOTONIC ns; the GC deletes after this */
	__u64 fwd_packets;
	__u64 fwd_bytes;
	__u64 rev_packets;
	__u64 rev_bytes;
	union v6addr nat_addr;
	__be16 nat_port;
	__u16 state;
	__u32 backend_id;
	/* TCP: the next sequence number each side was seen to send. */
	__u32 fwd_seq;
	__u32 rev_seq;
};

/* Conntrack zones: in the node-device objects (bpf_host.c, the XDP one)
 * sp_ct is the north-south zone, a map of its own (sp_ct_ns) the loader
 * puts there, since north-south flows are tracked by those objects alone;
 * a north-south flood then evicts no east-west entry. With zones off
 * (loader.Config.CTNorthSouthMapSize 0) every object shares this one. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
	__uint(max_entries, 524288);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sp_ct SEC(".maps");

/* First fragments record their ports so later fragments of the same
 * datagram, which carry no L4 header, are translated alike. */
struct frag_key {
	union v6addr saddr;
	union v6addr daddr;
	__be32 id;
	__u8 proto;
	__u8 family;
	__u8 pad[2];
};

struct frag_ports {
	__be16 sport;
	__be16 dport;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct frag_key);
	__type(value, struct frag_ports);
	__uint(max_entries, 8192);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sp_frags SEC(".maps");
