/* ICMP: rejecting connections to services without backends, and
 * reverse-translating ICMP errors that quote a translated flow. */
#pragma once

#include "common.h"
#include "csum.h"
#include "conntrack.h"
#include "nat.h"

/* Quoted: the offending IP header plus the first 8 bytes after it. IPv4
 * with options is not quoted; the caller drops it instead. */
#define ICMP4_QUOTE_LEN (sizeof(struct iphdr) + 8)
#define ICMP6_QUOTE_LEN (sizeof(struct ipv6hdr) + 8)

struct icmp4_unreach {
	struct iphdr ip;
	struct icmphdr icmp;
	__u8 quote[ICMP4_QUOTE_LEN];
};

struct icmp6_unreach {
	struct ipv6hdr ip6;
	struct icmp6hdr icmp6;
	__u8 quote[ICMP6_QUOTE_LEN];
};

struct icmp6_pseudo_tail {
	__be32 len;
	__be32 nexthdr;
};

/* Errors are built by tc: XDP hands their packets on, as it may lack the
 * room or the stack (lb_no_backend, np_too_big). */
#if !CTX_IS_XDP
/* What an error built here says, and where from. */
struct icmp_err {
	const union v6addr *src;
	__u8 type;
	__u8 code;
	__be32 un; /* the 4 bytes after the checksum: the next-hop MTU of a frag needed or packet too big */
};

static __always_inline int swap_macs(struct __ctx_buff *ctx)
{
	struct ethhdr eth;
	__u8 mac[ETH_ALEN];

	if (ctx_load_bytes(ctx, 0, &eth, sizeof(eth)) < 0)
		return -1;
	__builtin_memcpy(mac, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, mac, ETH_ALEN);
	return ctx_store_bytes(ctx, 0, &eth, sizeof(eth), 0);
}

static __always_inline int icmp4_build_error(struct __ctx_buff *ctx, const struct pkt *p, const struct icmp_err *e)
{
	struct icmp4_unreach r;

	if (p->l4_off != p->l3_off + sizeof(struct iphdr))
		return -1;
	__builtin_memset(&r, 0, sizeof(r));
	if (ctx_load_bytes(ctx, p->l3_off, r.quote, sizeof(r.quote)) < 0)
		return -1;
	r.ip.version = 4;
	r.ip.ihl = 5;
	r.ip.tot_len = bpf_htons(sizeof(r));
	r.ip.ttl = 64;
	r.ip.protocol = IPPROTO_ICMP;
	r.ip.saddr = e->src->p[0];
	r.ip.daddr = p->saddr.p[0];
	r.ip.check = csum_fold32(bpf_csum_diff(0, 0, (__be32 *)&r.ip, sizeof(r.ip), 0));
	r.icmp.type = e->type;
	r.icmp.code = e->code;
	r.icmp.un = e->un;
	r.icmp.checksum = csum_fold32(bpf_csum_diff(0, 0, (__be32 *)&r.icmp, sizeof(r.icmp) + sizeof(r.quote), 0));

	if (ctx_change_tail(ctx, ETH_HLEN + sizeof(r)) < 0)
		return -1;
	return ctx_store_bytes(ctx, ETH_HLEN, &r, sizeof(r), 0);
}

static __always_inline int icmp6_build_error(struct __ctx_buff *ctx, const struct pkt *p, const struct icmp_err *e)
{
	struct icmp6_unreach r;
	struct icmp6_pseudo_tail tail = {
		.len = bpf_htonl(sizeof(r.icmp6) + sizeof(r.quote)),
		.nexthdr = bpf_htonl(IPPROTO_ICMPV6),
	};

	__builtin_memset(&r, 0, sizeof(r));
	if (ctx_load_bytes(ctx, p->l3_off, r.quote, sizeof(r.quote)) < 0)
		return -1;
	r.ip6.version = 6;
	r.ip6.payload_len = bpf_htons(sizeof(r.icmp6) + sizeof(r.quote));
	r.ip6.nexthdr = IPPROTO_ICMPV6;
	r.ip6.hop_limit = 64;
	__builtin_memcpy(&r.ip6.saddr, e->src, 16);
	__builtin_memcpy(&r.ip6.daddr, &p->saddr, 16);
	r.icmp6.icmp6_type = e->type;
	r.icmp6.icmp6_code = e->code;
	r.icmp6.icmp6_mtu = e->un;

	__u32 sum = bpf_csum_diff(0, 0, (__be32 *)&r.ip6.saddr, 32, 0);
	sum = bpf_csum_diff(0, 0, (__be32 *)&tail, sizeof(tail), sum);
	sum = bpf_csum_diff(0, 0, (__be32 *)&r.icmp6, sizeof(r.icmp6) + sizeof(r.quote), sum);
	r.icmp6.icmp6_cksum = csum_fold32(sum);

	if (ctx_change_tail(ctx, ETH_HLEN + sizeof(r)) < 0)
		return -1;
	return ctx_store_bytes(ctx, ETH_HLEN, &r, sizeof(r), 0);
}

/* Turns p, in place, into the error e back to its source, quoting its IP
 * header and the 8 bytes after it; the caller sends it out the device it
 * came in by. */
static __always_inline int icmp_reply(struct __ctx_buff *ctx, const struct pkt *p, const struct icmp_err *e)
{
	int ret = p->family == SP_AF_INET ? icmp4_build_error(ctx, p, e) : icmp6_build_error(ctx, p, e);

	if (ret < 0)
		return ret;
	return swap_macs(ctx);
}

/* Turns p into a port-unreachable error from its destination. */
static __always_inline int icmp_reply_unreach(struct __ctx_buff *ctx, const struct pkt *p)
{
	struct icmp_err e = {.src = &p->daddr};

	if (p->family == SP_AF_INET) {
		e.type = ICMP_DEST_UNREACH;
		e.code = ICMP_PORT_UNREACH;
	} else {
		e.type = ICMPV6_DEST_UNREACH;
		e.code = ICMPV6_PORT_UNREACH;
	}
	return icmp_reply(ctx, p, &e);
}
#endif

static __always_inline int icmp_is_error(const struct pkt *p, __u8 type)
{
	if (p->family == SP_AF_INET)
		return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
	return type == ICMPV6_DEST_UNREACH || type == ICMPV6_PKT_TOOBIG || type == ICMPV6_TIME_EXCEED ||
	       type == ICMPV6_PARAMPROB;
}

static __always_inline int store_addr(struct __ctx_buff *ctx, __u32 off, const union v6addr *a, __u8 family)
{
	if (family == SP_AF_INET)
		return ctx_store_bytes(ctx, off, &a->p[0], 4, 0);
	return ctx_store_bytes(ctx, off, a, 16, 0);
}

/* Parses the packet the ICMP error p quotes into in. 1 when p is an
 * error quoting the ports of a TCP or UDP packet, else 0. */
static __always_inline int icmp_error_quote(struct __ctx_buff *ctx, const struct pkt *p, struct pkt *in)
{
	__u8 type;

	if (!pkt_has_l4(p) || ctx_load_bytes(ctx, p->l4_off, &type, 1) < 0 || !icmp_is_error(p, type))
		return 0;

	/* ICMP and ICMPv6 headers are both 8 bytes before the quote. */
	__builtin_memset(in, 0, sizeof(*in));
	in->l3_off = p->l4_off + 8;
	if ((p->family == SP_AF_INET ? parse_ipv4(ctx, in) : parse_ipv6(ctx, in)) < 0)
		return 0;
	if (in->frag == FRAG_LATER || !is_tcp_or_udp(in->proto))
		return 0;
	if (ctx_load_bytes(ctx, in->l4_off, &in->sport, 2) < 0 || ctx_load_bytes(ctx, in->l4_off + 2, &in->dport, 2) < 0)
		return 0;
	return 1;
}

/* Rewrites the quoted source (is_src) or destination of in, inside the
 * error p, to addr:port: the quoted IPv4 header checksum, the quoted L4
 * checksum, the ICMP checksum. The outer header is the caller's. */
static __always_inline int icmp_quote_rewrite(struct __ctx_buff *ctx, const struct pkt *p, struct pkt *in, int is_src,
					      const union v6addr *addr, __be16 port)
{
	union v6addr *from = is_src ? &in->saddr : &in->daddr;
	__be16 *from_port = is_src ? &in->sport : &in->dport;
	__u32 d_addr = csum_diff_addr(from, addr, in->family);
	__u32 d_icmp = d_addr;
	__u16 old, new;

	if (in->family == SP_AF_INET) {
		__u32 off = in->l3_off + offsetof(struct iphdr, check);

		if (ctx_load_bytes(ctx, off, &old, 2) < 0)
			return -1;
		new = csum_apply(old, d_addr);
		if (ctx_store_bytes(ctx, off, &new, 2, 0) < 0)
			return -1;
		d_icmp = csum_add32(d_icmp, csum_diff16(old, new));
		off = in->l3_off + (is_src ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
		if (store_addr(ctx, off, addr, SP_AF_INET) < 0)
			return -1;
	} else if (store_addr(ctx, in->l3_off + (is_src ? offsetof(struct ipv6hdr, saddr) : offsetof(struct ipv6hdr, daddr)),
			      addr, SP_AF_INET6) < 0) {
		return -1;
	}

	/* The quoted L4 checksum is there only if the quote is long enough. */
	__u32 l4c = in->l4_off + (in->proto == IPPROTO_TCP ? offsetof(struct tcphdr, check) : offsetof(struct udphdr, check));
	if (ctx_load_bytes(ctx, l4c, &old, 2) == 0 && !(in->proto == IPPROTO_UDP && old == 0)) {
		new = csum_apply(old, csum_add32(d_addr, csum_diff16(*from_port, port)));
		if (in->proto == IPPROTO_UDP && new == 0)
			new = 0xffff;
		if (ctx_store_bytes(ctx, l4c, &new, 2, 0) < 0)
			return -1;
		d_icmp = csum_add32(d_icmp, csum_diff16(old, new));
	}
	if (ctx_store_bytes(ctx, in->l4_off + (is_src ? 0 : 2), &port, 2, 0) < 0)
		return -1;
	d_icmp = csum_add32(d_icmp, csum_diff16(*from_port, port));

	__u32 icmp_csum = p->l4_off + 2;
	if (ctx_load_bytes(ctx, icmp_csum, &old, 2) < 0)
		return -1;
	new = csum_apply(old, d_icmp);
	if (ctx_store_bytes(ctx, icmp_csum, &new, 2, 0) < 0)
		return -1;
	*from = *addr;
	*from_port = port;
	return 0;
}

/* The quote in (client -> backend, after DNAT) of an error on its way to
 * the client gets vip:vport, the service the client used, back as its
 * destination; so does the outer source when the backend itself sent the
 * error, as the client knows no backend. A router's address stays, where
 * kube-proxy's nf_nat would put the service there too: the client can
 * still tell which hop sent it. */
static __always_inline int icmp_quote_to_service(struct __ctx_buff *ctx, struct pkt *p, struct pkt *in,
						 const union v6addr *vip, __be16 vport)
{
	union v6addr backend = in->daddr;

	if (icmp_quote_rewrite(ctx, p, in, 0, vip, vport) < 0)
		return -1;
	if (addr_equal(&p->saddr, &backend) && nat_rewrite_addr(ctx, p, 1, vip) < 0)
		return -1;
	return 0;
}

/* An error about a client's packet whose source was translated (SNAT to
 * the node, or the hairpin address) gets to the client as one about its
 * own packet: quoting client:cport -> service, to the client, from the
 * service when the backend sent it. Both entries are found before anything
 * is rewritten, so an error only half known passes untouched. 1 when
 * rewritten, 0 when in is no flow's, -1 on a rewrite failure. */
static __always_inline int icmp_error_to_client(struct __ctx_buff *ctx, struct pkt *p, struct pkt *in,
						const union v6addr *client, __be16 cport)
{
	struct ct_key k;

	ct_key_init(&k, client, &in->daddr, cport, in->dport, in, 0);
	struct ct_entry *flow = bpf_map_lookup_elem(&sp_ct, &k);
	if (!flow)
		return 0;
	union v6addr vip = flow->nat_addr;
	__be16 vport = flow->nat_port;

	if (icmp_quote_rewrite(ctx, p, in, 1, client, cport) < 0 || nat_rewrite_addr(ctx, p, 0, client) < 0 ||
	    icmp_quote_to_service(ctx, p, in, &vip, vport) < 0)
		return -1;
	return 1;
}

/* The service entry of the flow whose reply an error quotes (in: vip:vport
 * -> client, as the client got it): the client's own tuple to the service,
 * naming the backend. */
static __always_inline struct ct_entry *icmp_quoted_reply_service(const struct pkt *in)
{
	struct ct_key k;

	ct_key_init(&k, &in->daddr, &in->saddr, in->dport, in->sport, in, CT_F_SERVICE);
	return bpf_map_lookup_elem(&sp_ct, &k);
}

/* An error about a reply on its way to the client (in: vip:vport ->
 * client, from the client or a router toward it) goes to the backend svc
 * names as one about its own reply, as nf_nat translates it for
 * kube-proxy: quoting backend -> client, to the backend. A flow whose
 * source was translated (snat: the node's address and port, or the
 * hairpin address) has that as the quoted destination, and as the outer
 * source when the client itself sent the error. */
static __always_inline int icmp_error_to_backend(struct __ctx_buff *ctx, struct pkt *p, struct pkt *in,
						 const struct ct_entry *svc, const union v6addr *snat, __be16 sport)
{
	union v6addr client = in->daddr, backend = svc->nat_addr;
	__be16 bport = svc->nat_port;

	if (icmp_quote_rewrite(ctx, p, in, 1, &backend, bport) < 0 || nat_rewrite_addr(ctx, p, 0, &backend) < 0)
		return -1;
	if (!snat)
		return 0;
	if (icmp_quote_rewrite(ctx, p, in, 0, snat, sport) < 0)
		return -1;
	if (addr_equal(&p->saddr, &client) && nat_rewrite_addr(ctx, p, 1, snat) < 0)
		return -1;
	return 0;
}

/* An ICMP error on its way to the client quotes the client's packet as it
 * left after DNAT (client -> backend). Rewrites the quoted destination
 * back to the VIP, the quoted checksums, the ICMP checksum, and the outer
 * source when the backend itself sent the error. Returns 1 if rewritten. */
static __always_inline int icmp_error_rev_nat(struct __ctx_buff *ctx, struct pkt *p)
{
	struct pkt in;
	struct ct_key k;

	if (!icmp_error_quote(ctx, p, &in))
		return 0;
	ct_key_init(&k, &in.saddr, &in.daddr, in.sport, in.dport, &in, 0);
	struct ct_entry *e = bpf_map_lookup_elem(&sp_ct, &k);
	if (!e)
		return 0;
	union v6addr vip = e->nat_addr;
	return icmp_quote_to_service(ctx, p, &in, &vip, e->nat_port) == 0;
}
