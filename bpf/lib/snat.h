/* Source NAT of north-south flows to remote backends: port allocation on
 * the node's address and the reverse mapping replies are found by. */
#pragma once

#include <linux/errno.h>

#include "common.h"
#include "config.h"
#include "conntrack.h"
#include "icmp.h"
#include "metrics.h"
#include "nat.h"
#include "nat_maps.h"

/* Tries per new mapping: the client's port (or a random one), then one
 * more random, then linear probing. Bounded so a full range costs a
 * known amount per packet. */
#define SNAT_TRIES 32

static __always_inline void snat_count_tries(__u32 retries)
{
	if (retries == 0)
		count(METRIC_NAT_RETRY_0);
	else if (retries == 1)
		count(METRIC_NAT_RETRY_1);
	else if (retries < 4)
		count(METRIC_NAT_RETRY_2_3);
	else if (retries < 8)
		count(METRIC_NAT_RETRY_4_7);
	else
		count(METRIC_NAT_RETRY_8_PLUS);
}

/* The reply key of p's mapping to node:port (p: client to backend, after
 * DNAT). */
static __always_inline void snat_in_key(struct ct_key *k, const struct pkt *p, const union v6addr *node, __be16 port)
{
	ct_key_init(k, &p->daddr, node, p->dport, port, p, NAT_F_IN);
}

/* Whether the reply key k names p's client: the mapping's reply half is
 * p's flow's own. */
static __always_inline int snat_owns(const struct ct_key *k, const struct pkt *p)
{
	struct nat_entry *cur = bpf_map_lookup_elem(&sp_nat, k);

	return cur && addr_equal(&cur->addr, &p->saddr) && cur->port == p->sport;
}

/* Claims a port for p (client to backend, after DNAT) on node: the reply
 * key is inserted with BPF_NOEXIST, so two CPUs never share a port. A reply
 * key already naming this client is the flow's own (its out entry was
 * evicted) and is kept. Returns 0 with *out set, -1 when every try found
 * the port taken. */
static __always_inline int snat_claim(const struct pkt *p, const union v6addr *node, struct nat_entry *out)
{
	__u32 range = cfg_nat_port_max - cfg_nat_port_min + 1;
	__u32 off = bpf_ntohs(p->sport) - cfg_nat_port_min;
	struct nat_entry rev;
	struct ct_key ik;

	__builtin_memset(&rev, 0, sizeof(rev));
	rev.addr = p->saddr;
	rev.port = p->sport;
	if (off >= range)
		off = bpf_get_prandom_u32() % range;
	/* The port is always an offset modulo the range, never a constant the
	 * verifier knows, so what follows a successful try is verified once
	 * and not once per try. */
	snat_in_key(&ik, p, node, 0);
	for (__u32 i = 0; i < SNAT_TRIES; i++) {
		ik.dport = bpf_htons(cfg_nat_port_min + off);
		if (bpf_map_update_elem(&sp_nat, &ik, &rev, BPF_NOEXIST) == 0 || snat_owns(&ik, p)) {
			__builtin_memset(out, 0, sizeof(*out));
			out->addr = *node;
			out->port = ik.dport;
			snat_count_tries(i);
			return 0;
		}
		off = (i == 0 ? bpf_get_prandom_u32() : off + 1) % range;
	}
	count(METRIC_NAT_EXHAUSTED);
	return -1;
}

/* Frees a closed flow's mapping, both halves, so its port is free for the
 * next flow at once rather than when GC finds the flow gone. */
static __always_inline void snat_release(const struct ct_key *out, const struct ct_key *in)
{
	bpf_map_delete_elem(&sp_nat, out);
	bpf_map_delete_elem(&sp_nat, in);
	count(METRIC_NAT_RELEASED);
}

/* SNATs p (client to backend, after DNAT) to node: the flow's mapping, or
 * a new one; done says p is the flow's last packet (ct_done), whose
 * mapping then goes. 0 when done; CTX_ACT_DROP when no port is free. */
static __always_inline int snat_forward(struct __ctx_buff *ctx, struct pkt *p, const union v6addr *node, int done)
{
	struct ct_key ok, ik;
	struct nat_entry m;

	ct_key_init(&ok, &p->saddr, &p->daddr, p->sport, p->dport, p, NAT_F_OUT);
	struct nat_entry *e = bpf_map_lookup_elem(&sp_nat, &ok);
	int mapped = 0;

	/* An out mapping whose reply half was evicted (or since claimed by
	 * another client) is stale: its port may be another flow's, so the
	 * flow gets a new one rather than sharing it. */
	if (e && addr_equal(&e->addr, node)) {
		snat_in_key(&ik, p, node, e->port);
		mapped = snat_owns(&ik, p);
	}
	if (mapped) {
		m = *e;
	} else {
		if (snat_claim(p, node, &m) < 0)
			return CTX_ACT_DROP;
		/* Claimed, not overwritten, for a new flow: another CPU mapping
		 * it at once wins, and this one gives its port back. */
		int err = bpf_map_update_elem(&sp_nat, &ok, &m, e ? BPF_ANY : BPF_NOEXIST);
		e = err == -EEXIST ? bpf_map_lookup_elem(&sp_nat, &ok) : 0;
		if (e && e->port != m.port) {
			snat_in_key(&ik, p, node, m.port);
			bpf_map_delete_elem(&sp_nat, &ik);
			m = *e;
		} else if (err < 0 && err != -EEXIST) {
			count(METRIC_CT_CREATE_FAILED);
		}
		snat_in_key(&ik, p, node, m.port);
	}
	if (nat_rewrite_addr(ctx, p, 1, &m.addr) < 0 || nat_rewrite_port(ctx, p, 1, m.port) < 0) {
		count(METRIC_MALFORMED);
		return CTX_ACT_DROP;
	}
	if (done)
		snat_release(&ok, &ik);
	return 0;
}

/* A reply to a SNATed flow (backend to node:port) gets the client back as
 * its destination; *in is then its mapping's reply key. 1 when p was one
 * (and is now backend to client), 0 when it was not, CTX_ACT_DROP-style
 * negative on a rewrite failure. */
static __always_inline int snat_reverse(struct __ctx_buff *ctx, struct pkt *p, struct ct_key *in)
{
	if (!is_tcp_or_udp(p->proto) || !pkt_has_l4(p))
		return 0;
	ct_key_init(in, &p->saddr, &p->daddr, p->sport, p->dport, p, NAT_F_IN);
	struct nat_entry *e = bpf_map_lookup_elem(&sp_nat, in);
	if (!e)
		return 0;
	union v6addr client = e->addr;
	__be16 port = e->port;
	if (nat_rewrite_addr(ctx, p, 0, &client) < 0 || nat_rewrite_port(ctx, p, 0, port) < 0)
		return -1;
	return 1;
}

/* After a reply's conntrack update (p: to the client; in: the reply key
 * it came by): frees the mapping when it was the flow's last packet. */
static __always_inline void snat_release_after_reply(const struct ct_key *in, const struct pkt *p)
{
	struct ct_key fk;

	if (p->proto != IPPROTO_TCP)
		return;
	ct_key_init(&fk, &p->daddr, &in->saddr, p->dport, in->sport, p, 0);
	struct ct_entry *flow = bpf_map_lookup_elem(&sp_ct, &fk);
	if (!flow || !ct_done(flow->state, p))
		return;
	fk.flags = NAT_F_OUT;
	snat_release(&fk, in);
}

/* An ICMP error about a SNATed flow (in: node:port -> backend, sent by the
 * backend or a router on the way) gets to the client as one about its own
 * packet (icmp_error_to_client). 1 when p was one, 0 when not, -1 on a
 * rewrite failure. */
static __always_inline int snat_icmp_error_reverse(struct __ctx_buff *ctx, struct pkt *p, struct pkt *in)
{
	struct ct_key k;

	/* The quote is a packet sent; its reply's tuple is the mapping's key. */
	ct_key_init(&k, &in->daddr, &in->saddr, in->dport, in->sport, in, NAT_F_IN);
	struct nat_entry *m = bpf_map_lookup_elem(&sp_nat, &k);
	if (!m)
		return 0;
	union v6addr client = m->addr;

	return icmp_error_to_client(ctx, p, in, &client, m->port);
}

/* An ICMP error about a SNATed flow's reply on its way to the client (in:
 * service -> client) goes to the backend svc names as one about its own
 * reply: quoting backend -> node:port, from the node when the client sent
 * it (icmp_error_to_backend). 1 when p was one, 0 when the flow has no
 * mapping, -1 on a rewrite failure. */
static __always_inline int snat_icmp_error_forward(struct __ctx_buff *ctx, struct pkt *p, struct pkt *in,
						   const struct ct_entry *svc)
{
	struct ct_key k;

	ct_key_init(&k, &in->daddr, &svc->nat_addr, in->dport, svc->nat_port, in, NAT_F_OUT);
	struct nat_entry *m = bpf_map_lookup_elem(&sp_nat, &k);
	if (!m)
		return 0;
	union v6addr node = m->addr;

	return icmp_error_to_backend(ctx, p, in, svc, &node, m->port) < 0 ? -1 : 1;
}
