/* Address and port rewrites with checksum updates, for both families. */
#pragma once

#include "common.h"
#include "csum.h"

static __always_inline __u32 csum_diff_addr(const union v6addr *from, const union v6addr *to, __u8 family)
{
	__u32 size = family == SP_AF_INET ? 4 : 16;

	return (__u32)bpf_csum_diff((__be32 *)from, size, (__be32 *)to, size, 0);
}

static __always_inline __u32 l4_csum_off(const struct pkt *p)
{
	switch (p->proto) {
	case IPPROTO_TCP:
		return p->l4_off + offsetof(struct tcphdr, check);
	case IPPROTO_UDP:
		return p->l4_off + offsetof(struct udphdr, check);
	case IPPROTO_ICMPV6:
		return p->l4_off + offsetof(struct icmp6hdr, icmp6_cksum);
	}
	return 0; /* ICMPv4 has no pseudo-header */
}

static __always_inline __u64 l4_csum_flags(const struct pkt *p)
{
	/* IPv4 UDP may carry no checksum; 0 must stay 0, and a result of 0
	 * must be sent as 0xffff. */
	if (p->proto == IPPROTO_UDP && p->family == SP_AF_INET)
		return BPF_F_MARK_MANGLED_0;
	return 0;
}

/* Rewrites the source (is_src) or destination address, updating the IPv4
 * header checksum and the L4 pseudo-header checksum when the L4 header is
 * in this packet. */
static __always_inline int nat_rewrite_addr(struct __ctx_buff *ctx, struct pkt *p, int is_src,
					    const union v6addr *to)
{
	union v6addr *from = is_src ? &p->saddr : &p->daddr;
	__u32 csum_off = pkt_has_l4(p) ? l4_csum_off(p) : 0;

	if (p->family == SP_AF_INET) {
		__u32 off = p->l3_off + (is_src ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));

		if (csum_off && ctx_l4_csum_replace(ctx, csum_off, from->p[0], to->p[0],
						    BPF_F_PSEUDO_HDR | l4_csum_flags(p) | 4) < 0)
			return -1;
		if (ctx_l3_csum_replace(ctx, p->l3_off + offsetof(struct iphdr, check), from->p[0], to->p[0], 4) < 0)
			return -1;
		if (ctx_store_bytes(ctx, off, &to->p[0], 4, 0) < 0)
			return -1;
	} else {
		__u32 off = p->l3_off + (is_src ? offsetof(struct ipv6hdr, saddr) : offsetof(struct ipv6hdr, daddr));

		if (csum_off) {
			__s64 diff = bpf_csum_diff(from->p, 16, (__be32 *)to->p, 16, 0);

			if (ctx_l4_csum_replace(ctx, csum_off, 0, diff, BPF_F_PSEUDO_HDR) < 0)
				return -1;
		}
		if (ctx_store_bytes(ctx, off, to, 16, 0) < 0)
			return -1;
	}
	*from = *to;
	return 0;
}

static __always_inline int nat_rewrite_port(struct __ctx_buff *ctx, struct pkt *p, int is_src, __be16 to)
{
	__be16 *from = is_src ? &p->sport : &p->dport;
	__u32 off = p->l4_off + (is_src ? 0 : 2);

	if (!pkt_has_l4(p) || *from == to)
		return 0;
	if (ctx_l4_csum_replace(ctx, l4_csum_off(p), *from, to, l4_csum_flags(p) | 2) < 0)
		return -1;
	if (ctx_store_bytes(ctx, off, &to, 2, 0) < 0)
		return -1;
	*from = to;
	return 0;
}
