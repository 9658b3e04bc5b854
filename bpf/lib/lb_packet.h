/* Per-packet load balancing (tc and XDP): DNAT of what a client sends,
 * with its conntrack entries, reverse translation of replies and of ICMP
 * errors, and hairpin. Backend selection, shared with the socket hooks, is
 * lb.h. */
#pragma once

#include <linux/errno.h>

#include "common.h"
#include "config.h"
#include "conntrack.h"
#include "icmp.h"
#include "lb.h"
#include "metrics.h"
#include "nat.h"
#include "ttl.h"

static __always_inline int lb_no_backend(struct __ctx_buff *ctx, const struct pkt *p)
{
#if CTX_IS_XDP
	/* The reject grows the packet into a reply, for which XDP may have no
	 * tailroom: it passes the packet, untranslated, to tc to answer. */
	if (cfg_no_backend_action == NO_BACKEND_REJECT)
		return CTX_ACT_OK;
#else
	if (cfg_no_backend_action == NO_BACKEND_REJECT && icmp_reply_unreach(ctx, p) == 0) {
		count(METRIC_NO_BACKEND_REJECT);
		return bpf_redirect(ctx_ifindex(ctx), 0);
	}
#endif
	count(METRIC_NO_BACKEND_DROP);
	return CTX_ACT_DROP;
}

/* Where a flow's packets go after DNAT. */
struct lb_target {
	union v6addr addr;
	__be16 port;
	__u32 backend_id;
};

/* A packet sent straight to an address that is no service, on a tuple a
 * translated flow used (its source port reused), means that flow is over:
 * forget it, or replies to the direct flow would be rewritten to the VIP.
 * Only a SYN can reuse a TCP tuple, so other segments, most of what is not
 * for a service, skip the lookup. */
static __always_inline void ct_forget_reused(const struct pkt *p)
{
	struct ct_key k;

	if (p->proto == IPPROTO_TCP && (p->tcp_flags & (TCPF_SYN | TCPF_ACK)) != TCPF_SYN)
		return;
	ct_key_init(&k, &p->saddr, &p->daddr, p->sport, p->dport, p, 0);
	if (bpf_map_lookup_elem(&sp_ct, &k) && bpf_map_delete_elem(&sp_ct, &k) == 0)
		count(METRIC_CT_TUPLE_REUSED);
}

/* What lb_translate did with a packet. */
struct lb_result {
	struct lb_target t; /* backend_id 0: not a service, passed */
	struct ct_entry *flow;
	__u16 svc_flags; /* the frontend's SVC_F_*, new flows only */
	__u8 new_flow;
};

/* Looks up the frontend a packet is sent to: the exact address, else a
 * NodePort or HostPort on any of the node's addresses. */
static __always_inline struct lb_svc_value *lb_lookup_frontend(const struct pkt *p, struct lb_frontend *fe)
{
	lb_frontend_of(p, fe);
	struct lb_svc_value *svc = lb_lookup_service(fe);
	if (svc || !is_node_addr(&p->daddr, p->family))
		return svc;
	__builtin_memset(&fe->addr, 0, sizeof(fe->addr));
	svc = lb_lookup_service(fe);
	if (svc && !(svc->flags & (SVC_F_NODEPORT | SVC_F_HOSTPORT)))
		return 0;
	return svc;
}

/* Who sends what lb_translate sees: a pod of this node (bpf_lxc.c), or
 * anyone through a node device (nodeport.h). */
enum lb_client_scope {
	LB_FROM_CLUSTER,
	LB_FROM_OUTSIDE,
};

/* The service entry of an established flow, and in *flow its flow entry
 * (fkey), while the flow is live and its backend is still the service's;
 * 0 when the flow must pick a backend afresh, its stale service entry
 * then deleted for lb_open to claim the tuple anew. */
static __always_inline struct ct_entry *lb_established(const struct pkt *p, const struct ct_key *skey,
							struct ct_key *fkey, struct ct_entry **flow)
{
	struct ct_entry *svc_ct = bpf_map_lookup_elem(&sp_ct, skey);

	*flow = 0;
	if (!svc_ct)
		return 0;
	/* The flow entry is what replies keep current: its state and expiry
	 * decide, so a close or traffic seen only on the reply side counts,
	 * and an expired flow never waits for GC to end. */
	ct_key_init(fkey, &p->saddr, &svc_ct->nat_addr, p->sport, svc_ct->nat_port, p, 0);
	*flow = bpf_map_lookup_elem(&sp_ct, fkey);
	if (ct_expired(svc_ct, *flow) || ct_is_reopen(*flow ? *flow : svc_ct, p)) {
		count(METRIC_CT_REOPEN);
	} else if (!lb_backend_alive(svc_ct->backend_id, &svc_ct->nat_addr, svc_ct->nat_port)) {
		count(METRIC_BACKEND_GONE);
	} else {
		return svc_ct;
	}
	bpf_map_delete_elem(&sp_ct, skey);
	return 0;
}

/* Opens a flow to the service p is sent to: picks an active backend into
 * r and records it in the service entry skey. A
 * verdict when p opens no flow (no service, refused, no backend), -1 when
 * r names the backend: its own pick (r->new_flow), or the one another CPU
 * opening the same flow at once recorded first. */
static __always_inline int lb_open(struct __ctx_buff *ctx, const struct pkt *p, struct lb_result *r,
				   enum lb_client_scope from, const struct ct_key *skey)
{
	struct lb_frontend fe;

	struct lb_svc_value *svc = lb_lookup_frontend(p, &fe);
	if (from == LB_FROM_CLUSTER)
		svc = lb_in_cluster(&fe, svc);
	if (!svc) {
		ct_forget_reused(p);
		count_pass(METRIC_PASS);
		return CTX_ACT_OK;
	}
	if (!lb_src_allowed(svc, p)) {
		count(METRIC_SOURCE_RANGE_DENIED);
		return CTX_ACT_DROP;
	}
	/* Only a datagram's first fragment may open a flow. */
	if (!pkt_has_l4(p)) {
		count(METRIC_FRAG_NO_FLOW);
		return CTX_ACT_DROP;
	}
	if (svc->count == 0) {
		if (svc->flags & SVC_F_ETP_LOCAL) {
			count(METRIC_ETP_LOCAL_DROP);
			return CTX_ACT_DROP;
		}
		if (svc->flags & SVC_F_ITP_LOCAL) {
			count(METRIC_ITP_LOCAL_DROP);
			return CTX_ACT_DROP;
		}
		return lb_no_backend(ctx, p);
	}

	struct lb_client client = {.id = p->saddr, .hash = lb_flow_hash(p)};
	__u32 id = lb_pick(&fe, svc, &client);
	struct lb_backend *b = id ? bpf_map_lookup_elem(&sp_backends, &id) : 0;
	if (!b) {
		count(METRIC_SLOT_MISSING);
		return CTX_ACT_DROP;
	}
	r->svc_flags = svc->flags;

	/* Alive from the start: another CPU may read it before this one
	 * accounts the packet. */
	struct ct_entry e = {
		.expires = bpf_ktime_get_ns() + ct_lifetime_ns(0, p->proto),
		.nat_addr = b->addr,
		.nat_port = b->port,
		.backend_id = id,
	};
	/* A new tuple is claimed, not overwritten: two CPUs opening the same
	 * flow at once (a UDP client's first datagrams) both use the entry
	 * the first wrote, so its backend and SNAT port. */
	int err = bpf_map_update_elem(&sp_ct, skey, &e, BPF_NOEXIST);
	struct ct_entry *won = err == -EEXIST ? bpf_map_lookup_elem(&sp_ct, skey) : 0;
	if (won) {
		r->t.addr = won->nat_addr;
		r->t.port = won->nat_port;
		r->t.backend_id = won->backend_id;
		return -1;
	}
	if (err < 0 && err != -EEXIST)
		count(METRIC_CT_CREATE_FAILED);
	r->t.addr = b->addr;
	r->t.port = b->port;
	r->t.backend_id = id;
	r->new_flow = 1;
	return -1;
}

/* Load-balances a packet leaving a client: an established flow keeps its
 * backend; a new one gets an active backend and two CT entries. The packet
 * is DNATed; r says where to and, for new flows, the frontend's flags. */
static __always_inline int lb_translate(struct __ctx_buff *ctx, struct pkt *p, struct lb_result *r,
					enum lb_client_scope from)
{
	struct ct_key skey, fkey;
	struct lb_target *t = &r->t;
	struct ct_entry *flow;

	__builtin_memset(r, 0, sizeof(*r));
	if (!is_tcp_or_udp(p->proto)) {
		count_pass(METRIC_PASS);
		return CTX_ACT_OK;
	}

	ct_key_init(&skey, &p->saddr, &p->daddr, p->sport, p->dport, p, CT_F_SERVICE);
	struct ct_entry *svc_ct = lb_established(p, &skey, &fkey, &flow);
	if (svc_ct) {
		t->addr = svc_ct->nat_addr;
		t->port = svc_ct->nat_port;
		t->backend_id = svc_ct->backend_id;
	} else {
		int ret = lb_open(ctx, p, r, from, &skey);
		if (ret >= 0)
			return ret;
		svc_ct = bpf_map_lookup_elem(&sp_ct, &skey);
		ct_key_init(&fkey, &p->saddr, &t->addr, p->sport, t->port, p, 0);
		flow = r->new_flow ? 0 : bpf_map_lookup_elem(&sp_ct, &fkey);
	}
	if (!flow) {
		/* New, re-selected, or evicted: start the flow's state afresh,
		 * but an evicted flow keeps the north-south path its service
		 * entry remembers. Only a flow this CPU opened overwrites an
		 * entry of the tuple. */
		struct ct_entry e = {
			.nat_addr = p->daddr,
			.nat_port = p->dport,
			.backend_id = t->backend_id,
			.state = (!r->new_flow && svc_ct) ? svc_ct->state & CT_S_NS_MASK : 0,
		};
		int err = bpf_map_update_elem(&sp_ct, &fkey, &e, r->new_flow ? BPF_ANY : BPF_NOEXIST);
		if (err < 0 && err != -EEXIST)
			count(METRIC_CT_CREATE_FAILED);
		flow = bpf_map_lookup_elem(&sp_ct, &fkey);
	}
	if (flow) {
		__u64 expires = ct_account(flow, p, ctx_len(ctx), 0);

		/* The service entry lives and closes with its flow. */
		if (svc_ct) {
			svc_ct->expires = expires;
			svc_ct->state = flow->state;
		}
	}
	r->flow = flow;

	if (nat_rewrite_addr(ctx, p, 0, &t->addr) < 0 || nat_rewrite_port(ctx, p, 0, t->port) < 0) {
		count(METRIC_MALFORMED);
		return CTX_ACT_DROP;
	}
	count(r->new_flow ? METRIC_LB_NEW : METRIC_LB_ESTABLISHED);
	return CTX_ACT_OK;
}

#if !CTX_IS_XDP
/* Hairpin: a pod sent to a service and was chosen as its backend. DNATed
 * alone, the packet would come back from the pod's own address, which its
 * stack refuses, and the reply would stay inside the pod. kube-proxy
 * masquerades it; here, as in Cilium, the source becomes the hairpin
 * address, the reply to that address becomes one from the VIP, and both
 * go straight back into the pod. The flow entry stays keyed client to
 * backend: pod to pod, a tuple no other flow has. */
static __always_inline void lb_hairpin_addr(__u8 family, union v6addr *a)
{
	__builtin_memset(a, 0, sizeof(*a));
	if (family == SP_AF_INET) {
		a->p[0] = cfg_hairpin_ipv4;
	} else {
		a->d[0] = cfg_hairpin_ipv6.d[0];
		a->d[1] = cfg_hairpin_ipv6.d[1];
	}
}

static __always_inline int lb_hairpin_back(struct __ctx_buff *ctx)
{
	if (swap_macs(ctx) < 0) {
		count(METRIC_MALFORMED);
		return CTX_ACT_DROP;
	}
	count(METRIC_HAIRPIN);
	return bpf_redirect(ctx_ifindex(ctx), 0);
}

/* An ICMP error rewritten for the hairpinned pod goes back in with the
 * TTL step the stack's forwarding would take; one that would expire goes
 * to the stack, which drops it: no error is answered with another. */
static __always_inline int lb_hairpin_icmp_back(struct __ctx_buff *ctx, const struct pkt *p)
{
	int ret = fwd_ttl(ctx, p);

	return ret ? fwd_ttl_verdict(ret) : lb_hairpin_back(ctx);
}

/* A reply to the hairpin address; -1 when p is none. */
static __always_inline int lb_hairpin_reply(struct __ctx_buff *ctx, struct pkt *p, const union v6addr *hairpin)
{
	struct ct_key k;

	if (!is_tcp_or_udp(p->proto) || !addr_equal(&p->daddr, hairpin))
		return -1;
	ct_key_init(&k, &p->saddr, &p->saddr, p->dport, p->sport, p, 0);
	struct ct_entry *flow = bpf_map_lookup_elem(&sp_ct, &k);
	if (!flow)
		return -1;
	/* Untranslated, an expiring reply has the stack tell the pod about
	 * its reply to the hairpin address, as its backend sent it. */
	int ret = fwd_ttl(ctx, p);
	if (ret)
		return fwd_ttl_verdict(ret);
	ct_account(flow, p, ctx_len(ctx), 1);

	union v6addr pod = p->saddr, vip = flow->nat_addr;
	if (nat_rewrite_addr(ctx, p, 0, &pod) < 0 || nat_rewrite_addr(ctx, p, 1, &vip) < 0 ||
	    nat_rewrite_port(ctx, p, 1, flow->nat_port) < 0) {
		count(METRIC_MALFORMED);
		return CTX_ACT_DROP;
	}
	count(METRIC_REV_NAT);
	return lb_hairpin_back(ctx);
}

/* An ICMP error a pod sends about a translated flow; -1 when p is none.
 *  - As a hairpin backend, about its client's packet (quoting hairpin ->
 *    pod): back into the pod as its client, about its packet to the
 *    service (icmp_error_to_client; the hairpin SNAT kept the port).
 *  - As a client, about a reply it got from a service (quoting vip:vport
 *    -> pod): to the backend, about its own reply (icmp_error_to_backend);
 *    back into the pod, from the hairpin address, when it is the backend.
 * Errors about a client's packet from other backends reach it by
 * lb_reply. */
static __always_inline int lb_icmp_error(struct __ctx_buff *ctx, struct pkt *p, const union v6addr *hairpin)
{
	struct pkt in;
	int ret;

	if (p->proto != (p->family == SP_AF_INET ? IPPROTO_ICMP : IPPROTO_ICMPV6) || !icmp_error_quote(ctx, p, &in))
		return -1;
	if (addr_equal(&in.saddr, hairpin)) {
		union v6addr pod = in.daddr;

		ret = icmp_error_to_client(ctx, p, &in, &pod, in.sport);
		if (ret == 0)
			return -1;
		if (ret < 0) {
			count(METRIC_MALFORMED);
			return CTX_ACT_DROP;
		}
		count(METRIC_ICMP_REV_NAT);
		return lb_hairpin_icmp_back(ctx, p);
	}
	struct ct_entry *svc = icmp_quoted_reply_service(&in);
	if (!svc)
		return -1;
	int self = addr_equal(&svc->nat_addr, &in.daddr);
	if (icmp_error_to_backend(ctx, p, &in, svc, self ? hairpin : 0, in.dport) < 0) {
		count(METRIC_MALFORMED);
		return CTX_ACT_DROP;
	}
	count(METRIC_ICMP_TO_BACKEND);
	return self ? lb_hairpin_icmp_back(ctx, p) : CTX_ACT_OK;
}

/* What a pod sends: hairpin replies and ICMP errors about translated
 * flows, else lb_translate, then the hairpin SNAT when the backend is the
 * sender itself. */
static __always_inline int lb_forward(struct __ctx_buff *ctx, struct pkt *p)
{
	struct lb_result r;
	union v6addr hairpin;

	lb_hairpin_addr(p->family, &hairpin);
	int ret = lb_hairpin_reply(ctx, p, &hairpin);
	if (ret >= 0)
		return ret;
	ret = lb_icmp_error(ctx, p, &hairpin);
	if (ret >= 0)
		return ret;
	ret = lb_translate(ctx, p, &r, LB_FROM_CLUSTER);
	if (ret != CTX_ACT_OK || !r.t.backend_id || !addr_equal(&p->saddr, &p->daddr))
		return ret;
	/* One that would expire goes on DNATed only, to what forwards it (the
	 * stack, or host_route, which counts it): the time exceeded about the
	 * pod's packet to itself reaches the pod through lb_reply as one
	 * about its packet to the service. */
	ret = ttl_of(ctx, p);
	if (ret <= 1)
		return ret < 0 ? CTX_ACT_DROP : CTX_ACT_OK;
	ret = fwd_ttl(ctx, p);
	if (ret)
		return fwd_ttl_verdict(ret);
	if (nat_rewrite_addr(ctx, p, 1, &hairpin) < 0) {
		count(METRIC_MALFORMED);
		return CTX_ACT_DROP;
	}
	return lb_hairpin_back(ctx);
}
#endif

/* Rewrites a reply on its way into the client back to the VIP, and ICMP
 * errors that quote a translated flow. */
static __always_inline int lb_reply(struct __ctx_buff *ctx, struct pkt *p)
{
	struct ct_key k;

	if (p->proto == (p->family == SP_AF_INET ? IPPROTO_ICMP : IPPROTO_ICMPV6)) {
		if (icmp_error_rev_nat(ctx, p))
			count(METRIC_ICMP_REV_NAT);
		else
			count_pass(METRIC_PASS);
		return CTX_ACT_OK;
	}
	if (!is_tcp_or_udp(p->proto)) {
		count_pass(METRIC_PASS);
		return CTX_ACT_OK;
	}

	ct_key_init(&k, &p->daddr, &p->saddr, p->dport, p->sport, p, 0);
	struct ct_entry *flow = bpf_map_lookup_elem(&sp_ct, &k);
	if (!flow) {
		count_pass(METRIC_PASS);
		return CTX_ACT_OK;
	}
	ct_account(flow, p, ctx_len(ctx), 1);

	union v6addr vip = flow->nat_addr;
	if (nat_rewrite_addr(ctx, p, 1, &vip) < 0 || nat_rewrite_port(ctx, p, 1, flow->nat_port) < 0) {
		count(METRIC_MALFORMED);
		return CTX_ACT_DROP;
	}
	count(METRIC_REV_NAT);
	return CTX_ACT_OK;
}
