/* Connection tracking: lookup, creation and TCP state with lifetimes. */
#pragma once

#include "common.h"
#include "config.h"
#include "ct_maps.h"
#include "metrics.h"

#define NSEC_PER_SEC 1000000000ULL

static __always_inline void ct_key_init(struct ct_key *k, const union v6addr *saddr, const union v6addr *daddr,
					__be16 sport, __be16 dport, const struct pkt *p, __u8 flags)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr = *saddr;
	k->daddr = *daddr;
	k->sport = sport;
	k->dport = dport;
	k->proto = p->proto;
	k->family = p->family;
	k->flags = flags;
}

static __always_inline int ct_closing(__u16 state)
{
	return (state & CT_S_RST) || ((state & CT_S_FWD_FIN) && (state & CT_S_REV_FIN));
}

static __always_inline __u64 ct_lifetime_ns(__u16 state, __u8 proto)
{
	__u32 s;

	if (proto != IPPROTO_TCP)
		s = cfg_ct_nontcp_s;
	else if (ct_closing(state))
		s = cfg_ct_tcp_close_s;
	else if (state & CT_S_ESTABLISHED)
		s = cfg_ct_tcp_established_s;
	else
		s = cfg_ct_tcp_syn_s;
	return (__u64)s * NSEC_PER_SEC;
}

/* How far from the next sequence number its sender was seen to use an
 * RST may be and still close the flow: about a receive window, as
 * nf_conntrack accepts an RST only within the window. A blind or stale RST
 * (out of window) passes on to the endpoint, which checks it itself
 * (RFC 5961), and leaves the flow open. */
#define CT_RST_WINDOW (1 << 20)

static __always_inline int ct_rst_in_window(const struct ct_entry *e, const struct pkt *p, int reply)
{
	if (!(e->state & (reply ? CT_S_REV_SEQ : CT_S_FWD_SEQ)))
		return 1;
	__s32 d = (__s32)(p->tcp_seq - (reply ? e->rev_seq : e->fwd_seq));

	return d >= -CT_RST_WINDOW && d <= CT_RST_WINDOW;
}

static __always_inline __u16 ct_next_state(const struct ct_entry *e, const struct pkt *p, int reply)
{
	__u16 state = e->state;

	if (reply)
		state |= CT_S_REPLIED;
	if (p->proto != IPPROTO_TCP || !pkt_has_l4(p))
		return state;
	if (p->tcp_flags & TCPF_RST) {
		if (!ct_rst_in_window(e, p, reply)) {
			count(METRIC_CT_RST_OUT_OF_WINDOW);
			return state;
		}
		state |= CT_S_RST;
	}
	if (p->tcp_flags & TCPF_FIN)
		state |= reply ? CT_S_REV_FIN : CT_S_FWD_FIN;
	if (!(p->tcp_flags & TCPF_SYN))
		state |= CT_S_ESTABLISHED;
	return state;
}

/* A bare SYN on a closed flow is a new connection reusing the tuple. */
static __always_inline int ct_is_reopen(const struct ct_entry *e, const struct pkt *p)
{
	return p->proto == IPPROTO_TCP && pkt_has_l4(p) &&
	       (p->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN && ct_closing(e->state);
}

/* A flow is over once both its entries' lifetimes have passed; GC only
 * reclaims the space. */
static __always_inline int ct_expired(const struct ct_entry *svc, const struct ct_entry *flow)
{
	__u64 expires = svc->expires;

	if (flow && flow->expires > expires)
		expires = flow->expires;
	return expires <= bpf_ktime_get_ns();
}

/* Whether p ends its closed TCP flow: an RST, or a segment without FIN
 * after both FINs (the last ACK). Its SNAT mapping can go then. */
static __always_inline int ct_done(__u16 state, const struct pkt *p)
{
	return p->proto == IPPROTO_TCP && pkt_has_l4(p) &&
	       ((state & CT_S_RST) || (ct_closing(state) && !(p->tcp_flags & TCPF_FIN)));
}

/* Updates state, lifetime and counters of e for one packet; returns the
 * new expiry so a paired entry can share it. */
static __always_inline __u64 ct_account(struct ct_entry *e, const struct pkt *p, __u32 len, int reply)
{
	__u16 state = ct_next_state(e, p, reply);
	__u64 expires = bpf_ktime_get_ns() + ct_lifetime_ns(state, p->proto);

	/* An RST is no sender's next sequence number to go by. */
	if (p->proto == IPPROTO_TCP && pkt_has_l4(p) && !(p->tcp_flags & TCPF_RST)) {
		if (reply)
			e->rev_seq = p->tcp_end;
		else
			e->fwd_seq = p->tcp_end;
		state |= reply ? CT_S_REV_SEQ : CT_S_FWD_SEQ;
	}
	if (state != e->state)
		e->state = state;
	e->expires = expires;
	if (reply) {
		__sync_fetch_and_add(&e->rev_packets, 1);
		__sync_fetch_and_add(&e->rev_bytes, len);
	} else {
		__sync_fetch_and_add(&e->fwd_packets, 1);
		__sync_fetch_and_add(&e->fwd_bytes, len);
	}
	return expires;
}
