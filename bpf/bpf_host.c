// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Programs for a node's own device (bpf/lib/nodeport.h): north-south load
 * balancing of what comes in, and reverse translation of what leaves. */

#include "lib/common.h"
#include "lib/config.h"
#include "lib/edt.h"
#include "lib/frag.h"
#include "lib/lb_packet.h"
#include "lib/metrics.h"
#include "lib/nodeport.h"

/* Packets arriving on the node device (tc ingress). */
SEC("tc")
int sp_from_netdev(struct __sk_buff *skb)
{
	struct pkt p;
	int verdict;

	if (pkt_prepare(skb, &p, &verdict) < 0)
		return verdict;
	/* XDP in front (bpf_xdp.c) may have done the translation already. */
	verdict = np_from_xdp(skb, &p);
	if (verdict >= 0)
		return verdict;
	return np_from_netdev(skb, &p);
}

/* Packets leaving by the node device (tc egress): rated pods' packets get
 * their departure time; replies of flows to local backends and DSR flows
 * go back out from the service address. */
SEC("tc")
int sp_to_netdev(struct __sk_buff *skb)
{
	struct pkt p;
	int verdict;

	if (edt_schedule(skb) != TC_ACT_OK)
		return TC_ACT_SHOT;
	if (pkt_prepare(skb, &p, &verdict) < 0)
		return verdict;
	return lb_reply(skb, &p);
}

char __license[] SEC("license") = "Dual BSD/GPL";
