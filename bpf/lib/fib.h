/* BPF host routing: what a pod sends is delivered by BPF instead of the
 * node's upper stack (routing, netfilter, neighbour output).
 *  - To a pod of this node: straight into it, bpf_redirect_peer from tc
 *    ingress (veth), bpf_redirect to its host device from netkit's xmit,
 *    where redirect_peer is not allowed.
 *  - Anywhere else: bpf_fib_lookup for the egress device, then
 *    bpf_redirect_neigh, which has the kernel resolve the neighbour.
 *  - Whatever the FIB cannot forward (the node's own addresses, link-local
 *    and multicast, no route, fragmentation needed) goes up the stack.
 * What BPF forwards skips ip_forward, so it does its TTL work (fwd_ttl). */
#pragma once

#include "common.h"
#include "config.h"
#include "endpoint_maps.h"
#include "lb_packet.h"
#include "metrics.h"
#include "ttl.h"

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

/* Rewrites the frame for a local pod and sends it: into the pod with
 * bpf_redirect_peer when peer (tc ingress only), else to the egress of its
 * host device, where its to-pod program runs. */
static __always_inline int redirect_to_pod(struct __ctx_buff *ctx, const struct endpoint_info *dst, int peer)
{
	__u8 eth[12];

	/* The destination device checks the frame is for it (veth, netkit L2). */
	__builtin_memcpy(eth, dst->mac, 6);
	__builtin_memcpy(eth + 6, dst->node_mac, 6);
	if (ctx_store_bytes(ctx, 0, eth, sizeof(eth), 0) < 0) {
		count(METRIC_MALFORMED);
		return CTX_ACT_DROP;
	}
	if (!peer) {
		count(METRIC_REDIRECT_LOCAL);
		return bpf_redirect(dst->ifindex, 0);
	}
	count(METRIC_REDIRECT_PEER);
	return bpf_redirect_peer(dst->ifindex, 0);
}

/* Delivers p into a local pod. redirect_peer skips the pod's host device,
 * and with it the to-pod program, so its work (lb_reply: replies back to
 * the VIP, ICMP errors rewritten) is done here first; netkit's xmit may not
 * redirect_peer. */
static __always_inline int host_route_local(struct __ctx_buff *ctx, struct pkt *p, const struct endpoint_info *src,
					    const struct endpoint_info *dst)
{
	/* Before lb_reply: an expiring reply goes to the stack as it was, and
	 * the to-pod program translates the stack's error about it. */
	int ret = fwd_ttl(ctx, p);
	if (ret)
		return fwd_ttl_verdict(ret);
	if (!(src->flags & EP_F_TC_INGRESS))
		return redirect_to_pod(ctx, dst, 0);
	ret = lb_reply(ctx, p);
	if (ret != CTX_ACT_OK)
		return ret;
	return redirect_to_pod(ctx, dst, 1);
}

/* Where bpf_fib_lookup sends a packet: the device and, when the kernel
 * knows the next hop's neighbour, the frame's destination and source MAC
 * (as the frame starts, ready to write at offset 0); or the route's MTU
 * when the packet would not fit (FIB_FRAG_NEEDED). */
struct fib_next {
	__u32 ifindex;
	__u32 mtu; /* 0: the kernel does not say (before 5.12) */
	__u8 neigh; /* mac is valid */
	__u8 mac[12];
};

#define FIB_FRAG_NEEDED 1

/* Where the FIB sends p's destination, from ctx's device, were p extra
 * bytes longer (what DSR adds): 0; FIB_FRAG_NEEDED when that is over the
 * route's MTU; -1 when it cannot forward it. A missing neighbour is no
 * failure: tc's bpf_redirect_neigh resolves it (XDP hands such packets to
 * tc). A GSO packet is not measured: its segments fit, and
 * bpf_skb_adjust_room makes them smaller by what it adds. */
static __always_inline int fib_egress(struct __ctx_buff *ctx, const struct pkt *p, struct fib_next *nh, __u32 extra)
{
	struct bpf_fib_lookup fib;

	__builtin_memset(&fib, 0, sizeof(fib));
	fib.ifindex = ctx_ifindex(ctx);
	fib.l4_protocol = p->proto;
	fib.sport = p->sport;
	fib.dport = p->dport;
	/* A GSO packet's length is left to the kernel (tot_len 0), which
	 * knows it leaves in segments: given here, a TSO packet's would fail
	 * the MTU check and a BIG TCP one's overflow the 16-bit field. Any
	 * other packet is measured, so one over the MTU is answered (DSR) or
	 * goes up the stack, which tells the sender (even when the neighbour
	 * is unresolved, where the kernel checks no MTU of its own). */
	__u16 len = ctx_len(ctx) - p->l3_off + extra;
	if (!ctx_is_gso(ctx))
		fib.tot_len = len;
	if (p->family == SP_AF_INET) {
		fib.family = SP_AF_INET_KERNEL;
		fib.ipv4_src = p->saddr.p[0];
		fib.ipv4_dst = p->daddr.p[0];
	} else {
		fib.family = SP_AF_INET6_KERNEL;
		__builtin_memcpy(fib.ipv6_src, &p->saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, &p->daddr, 16);
	}
	int ret = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if (ret == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		/* mtu_result shares tot_len's place: unchanged, the kernel did
		 * not write it. */
		nh->mtu = fib.mtu_result < len ? fib.mtu_result : 0;
		return FIB_FRAG_NEEDED;
	}
	if (ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH)
		return -1;
	nh->ifindex = fib.ifindex;
	nh->neigh = ret == BPF_FIB_LKUP_RET_SUCCESS;
	__builtin_memcpy(nh->mac, fib.dmac, 6);
	__builtin_memcpy(nh->mac + 6, fib.smac, 6);
	return 0;
}

/* No nexthop given: the kernel looks it up again and resolves its
 * neighbour, queueing the packet meanwhile. The two-argument form (5.10)
 * reads the same registers. */
static __always_inline int redirect_neigh(__u32 ifindex)
{
	count(METRIC_REDIRECT_NEIGH);
	return bpf_redirect_neigh(ifindex, 0, 0, 0);
}

static __always_inline int host_route_remote(struct __ctx_buff *ctx, const struct pkt *p)
{
	struct fib_next nh;

	if (fib_egress(ctx, p, &nh, 0)) {
		count(METRIC_FIB_PASS);
		return CTX_ACT_OK;
	}
	int ret = fwd_ttl(ctx, p);
	if (ret)
		return fwd_ttl_verdict(ret);
	return redirect_neigh(nh.ifindex);
}

/* host_route takes a packet lb_forward let through (p describes it after
 * DNAT) and routes it, when it left a local pod through that pod's own
 * device; anything else goes on untouched. */
static __always_inline int host_route(struct __ctx_buff *ctx, struct pkt *p)
{
	struct endpoint_info *src = endpoint_of(&p->saddr, p->family);

	if (!src || src->ifindex != ctx_ifindex(ctx))
		return CTX_ACT_OK;
	if (host_route_link_scope(p)) {
		count(METRIC_FIB_PASS);
		return CTX_ACT_OK;
	}
	struct endpoint_info *dst = endpoint_of(&p->daddr, p->family);
	if (dst)
		return host_route_local(ctx, p, src, dst);
	return host_route_remote(ctx, p);
}
