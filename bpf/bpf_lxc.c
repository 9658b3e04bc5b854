// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Programs for a pod's device: per-packet ClusterIP load balancing of
 * traffic leaving the pod, and reverse translation of what comes back into
 * it; with BPF host routing, the routing of what leaves too. Where they run
 * depends on the device kind (harness/topology: Pod.Hook): tc of a veth's
 * host side, netkit's peer and primary slots, or tc of an ipvlan slave. */

#include "lib/common.h"
#include "lib/config.h"
#include "lib/edt.h"
#include "lib/fib.h"
#include "lib/frag.h"
#include "lib/lb_packet.h"
#include "lib/metrics.h"

/* Packets the pod sends (tc ingress of the host-side device). */
SEC("tc")
int sp_from_pod(struct __sk_buff *skb)
{
	struct pkt p;
	int verdict;

	edt_tag(skb);
	if (pkt_prepare(skb, &p, &verdict) < 0)
		return verdict;
	verdict = lb_forward(skb, &p);
	if (verdict != TC_ACT_OK || cfg_host_routing != HOST_ROUTING_BPF)
		return verdict;
	return host_route(skb, &p);
}

/* Packets delivered to the pod (tc egress of the host-side device). */
SEC("tc")
int sp_to_pod(struct __sk_buff *skb)
{
	struct pkt p;
	int verdict;

	if (pkt_prepare(skb, &p, &verdict) < 0)
		return verdict;
	return lb_reply(skb, &p);
}

char __license[] SEC("license") = "Dual BSD/GPL";
