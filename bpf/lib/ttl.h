/* The TTL / hop limit work of ip_forward, for the packets BPF forwards
 * instead of the stack: BPF host routing, NodePort redirects, hairpin. */
#pragma once

#include "common.h"
#include "metrics.h"

static __always_inline __u32 ttl_off(const struct pkt *p)
{
	return p->l3_off + (p->family == SP_AF_INET ? offsetof(struct iphdr, ttl) : offsetof(struct ipv6hdr, hop_limit));
}

/* p's TTL / hop limit; -1 when unreadable, counted. */
static __always_inline int ttl_of(struct __ctx_buff *ctx, const struct pkt *p)
{
	__u8 ttl;

	if (ctx_load_bytes(ctx, ttl_off(p), &ttl, 1) < 0) {
		count(METRIC_MALFORMED);
		return -1;
	}
	return ttl;
}

/* ip_forward's TTL / hop limit step, for what BPF forwards instead: 0
 * when decremented (the IPv4 checksum updated incrementally); 1 when it
 * would leave with 0, untouched: the caller hands it to the stack, whose
 * ip_forward answers with time exceeded (or, for an ICMP error, drops
 * it), or drops it where the stack could not take it; -1 on failure.
 * Both are counted. */
static __always_inline int fwd_ttl(struct __ctx_buff *ctx, const struct pkt *p)
{
	int got = ttl_of(ctx, p);
	__u8 ttl;

	if (got < 0)
		return -1;
	if (got <= 1) {
		count(METRIC_TTL_EXCEEDED);
		return 1;
	}
	ttl = got;
	ttl--;
	/* The IPv4 checksum sums 16-bit words: TTL is the high byte of its
	 * word, so the word drops by 0x0100. */
	if (p->family == SP_AF_INET &&
	    ctx_l3_csum_replace(ctx, p->l3_off + offsetof(struct iphdr, check), bpf_htons((ttl + 1) << 8),
				bpf_htons(ttl << 8), 2) < 0)
		goto malformed;
	if (ctx_store_bytes(ctx, ttl_off(p), &ttl, 1, 0) < 0)
		goto malformed;
	return 0;
malformed:
	count(METRIC_MALFORMED);
	return -1;
}

/* The verdict of a packet fwd_ttl would not have BPF forward (ret not 0):
 * expiring, to the stack; unreadable, dropped. */
static __always_inline int fwd_ttl_verdict(int ret)
{
	return ret > 0 ? CTX_ACT_OK : CTX_ACT_DROP;
}
