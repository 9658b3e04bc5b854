/* Bandwidth Manager: a pod's egress rate enforced by earliest departure
 * time (EDT), as Cilium does. from_pod tags a rated pod's packets with its
 * aggregate in skb->queue_mapping, which the node keeps up to the node
 * device (the mark would be too, but it belongs to netfilter and other
 * CNIs). There, tc egress spaces the aggregate's packets at its rate by
 * setting skb->tstamp, and the device's fq qdisc (the agent installs it)
 * holds each one until then. Traffic between pods of one node never
 * reaches a node device and is not limited, as with Cilium. */
#pragma once

#include "common.h"
#include "edt_maps.h"
#include "metrics.h"

/* Aggregates carry this bit, so the rx queue a forwarded packet's
 * queue_mapping records (a few thousand at most) is never read as one. */
#define EDT_AGGREGATE_BIT 0x8000
/* A packet this far behind its aggregate's last departure is dropped, not
 * queued: TCP backs off from the loss, and fq is not filled with seconds
 * of one pod's traffic. Cilium's default. */
#define EDT_HORIZON_NS (2ULL * 1000000000ULL)

/* From the pod: tag the packet with its pod's aggregate, if it has one. */
static __always_inline void edt_tag(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct edt_pod *pod = bpf_map_lookup_elem(&sp_edt_pods, &ifindex);

	if (pod)
		skb->queue_mapping = pod->aggregate;
}

/* At the node device's egress: give a tagged packet its departure time.
 * Returns TC_ACT_SHOT past the horizon, else TC_ACT_OK. */
static __always_inline int edt_schedule(struct __sk_buff *skb)
{
	__u32 aggregate = skb->queue_mapping;
	struct edt_rate *rate;
	__u64 now, t, t_next;

	if (!(aggregate & EDT_AGGREGATE_BIT))
		return TC_ACT_OK;
	/* The tag is no queue: the device picks its tx queue by hash again. */
	skb->queue_mapping = 0;
	rate = bpf_map_lookup_elem(&sp_edt_rates, &aggregate);
	if (!rate || !rate->bytes_per_sec)
		return TC_ACT_OK;

	now = bpf_ktime_get_ns();
	t = skb->tstamp;
	if (t > now && t - now >= EDT_HORIZON_NS) {
		/* No departure time but a receive timestamp (CLOCK_REALTIME)
		 * a kernel left on the packet: fq would drop it as due years
		 * ahead, and t_last would hold every later one back as far. */
		skb->tstamp = 0;
		t = 0;
	}
	/* A departure time the pod's own TCP pacing set may be later still. */
	if (t < now)
		t = now;
	t_next = *(volatile __u64 *)&rate->t_last + (__u64)skb->wire_len * 1000000000ULL / rate->bytes_per_sec;
	if (t_next <= t) {
		*(volatile __u64 *)&rate->t_last = t;
		return TC_ACT_OK;
	}
	if (t_next - now >= EDT_HORIZON_NS) {
		count(METRIC_EDT_HORIZON_DROP);
		return TC_ACT_SHOT;
	}
	*(volatile __u64 *)&rate->t_last = t_next;
	skb->tstamp = t_next;
	return TC_ACT_OK;
}
