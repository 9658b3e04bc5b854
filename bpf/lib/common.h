/* Types and packet parsing shared by every servicepath program. */
#pragma once

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmpv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ctx.h"

/* linux/icmp.h drags in libc through linux/if.h, so the little of it we
 * need is here. */
#define ICMP_DEST_UNREACH 3
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
#define ICMP_PORT_UNREACH 3
#define ICMP_FRAG_NEEDED 4

struct icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be32 un;
};

#define SP_AF_INET 4
#define SP_AF_INET6 6

/* IPv4 addresses sit in p[0] with the rest zero, so one key type serves
 * both families and the Go side mirrors a single layout. */
union v6addr {
	__u8 addr[16];
	__be32 p[4];
	__u64 d[2];
};

static __always_inline int addr_equal(const union v6addr *a, const union v6addr *b)
{
	return a->d[0] == b->d[0] && a->d[1] == b->d[1];
}

enum frag_kind {
	FRAG_NONE = 0,
	FRAG_FIRST,
	FRAG_LATER, /* carries no L4 header */
};

struct pkt {
	union v6addr saddr;
	union v6addr daddr;
	__be16 sport;
	__be16 dport;
	__u32 l3_off;
	__u32 l4_off;
	__be32 frag_id;
	__u8 family;
	__u8 proto;
	__u8 tcp_flags;
	__u8 frag;
	/* TCP: the segment's sequence number and the one after it (SYN and
	 * FIN count one), host order, for conntrack's RST window. */
	__u32 tcp_seq;
	__u32 tcp_end;
};

#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

#define IPV4_MF 0x2000
#define IPV4_OFFSET 0x1fff
#define IPV6_FRAG_OFFSET 0xfff8
#define IPV6_FRAG_MF 0x0001
#define IPV6_MAX_EXT_HDRS 4

struct ipv6_frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

static __always_inline int pkt_has_l4(const struct pkt *p)
{
	return p->frag != FRAG_LATER;
}

static __always_inline int parse_ipv4(struct __ctx_buff *ctx, struct pkt *p)
{
	struct iphdr ip;

	if (ctx_load_bytes(ctx, p->l3_off, &ip, sizeof(ip)) < 0)
		return -1;
	if (ip.version != 4 || ip.ihl < 5)
		return -1;
	p->family = SP_AF_INET;
	p->proto = ip.protocol;
	p->saddr.p[0] = ip.saddr;
	p->daddr.p[0] = ip.daddr;
	p->l4_off = p->l3_off + ip.ihl * 4;

	__u16 fo = bpf_ntohs(ip.frag_off);
	if (fo & (IPV4_MF | IPV4_OFFSET)) {
		p->frag = (fo & IPV4_OFFSET) ? FRAG_LATER : FRAG_FIRST;
		p->frag_id = ip.id;
	}
	return 0;
}

static __always_inline int parse_ipv6(struct __ctx_buff *ctx, struct pkt *p)
{
	struct ipv6hdr ip6;

	if (ctx_load_bytes(ctx, p->l3_off, &ip6, sizeof(ip6)) < 0)
		return -1;
	if (ip6.version != 6)
		return -1;
	p->family = SP_AF_INET6;
	__builtin_memcpy(&p->saddr, &ip6.saddr, 16);
	__builtin_memcpy(&p->daddr, &ip6.daddr, 16);

	__u8 nh = ip6.nexthdr;
	__u32 off = p->l3_off + sizeof(ip6);

#pragma unroll
	for (int i = 0; i < IPV6_MAX_EXT_HDRS; i++) {
		switch (nh) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS: {
			struct ipv6_opt_hdr opt;

			if (ctx_load_bytes(ctx, off, &opt, sizeof(opt)) < 0)
				return -1;
			off += (opt.hdrlen + 1) * 8;
			nh = opt.nexthdr;
			break;
		}
		case IPPROTO_FRAGMENT: {
			struct ipv6_frag_hdr fh;

			if (ctx_load_bytes(ctx, off, &fh, sizeof(fh)) < 0)
				return -1;
			off += sizeof(fh);
			nh = fh.nexthdr;
			__u16 fo = bpf_ntohs(fh.frag_off);
			if (fo & (IPV6_FRAG_OFFSET | IPV6_FRAG_MF)) {
				p->frag = (fo & IPV6_FRAG_OFFSET) ? FRAG_LATER : FRAG_FIRST;
				p->frag_id = fh.identification;
			}
			break;
		}
		default:
			p->proto = nh;
			p->l4_off = off;
			return 0;
		}
	}
	return -1;
}

#define PARSE_NOT_IP 1

/* parse_packet fills p from ctx: 0 for IP, PARSE_NOT_IP for other
 * ethertypes, negative for IP it cannot read. Ports of non-first fragments
 * are filled in later from fragment tracking. */
static __always_inline int parse_packet(struct __ctx_buff *ctx, struct pkt *p)
{
	__builtin_memset(p, 0, sizeof(*p));
	p->l3_off = ETH_HLEN;

	int ret;
	__be16 proto = ctx_protocol(ctx);
	if (proto == bpf_htons(ETH_P_IP))
		ret = parse_ipv4(ctx, p);
	else if (proto == bpf_htons(ETH_P_IPV6))
		ret = parse_ipv6(ctx, p);
	else
		return PARSE_NOT_IP;
	if (ret < 0 || !pkt_has_l4(p))
		return ret;

	if (p->proto == IPPROTO_TCP) {
		__u8 hdr[14];

		if (ctx_load_bytes(ctx, p->l4_off, hdr, sizeof(hdr)) < 0)
			return -1;
		__builtin_memcpy(&p->sport, &hdr[0], 2);
		__builtin_memcpy(&p->dport, &hdr[2], 2);
		p->tcp_flags = hdr[13];
		__builtin_memcpy(&p->tcp_seq, &hdr[4], 4);
		p->tcp_seq = bpf_ntohl(p->tcp_seq);
		/* The frame's length may include link padding: a few bytes more
		 * than the payload, which the window absorbs. */
		__u32 hlen = p->l4_off + (hdr[12] >> 4) * 4, len = ctx_len(ctx);
		p->tcp_end = p->tcp_seq + (len > hlen ? len - hlen : 0) + !!(p->tcp_flags & TCPF_SYN) +
			     !!(p->tcp_flags & TCPF_FIN);
	} else if (p->proto == IPPROTO_UDP) {
		__be16 ports[2];

		if (ctx_load_bytes(ctx, p->l4_off, ports, sizeof(ports)) < 0)
			return -1;
		p->sport = ports[0];
		p->dport = ports[1];
	}
	return 0;
}

static __always_inline int is_tcp_or_udp(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP;
}
