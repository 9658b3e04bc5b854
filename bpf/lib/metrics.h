/* Per-reason packet counters, per CPU. Names mirror datapath/metrics. */
#pragma once

#include "common.h"

enum metric {
	METRIC_PASS = 0,          /* not for us: passed untouched */
	METRIC_LB_NEW,            /* new flow load-balanced and DNATed */
	METRIC_LB_ESTABLISHED,    /* packet of a tracked flow DNATed */
	METRIC_REV_NAT,           /* reply source rewritten back to the VIP */
	METRIC_ICMP_REV_NAT,      /* ICMP error quoting a translated flow rewritten */
	METRIC_NO_BACKEND_REJECT, /* service without backends: ICMP unreachable sent */
	METRIC_NO_BACKEND_DROP,   /* service without backends: dropped */
	METRIC_FRAG_NOT_FOUND,    /* non-first fragment whose first was not seen: dropped */
	METRIC_FRAG_NO_FLOW,      /* non-first fragment to a VIP with no tracked flow: dropped */
	METRIC_BACKEND_GONE,      /* tracked flow's backend removed: re-selected */
	METRIC_CT_REOPEN,         /* closed (then a bare SYN) or expired flow: re-selected as new */
	METRIC_SLOT_MISSING,      /* service slot or backend missing mid-update: dropped */
	METRIC_CT_CREATE_FAILED,  /* conntrack insert failed: translated untracked */
	METRIC_MALFORMED,         /* truncated or unparsable IP packet: passed */
	METRIC_SOCK_XLATE,        /* connect/sendmsg to a VIP rewritten to a backend */
	METRIC_SOCK_REV_XLATE,    /* recvmsg/getpeername source rewritten back to the VIP */
	METRIC_SOCK_REV_MISS,     /* recvmsg/getpeername with no translated flow: untouched */
	METRIC_SOCK_NO_BACKEND,   /* connect/sendmsg to a service without backends: refused */
	METRIC_SOCK_OTHER_NETNS,  /* left to the per-packet path: not the host netns */
	METRIC_SOCK_DESTROYED,    /* socket of a removed backend destroyed */
	METRIC_AFFINITY_HIT,      /* new flow sent to the client's affine backend */
	METRIC_SOCK_BIND_REFUSED, /* host bind to a NodePort's port refused */
	METRIC_CT_TUPLE_REUSED,   /* direct flow reused a translated flow's tuple: old flow forgotten */
	METRIC_REDIRECT_PEER,     /* host routing: into a local pod with bpf_redirect_peer */
	METRIC_REDIRECT_LOCAL,    /* host routing: to a local pod's device with bpf_redirect */
	METRIC_REDIRECT_NEIGH,    /* host routing: off the node, bpf_fib_lookup + bpf_redirect_neigh */
	METRIC_FIB_PASS,          /* host routing: left to the upper stack (local, unroutable, too big) */
	METRIC_NP_LOCAL,          /* north-south: to a backend on this node */
	METRIC_NP_SNAT,           /* north-south: to a remote backend, source NATed */
	METRIC_NP_REV_SNAT,       /* north-south: reply of a SNATed flow translated back */
	METRIC_NAT_RETRY_0,       /* SNAT port found at the first try (kept or random) */
	METRIC_NAT_RETRY_1,       /* ... after 1 retry */
	METRIC_NAT_RETRY_2_3,     /* ... after 2-3 retries */
	METRIC_NAT_RETRY_4_7,     /* ... after 4-7 retries */
	METRIC_NAT_RETRY_8_PLUS,  /* ... after 8 or more retries */
	METRIC_NAT_EXHAUSTED,     /* no free SNAT port within the retries: dropped */
	METRIC_DSR_OPT,           /* north-south: DSR, service carried in an IP option */
	METRIC_DSR_IPIP,          /* north-south: DSR, IPIP/IP6IP6 dispatch */
	METRIC_DSR_FALLBACK,      /* DSR impossible (IPv4 options present): SNATed */
	METRIC_DSR_LEARNED,       /* backend node: DSR flow recorded for its replies */
	METRIC_SOURCE_RANGE_DENIED, /* client outside loadBalancerSourceRanges: dropped */
	METRIC_ETP_LOCAL_DROP,    /* externalTrafficPolicy Local without local backends: dropped */
	METRIC_FIB_FAILED,        /* north-south: no route to backend or client: dropped */
	METRIC_XDP_TX,            /* XDP: sent back out the device it came in on */
	METRIC_XDP_REDIRECT,      /* XDP: redirected to another device */
	METRIC_XDP_TO_TC,         /* XDP: passed to tc (local backend, or needs the stack) */
	METRIC_NP_ICMP_REV_SNAT,  /* north-south: ICMP error about a SNATed flow sent on to the client */
	METRIC_NP_ICMP_SNAT,      /* north-south: ICMP error about a SNATed flow's reply sent on to the backend */
	METRIC_HAIRPIN,           /* pod's flow to itself: sent back into it via the hairpin address */
	METRIC_FRAG_PASS,         /* non-first fragment whose first was not seen, to no frontend address: passed */
	METRIC_ITP_LOCAL_DROP,    /* internalTrafficPolicy Local without local backends: dropped */
	METRIC_NP_HOST,           /* north-south: packet for a backend at this node's own address (hostNetwork): up the stack */
	METRIC_ICMP_TO_BACKEND,   /* ICMP error about a reply of a flow without SNAT (DNAT only, hairpin) sent on to its backend */
	METRIC_CT_RST_OUT_OF_WINDOW, /* TCP RST far from its sender's next sequence number: passed, flow kept open */
	METRIC_NAT_RELEASED,      /* SNAT mapping released with its flow's last packet (RST, or the ACK after both FINs) */
	METRIC_TTL_EXCEEDED,      /* BPF forwarding: TTL / hop limit would expire; to the stack (time exceeded), or dropped */
	METRIC_DSR_FRAG_NEEDED,   /* DSR: too big with the option or outer header: frag needed / packet too big sent back */
	METRIC_EDT_HORIZON_DROP,  /* Bandwidth Manager: a pod's packet due past the horizon: dropped */
	METRIC_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, METRIC_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sp_metrics SEC(".maps");

static __always_inline void count(enum metric m)
{
	__u32 key = m;
	__u64 *v = bpf_map_lookup_elem(&sp_metrics, &key);

	if (v)
		*v += 1;
}

/* A packet passed on untouched, for reason. What XDP passes, tc looks at
 * again and counts the reason of; XDP counts only the hand-over
 * (xdp_to_tc, at its entry point), so each packet is counted once. */
static __always_inline void count_pass(enum metric reason)
{
	if (!CTX_IS_XDP)
		count(reason);
}
