/* BPF host routing: what a pod sends is delivered by BPF instead of the
 * node's upper stack (routing, netfilter, neighbour output).
 *  - To a pod of this node: straight into it, bpf_redirect_peer from tc
 *    ingress (veth), bpf_redirect to its host device from netkit's xmit,
 *    where redirect_peer is not allowed.
 *  - Anywhere else: bpf_fib_lookup for the egress device, then
 *    bpf_redirect_neigh, which has the kernel resolve the neighbour.
 *  - Whatever the FIB cannot forward (the node's own addresses, link-local
 *    and multicast, no route, fragmentation needed) goes up the stack. */
#pragma once

#include "common.h"
#include "config.h"
#include "endpoint_maps.h"
#include "lb.h"
#include "metrics.h"

#define SP_AF_INET_KERNEL 2   /* AF_INET, for bpf_fib_lookup */
#define SP_AF_INET6_KERNEL 10 /* AF_INET6 */

static __always_inline struct endpoint_info *endpoint_of(const union v6addr *addr, __u8 family)
{
	struct endpoint_key k;

	__builtin_memset(&k, 0, sizeof(k));
	k.addr = *addr;
	k.family = family;
	return bpf_map_lookup_elem(&sp_endpoints, &k);
}

/* Link-local and multicast destinations stay on the link they were sent
 * to: the node answers them itself (ARP has no IP header; this is NDP,
 * IGMP/MLD, DHCP and the like). */
static __always_inline int host_route_link_scope(const struct pkt *p)
{
	if (p->family == SP_AF_INET) {
		__u8 first = p->daddr.addr[0];

		return first >= 224 || (first == 169 && p->daddr.addr[1] == 254);
	}
	return p->daddr.addr[0] == 0xff || (p->daddr.addr[0] == 0xfe && (p->daddr.addr[1] & 0xc0) == 0x80);
}

/* Delivers p into a local pod. redirect_peer skips the pod's host device,
 * and with it the to-pod program, so its work (lb_reply: replies back to
 * the VIP, ICMP errors rewritten) is done here first. */
static __always_inline int host_route_local(struct __sk_buff *skb, struct pkt *p, const struct endpoint_info *src,
					    const struct endpoint_info *dst)
{
	__u8 eth[12];

	/* The destination device checks the frame is for it (veth, netkit L2). */
	__builtin_memcpy(eth, dst->mac, 6);
	__builtin_memcpy(eth + 6, dst->node_mac, 6);
	if (bpf_skb_store_bytes(skb, 0, eth, sizeof(eth), 0) < 0) {
		count(METRIC_MALFORMED);
		return TC_ACT_SHOT;
	}
	if (!(src->flags & EP_F_TC_INGRESS)) {
		/* The destination's to-pod program runs on its device. */
		count(METRIC_REDIRECT_LOCAL);
		return bpf_redirect(dst->ifindex, 0);
	}
	int ret = lb_reply(skb, p);
	if (ret != TC_ACT_OK)
		return ret;
	count(METRIC_REDIRECT_PEER);
	return bpf_redirect_peer(dst->ifindex, 0);
}

static __always_inline int host_route_remote(struct __sk_buff *skb, const struct pkt *p)
{
	struct bpf_fib_lookup fib;

	__builtin_memset(&fib, 0, sizeof(fib));
	fib.ifindex = skb->ifindex;
	fib.l4_protocol = p->proto;
	fib.sport = p->sport;
	fib.dport = p->dport;
	fib.tot_len = skb->len - p->l3_off;
	if (p->family == SP_AF_INET) {
		fib.family = SP_AF_INET_KERNEL;
		fib.ipv4_src = p->saddr.p[0];
		fib.ipv4_dst = p->daddr.p[0];
	} else {
		fib.family = SP_AF_INET6_KERNEL;
		__builtin_memcpy(fib.ipv6_src, &p->saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, &p->daddr, 16);
	}
	int ret = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH) {
		count(METRIC_FIB_PASS);
		return TC_ACT_OK;
	}
	/* No nexthop given: the kernel looks it up again and resolves its
	 * neighbour, queueing the packet meanwhile. The two-argument form
	 * (5.10) reads the same registers. */
	count(METRIC_REDIRECT_NEIGH);
	return bpf_redirect_neigh(fib.ifindex, 0, 0, 0);
}

/* host_route takes a packet lb_forward let through (p describes it after
 * DNAT) and routes it, when it left a local pod through that pod's own
 * device; anything else goes on untouched. */
static __always_inline int host_route(struct __sk_buff *skb, struct pkt *p)
{
	struct endpoint_info *src = endpoint_of(&p->saddr, p->family);

	if (!src || src->ifindex != skb->ifindex)
		return TC_ACT_OK;
	if (host_route_link_scope(p)) {
		count(METRIC_FIB_PASS);
		return TC_ACT_OK;
	}
	struct endpoint_info *dst = endpoint_of(&p->daddr, p->family);
	if (dst)
		return host_route_local(skb, p, src, dst);
	return host_route_remote(skb, p);
}
