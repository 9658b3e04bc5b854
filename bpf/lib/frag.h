/* Fragment tracking: later fragments borrow the ports of their first. */
#pragma once

#include "common.h"
#include "ct_maps.h"
#include "lb_maps.h"
#include "metrics.h"

static __always_inline void frag_key_of(const struct pkt *p, struct frag_key *k)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr = p->saddr;
	k->daddr = p->daddr;
	k->id = p->frag_id;
	k->proto = p->proto;
	k->family = p->family;
}

/* Returns 0 when p has usable ports, -1 for a later fragment whose first
 * fragment was not seen (or not yet: fragments may arrive out of order). */
static __always_inline int frag_track(struct pkt *p)
{
	struct frag_key k;

	if (p->frag == FRAG_NONE || !is_tcp_or_udp(p->proto))
		return 0;
	frag_key_of(p, &k);
	if (p->frag == FRAG_FIRST) {
		struct frag_ports v = { .sport = p->sport, .dport = p->dport };

		bpf_map_update_elem(&sp_frags, &k, &v, BPF_ANY);
		return 0;
	}
	struct frag_ports *v = bpf_map_lookup_elem(&sp_frags, &k);
	if (!v)
		return -1;
	p->sport = v->sport;
	p->dport = v->dport;
	return 0;
}

/* Parses and fragment-tracks; returns -1 when the packet is handled
 * (verdict in *verdict) and 0 when p is ready for translation.
 *
 * A later fragment without its first has no ports, so no service can be
 * told. Sent to no frontend address it is no service's: it passes
 * untouched, and the receiver reassembles it in any order, as it would
 * through kube-proxy (whose conntrack reassembles first). To a frontend
 * address it is dropped: untranslated it would go to the VIP itself, and
 * the datagram cannot be reassembled with its DNATed first anyway. */
static __always_inline int pkt_prepare(struct __ctx_buff *ctx, struct pkt *p, int *verdict)
{
	int ret = parse_packet(ctx, p);

	if (ret) {
		count_pass(ret == PARSE_NOT_IP ? METRIC_PASS : METRIC_MALFORMED);
		*verdict = CTX_ACT_OK;
		return -1;
	}
	if (frag_track(p) < 0) {
		if (is_frontend_addr(&p->daddr, p->family)) {
			count(METRIC_FRAG_NOT_FOUND);
			*verdict = CTX_ACT_DROP;
		} else {
			count_pass(METRIC_FRAG_PASS);
			*verdict = CTX_ACT_OK;
		}
		return -1;
	}
	return 0;
}
