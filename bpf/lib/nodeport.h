/* North-south load balancing on a node's own device: NodePort, HostPort,
 * ExternalIP and LoadBalancer traffic from outside the node.
 *  - A local backend gets the packet DNATed, into its pod (redirect_peer
 *    with BPF host routing, else the stack); the egress program answers
 *    the client from the service address (lb_reply).
 *  - A remote backend gets it DNATed and SNATed to the node's address, or,
 *    with DSR, dispatched to the backend's node, which answers itself; then
 *    bpf_fib_lookup + bpf_redirect_neigh. Replies to SNATed flows come back
 *    here, get the client and the service address back, and are sent on.
 *  - The backend's node learns DSR flows from the option or tunnel.
 * The same code runs in XDP (bpf_xdp.c) ahead of tc: there it sends what
 * it translated itself when the FIB knows the next hop's MAC (XDP_TX or
 * bpf_redirect), and hands the rest to tc with a word saying what is left
 * (np_handover): local pods (bpf_redirect_peer is tc's) and unresolved
 * neighbours (bpf_redirect_neigh is tc's). */
#pragma once

#include "common.h"
#include "config.h"
#include "dsr.h"
#include "fib.h"
#include "lb_packet.h"
#include "metrics.h"
#include "nat_maps.h"
#include "snat.h"

/* What XDP leaves tc to do with a packet it translated, in a word ahead
 * of the packet (its metadata): the translation is done, tc only sends it
 * on, so nothing is translated twice. */
enum np_handover {
	NP_HANDOVER_NONE = 0,
	NP_HANDOVER_DELIVER = 1, /* for this node: into the backend's pod */
	NP_HANDOVER_ROUTE = 2,   /* for elsewhere, neighbour unknown: redirect_neigh */
	NP_HANDOVER_TOO_BIG = 3, /* DSR would take it past the route's MTU: np_dsr_too_big */
};

/* The word's high half: what (the low 8 bits), and for NP_HANDOVER_TOO_BIG
 * the MTU to announce above them. */
#define NP_HANDOVER_WHAT 0xff

/* The word's low half names this node's datapath (its netns): virtual
 * devices keep metadata on a packet leaving the node, and the next node's
 * tc must not take another node's word for its own. */
#define NP_HANDOVER_MAGIC 0x5e9a0000

static __always_inline __u32 np_handover_tag(void)
{
	return NP_HANDOVER_MAGIC ^ (__u32)cfg_host_netns_cookie;
}

#if CTX_IS_XDP
/* Passes p to tc with what is left to do. */
static __always_inline int np_handover(struct __ctx_buff *ctx, __u32 what)
{
	/* The entry point made sure there is room (bpf_xdp.c); without the
	 * word tc would translate the packet again. */
	if (ctx_set_xfer(ctx, (__u64)what << 32 | np_handover_tag()) < 0) {
		count(METRIC_MALFORMED);
		return CTX_ACT_DROP;
	}
	return CTX_ACT_OK;
}
#else
/* What XDP left tc to do with the packet (NP_HANDOVER_NONE: everything),
 * with its argument. */
static __always_inline __u32 np_handed_over(struct __ctx_buff *ctx)
{
	__u64 word = ctx_xfer(ctx);

	if ((__u32)word != np_handover_tag())
		return NP_HANDOVER_NONE;
	return word >> 32;
}
#endif

/* Sends a translated p where fib_egress said: tc has bpf_redirect_neigh
 * resolve the neighbour; XDP writes the neighbour's MAC and sends it back
 * out its device (XDP_TX) or to another (bpf_redirect), or, neighbour
 * unknown, hands it to tc. */
static __always_inline int np_send(struct __ctx_buff *ctx, const struct fib_next *nh)
{
#if CTX_IS_XDP
	if (!nh->neigh)
		return np_handover(ctx, NP_HANDOVER_ROUTE);
	if (ctx_store_bytes(ctx, 0, nh->mac, sizeof(nh->mac), 0) < 0) {
		count(METRIC_MALFORMED);
		return CTX_ACT_DROP;
	}
	if (nh->ifindex == ctx_ifindex(ctx)) {
		count(METRIC_XDP_TX);
		return XDP_TX;
	}
	count(METRIC_XDP_REDIRECT);
	return bpf_redirect(nh->ifindex, 0);
#else
	return redirect_neigh(nh->ifindex);
#endif
}

/* Sends p to wherever the FIB says, or drops it: past SNAT or DSR the
 * stack would take the packet for a martian. */
static __always_inline int np_redirect(struct __ctx_buff *ctx, const struct pkt *p)
{
	struct fib_next nh;

	if (fib_egress(ctx, p, &nh, 0)) {
		count(METRIC_FIB_FAILED);
		return CTX_ACT_DROP;
	}
	return np_send(ctx, &nh);
}

/* Into a local backend's pod: straight in when it is registered
 * (sp_endpoints) and BPF routes, else by the stack. XDP hands it to tc,
 * whose bpf_redirect_peer it cannot use. */
static __always_inline int np_into_pod(struct __ctx_buff *ctx, const struct pkt *p, const struct endpoint_info *ep)
{
#if CTX_IS_XDP
	return np_handover(ctx, NP_HANDOVER_DELIVER);
#else
	if (!ep || cfg_host_routing != HOST_ROUTING_BPF || !(ep->flags & EP_F_TC_INGRESS))
		return CTX_ACT_OK;
	int ret = fwd_ttl(ctx, p);
	if (ret)
		return fwd_ttl_verdict(ret);
	return redirect_to_pod(ctx, ep, 1);
#endif
}

static __always_inline int np_deliver_local(struct __ctx_buff *ctx, const struct pkt *p, const struct endpoint_info *ep)
{
	count(METRIC_NP_LOCAL);
	return np_into_pod(ctx, p, ep);
}

/* How a new flow to a remote backend leaves: DSR where the frontend asks
 * for it and the packet can carry it, else SNAT. */
static __always_inline __u16 np_mode(struct __ctx_buff *ctx, const struct pkt *p, __u16 flags)
{
	if (!(flags & SVC_F_DSR) || ((flags & SVC_F_DSR_HYBRID) && p->proto != IPPROTO_TCP))
		return CT_S_NS_SNAT;
	if (flags & SVC_F_DSR_IPIP)
		return CT_S_NS_DSR | CT_S_NS_DSR_IPIP;
	if (!dsr_opt_fits(ctx, p)) {
		count(METRIC_DSR_FALLBACK);
		return CT_S_NS_SNAT;
	}
	return CT_S_NS_DSR;
}

/* The address SNAT gives a flow leaving through ifindex; none when
 * ifindex is no node device, so the destination is on this node. */
static __always_inline const union v6addr *np_snat_addr(__u32 ifindex, __u8 family)
{
	struct netdev_info *dev = bpf_map_lookup_elem(&sp_netdevs, &ifindex);
	if (!dev)
		return 0;
	const union v6addr *a = family == SP_AF_INET ? &dev->v4 : &dev->v6;
	if (!a->d[0] && !a->d[1])
		return 0;
	return a;
}

#if !CTX_IS_XDP
/* An ICMP error about a reply on its way to the client, to the backend:
 * through the flow's SNAT mapping, or, for a flow only DNATed (a local
 * backend's, or a DSR flow's, whose backend's node answered the client
 * from the service), quoting backend -> client. The flow entry says
 * which. 1 when p was one, 0 when not, -1 on a rewrite failure. */
static __always_inline int np_icmp_error_forward(struct __ctx_buff *ctx, struct pkt *p, struct pkt *in,
						 enum metric *m)
{
	struct ct_entry *svc = icmp_quoted_reply_service(in);
	struct ct_key k;

	if (!svc)
		return 0;
	ct_key_init(&k, &in->daddr, &svc->nat_addr, in->dport, svc->nat_port, in, 0);
	struct ct_entry *flow = bpf_map_lookup_elem(&sp_ct, &k);
	if (!flow)
		return 0;
	if (flow->state & CT_S_NS_SNAT) {
		*m = METRIC_NP_ICMP_SNAT;
		return snat_icmp_error_forward(ctx, p, in, svc);
	}
	*m = METRIC_ICMP_TO_BACKEND;
	return icmp_error_to_backend(ctx, p, in, svc, 0, 0) < 0 ? -1 : 1;
}

/* A translated ICMP error on to its new destination: into a local
 * backend's pod, up the stack to a hostNetwork one, else where the FIB
 * says (the client, or a remote backend). One whose TTL runs out is
 * dropped, as ip_forward sends no error about an error. */
static __always_inline int np_icmp_send(struct __ctx_buff *ctx, const struct pkt *p)
{
	struct endpoint_info *ep = endpoint_of(&p->daddr, p->family);

	if (ep || is_node_addr(&p->daddr, p->family))
		return np_into_pod(ctx, p, ep);
	if (fwd_ttl(ctx, p))
		return CTX_ACT_DROP;
	return np_redirect(ctx, p);
}
#endif

/* An ICMP error about a translated flow: to the client, about its own
 * packet to the service, when a SNATed flow's (snat_icmp_error_reverse;
 * errors about a DNAT-only flow's packets reach the client by the egress
 * program, lb_reply); or, about a reply, to the backend, about its own
 * reply (np_icmp_error_forward). -1 when p is none. XDP passes ICMP on to
 * tc, which translates it: errors are rare, and XDP's program stays
 * smaller without the quote rewrites. */
static __always_inline int np_icmp_error(struct __ctx_buff *ctx, struct pkt *p)
{
#if CTX_IS_XDP
	return CTX_ACT_OK;
#else
	enum metric m = METRIC_NP_ICMP_REV_SNAT;
	struct pkt in;

	if (!icmp_error_quote(ctx, p, &in))
		return -1;
	int ret = snat_icmp_error_reverse(ctx, p, &in);
	if (ret == 0)
		ret = np_icmp_error_forward(ctx, p, &in, &m);
	if (ret == 0)
		return -1;
	if (ret < 0) {
		count(METRIC_MALFORMED);
		return CTX_ACT_DROP;
	}
	count(m);
	return np_icmp_send(ctx, p);
#endif
}

/* A reply of a SNATed flow: back to the client, from the service. */
static __always_inline int np_reply(struct __ctx_buff *ctx, struct pkt *p)
{
	if (p->proto == (p->family == SP_AF_INET ? IPPROTO_ICMP : IPPROTO_ICMPV6))
		return np_icmp_error(ctx, p);

	struct ct_key in;
	int ret = snat_reverse(ctx, p, &in);

	if (ret == 0)
		return -1;
	if (ret < 0) {
		count(METRIC_MALFORMED);
		return CTX_ACT_DROP;
	}
	count(METRIC_NP_REV_SNAT);
	/* An expiring reply is dropped: translated, its source is this
	 * node's own address, which the stack would not forward. */
	if (fwd_ttl(ctx, p))
		return CTX_ACT_DROP;
	ret = lb_reply(ctx, p);
	if (ret != CTX_ACT_OK)
		return ret;
	snat_release_after_reply(&in, p);
	return np_redirect(ctx, p);
}

/* Whether p's destination is on this node: a registered pod, or routed
 * to a device that is no node device. */
static __always_inline int np_to_this_node(struct __ctx_buff *ctx, const struct pkt *p)
{
	struct fib_next nh;

	if (endpoint_of(&p->daddr, p->family))
		return 1;
	return fib_egress(ctx, p, &nh, 0) == 0 && !np_snat_addr(nh.ifindex, p->family);
}

#if !CTX_IS_XDP
/* A packet of a DSR flow that its option or outer header would take past
 * the route's MTU, of which mtu is what fits: the client hears frag needed
 * / packet too big, as from a router on its path to the service: from
 * the service address, quoting its own packet to the service, the next-hop
 * MTU mtu. The packet is dropped. IPv4 without DF gets the same, as no
 * BPF program can fragment it, and the stack would forward it with no DSR
 * or cut it into pieces the backend's node cannot read: its sender lowers
 * its path MTU and sends smaller packets, fragmenting them itself. The
 * error is tc's: XDP's stack has no room to build it. */
static __always_inline int np_dsr_too_big(struct __ctx_buff *ctx, struct pkt *p, const struct ct_entry *flow,
					  __u32 mtu)
{
	union v6addr svc = flow->nat_addr;
	__be16 port = flow->nat_port;
	struct icmp_err e = {.src = &svc, .un = bpf_htonl(mtu)};
	struct pkt in;

	if (p->family == SP_AF_INET) {
		e.type = ICMP_DEST_UNREACH;
		e.code = ICMP_FRAG_NEEDED;
	} else {
		e.type = ICMPV6_PKT_TOOBIG;
	}
	/* The quote is of the packet after DNAT: the rewrite puts the service
	 * back, with the quoted and the ICMP checksums. p is the error next. */
	if (icmp_reply(ctx, p, &e) < 0 || parse_packet(ctx, p) < 0 || !icmp_error_quote(ctx, p, &in) ||
	    icmp_quote_rewrite(ctx, p, &in, 0, &svc, port) < 0) {
		count(METRIC_MALFORMED);
		return CTX_ACT_DROP;
	}
	count(METRIC_DSR_FRAG_NEEDED);
	return bpf_redirect(ctx_ifindex(ctx), 0);
}

/* A DSR packet XDP found too big (NP_HANDOVER_TOO_BIG): its flow entry
 * names the service. */
static __always_inline int np_dsr_too_big_from_xdp(struct __ctx_buff *ctx, struct pkt *p, __u32 mtu)
{
	struct ct_key k;

	ct_key_init(&k, &p->saddr, &p->daddr, p->sport, p->dport, p, 0);
	struct ct_entry *flow = bpf_map_lookup_elem(&sp_ct, &k);
	if (!flow) {
		count(METRIC_MALFORMED);
		return CTX_ACT_DROP;
	}
	return np_dsr_too_big(ctx, p, flow, mtu);
}
#endif

/* A DSR packet too big for its route, mtu what fits: tc answers it; XDP
 * hands it to tc for that. */
static __always_inline int np_too_big(struct __ctx_buff *ctx, struct pkt *p, const struct ct_entry *flow, __u32 mtu)
{
#if CTX_IS_XDP
	return np_handover(ctx, NP_HANDOVER_TOO_BIG | mtu << 8);
#else
	return np_dsr_too_big(ctx, p, flow, mtu);
#endif
}

#if !CTX_IS_XDP
/* What tc does with a packet XDP handed over (np_handover); -1 when XDP
 * left it everything. */
static __always_inline int np_from_xdp(struct __ctx_buff *ctx, struct pkt *p)
{
	__u32 what = np_handed_over(ctx);

	switch (what & NP_HANDOVER_WHAT) {
	case NP_HANDOVER_DELIVER:
		return np_into_pod(ctx, p, endpoint_of(&p->daddr, p->family));
	case NP_HANDOVER_ROUTE:
		return np_redirect(ctx, p);
	case NP_HANDOVER_TOO_BIG:
		return np_dsr_too_big_from_xdp(ctx, p, what >> 8);
	default:
		return -1;
	}
}
#endif

/* What comes in on a node device. */
static __always_inline int np_from_netdev(struct __ctx_buff *ctx, struct pkt *p)
{
	struct dsr_info d;
	int ret = 0;

	/* DSR to a backend on this node: tunnelled to it, or with the
	 * option. */
	if ((p->proto == IPPROTO_IPIP || p->proto == IPPROTO_IPV6) && np_to_this_node(ctx, p))
		ret = dsr_decap(ctx, p, &d);
	if (ret < 0) {
		count(METRIC_MALFORMED);
		return CTX_ACT_DROP;
	}
	if (ret > 0 || dsr_read_opt(ctx, p, &d)) {
		dsr_learn(ctx, p, &d);
		return np_deliver_local(ctx, p, endpoint_of(&p->daddr, p->family));
	}

	ret = np_reply(ctx, p);
	if (ret >= 0)
		return ret;

	struct lb_result r;
	ret = lb_translate(ctx, p, &r, LB_FROM_OUTSIDE);
	if (ret != CTX_ACT_OK || !r.t.backend_id)
		return ret;

	struct endpoint_info *ep = endpoint_of(&r.t.addr, p->family);
	if (ep)
		return np_deliver_local(ctx, p, ep);
	/* A hostNetwork backend on this node: its socket is the host's. The
	 * FIB would not forward to a local address. */
	if (is_node_addr(&r.t.addr, p->family)) {
		count(METRIC_NP_HOST);
		return np_into_pod(ctx, p, 0);
	}
	__u16 mode = r.flow ? r.flow->state & CT_S_NS_MASK : 0;
	int new_mode = r.new_flow || !mode;
	if (new_mode)
		mode = np_mode(ctx, p, r.svc_flags);
	/* DSR's option or outer header must fit the route's MTU too. */
	__u32 extra = mode & CT_S_NS_DSR ? dsr_overhead(p, mode) : 0;
	struct fib_next nh;
	ret = fib_egress(ctx, p, &nh, extra);
	if (ret == FIB_FRAG_NEEDED && extra && nh.mtu > extra && r.flow)
		return np_too_big(ctx, p, r.flow, nh.mtu - extra);
	if (ret) {
		count(METRIC_FIB_FAILED);
		return CTX_ACT_DROP;
	}
	const union v6addr *node = np_snat_addr(nh.ifindex, p->family);
	if (!node)
		return np_deliver_local(ctx, p, 0);
	/* Expiring: to the stack only DNATed (past SNAT or DSR it would be a
	 * martian), whose ip_forward answers the client with time exceeded;
	 * the egress program makes its quote the client's packet to the
	 * service (lb_reply). */
	ret = fwd_ttl(ctx, p);
	if (ret)
		return ret > 0 ? np_into_pod(ctx, p, 0) : CTX_ACT_DROP;

	if (new_mode && r.flow)
		r.flow->state |= mode;
	if (mode & CT_S_NS_DSR) {
		/* The service address is the one the client used: the flow entry
		 * keeps it for reverse translation. */
		d.addr = r.flow ? r.flow->nat_addr : p->daddr;
		d.port = r.flow ? r.flow->nat_port : p->dport;
		d.state = mode;
		if (!r.flow || dsr_dispatch(ctx, p, &d) < 0) {
			count(METRIC_MALFORMED);
			return CTX_ACT_DROP;
		}
		return np_send(ctx, &nh);
	}
	if (snat_forward(ctx, p, node, r.flow && ct_done(r.flow->state, p)) != 0)
		return CTX_ACT_DROP;
	count(METRIC_NP_SNAT);
	return np_send(ctx, &nh);
}
