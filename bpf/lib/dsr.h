/* Direct server return: the entry node hands a north-south flow to the
 * backend's node with the service address attached, and that node answers
 * the client from the service address itself. Two dispatch modes:
 *  - an IPv4 option / IPv6 destination option after the IP header carries
 *    the service address and port; the packet is otherwise the DNATed one;
 *  - IPIP / IPv6-in-IPv6: the DNATed packet inside an outer header whose
 *    source is the service address. IPIP has no field for the port, so the
 *    outer IPv4 ID carries it (the outer header is DF: an atomic datagram,
 *    whose ID means nothing, RFC 6864), and the outer IPv6 flow label. */
#pragma once

#include "common.h"
#include "conntrack.h"
#include "csum.h"
#include "metrics.h"

/* Option types no one else uses. IPv4: copied on fragmentation. IPv6: the
 * top bits 00 tell a node that does not know it to skip it. */
#define DSR_IPV4_OPT_TYPE (0x80 | 0x1a)
#define DSR_IPV6_OPT_TYPE 0x1b

struct dsr_opt_v4 {
	__u8 type;
	__u8 len;
	__be16 port;
	__be32 addr;
};

/* A whole destination options header: 24 bytes, a multiple of 8. The last
 * two bytes are two Pad1 options. */
struct dsr_opt_v6 {
	__u8 nexthdr;
	__u8 hdrlen; /* in 8-byte units, not counting the first 8 */
	__u8 type;
	__u8 len;
	__be32 addr[4];
	__be16 port;
	__u16 pad;
};

#define IPV4_DF 0x4000
#define DSR_TTL 64

/* Service address and port a DSR packet carries. */
struct dsr_info {
	union v6addr addr;
	__be16 port;
	__u16 state; /* CT_S_NS_DSR, or with CT_S_NS_DSR_IPIP */
};

/* An IP length field grown by add bytes. A BIG TCP packet's reads 0 (the
 * skb has the length) and stays 0, as does one a GSO packet would take
 * past 64 KiB: segmentation writes each segment's own. */
static __always_inline __be16 dsr_len_add(__be16 len, __u32 add)
{
	__u32 n = bpf_ntohs(len);

	if (n == 0 || n + add > 0xffff)
		return 0;
	return bpf_htons(n + add);
}

static __always_inline int dsr_add_opt4(struct __ctx_buff *ctx, struct pkt *p, const struct dsr_info *d)
{
	struct dsr_opt_v4 opt = {.type = DSR_IPV4_OPT_TYPE, .len = sizeof(opt), .port = d->port, .addr = d->addr.p[0]};
	__u32 off = p->l3_off;
	__be16 old[2], new[2];

	if (ctx_load_bytes(ctx, off, old, sizeof(old)) < 0)
		return -1;
	/* Room for the option right after the 20-byte header. */
	if (ctx_adjust_room(ctx, sizeof(opt), BPF_ADJ_ROOM_NET, 0) < 0)
		return -1;
	new[0] = bpf_htons((bpf_ntohs(old[0]) & 0xf0ff) | (7 << 8)); /* ihl 5 -> 7 */
	new[1] = dsr_len_add(old[1], sizeof(opt));
	__s64 diff = bpf_csum_diff((__be32 *)old, sizeof(old), (__be32 *)new, sizeof(new), 0);
	diff = bpf_csum_diff(0, 0, (__be32 *)&opt, sizeof(opt), diff);
	if (ctx_store_bytes(ctx, off, new, sizeof(new), 0) < 0 ||
	    ctx_store_bytes(ctx, off + sizeof(struct iphdr), &opt, sizeof(opt), 0) < 0 ||
	    ctx_l3_csum_replace(ctx, off + offsetof(struct iphdr, check), 0, diff, 0) < 0)
		return -1;
	p->l4_off += sizeof(opt);
	return 0;
}

static __always_inline int dsr_add_opt6(struct __ctx_buff *ctx, struct pkt *p, const struct dsr_info *d)
{
	struct dsr_opt_v6 opt = {
		.nexthdr = p->proto,
		.hdrlen = (sizeof(opt) - 8) / 8,
		.type = DSR_IPV6_OPT_TYPE,
		.len = sizeof(opt.addr) + sizeof(opt.port),
		.port = d->port,
	};
	__u32 off = p->l3_off;
	__be16 plen;
	__u8 nh = IPPROTO_DSTOPTS;

	__builtin_memcpy(opt.addr, &d->addr, 16);
	if (ctx_load_bytes(ctx, off + offsetof(struct ipv6hdr, payload_len), &plen, sizeof(plen)) < 0)
		return -1;
	if (ctx_adjust_room(ctx, sizeof(opt), BPF_ADJ_ROOM_NET, 0) < 0)
		return -1;
	plen = dsr_len_add(plen, sizeof(opt));
	if (ctx_store_bytes(ctx, off + offsetof(struct ipv6hdr, payload_len), &plen, sizeof(plen), 0) < 0 ||
	    ctx_store_bytes(ctx, off + offsetof(struct ipv6hdr, nexthdr), &nh, 1, 0) < 0 ||
	    ctx_store_bytes(ctx, off + sizeof(struct ipv6hdr), &opt, sizeof(opt), 0) < 0)
		return -1;
	p->l4_off += sizeof(opt);
	return 0;
}

/* Wraps the (DNATed) packet in an outer header to the backend. */
static __always_inline int dsr_encap(struct __ctx_buff *ctx, const struct pkt *p, const struct dsr_info *d)
{
	__u32 off = p->l3_off;

	if (p->family == SP_AF_INET) {
		struct iphdr inner, outer;

		if (ctx_load_bytes(ctx, off, &inner, sizeof(inner)) < 0)
			return -1;
		__builtin_memset(&outer, 0, sizeof(outer));
		outer.version = 4;
		outer.ihl = 5;
		outer.tos = inner.tos;
		outer.tot_len = dsr_len_add(inner.tot_len, sizeof(outer));
		outer.id = d->port;
		outer.frag_off = bpf_htons(IPV4_DF);
		outer.ttl = DSR_TTL;
		outer.protocol = IPPROTO_IPIP;
		outer.saddr = d->addr.p[0];
		outer.daddr = p->daddr.p[0];
		outer.check = csum_fold32((__u32)bpf_csum_diff(0, 0, (__be32 *)&outer, sizeof(outer), 0));
		if (ctx_adjust_room(ctx, sizeof(outer), BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4) < 0)
			return -1;
		return ctx_store_bytes(ctx, off, &outer, sizeof(outer), 0);
	}
	struct ipv6hdr inner, outer;

	if (ctx_load_bytes(ctx, off, &inner, sizeof(inner)) < 0)
		return -1;
	__builtin_memset(&outer, 0, sizeof(outer));
	/* version 6, the inner traffic class, the port as flow label */
	__be32 vtcfl = bpf_htonl((6 << 28) | ((bpf_ntohl(*(__be32 *)&inner) >> 20 & 0xff) << 20) | bpf_ntohs(d->port));
	__builtin_memcpy(&outer, &vtcfl, 4);
	outer.payload_len = dsr_len_add(inner.payload_len, sizeof(inner));
	outer.nexthdr = IPPROTO_IPV6;
	outer.hop_limit = DSR_TTL;
	__builtin_memcpy(&outer.saddr, &d->addr, 16);
	__builtin_memcpy(&outer.daddr, &p->daddr, 16);
	if (ctx_adjust_room(ctx, sizeof(outer), BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6) < 0)
		return -1;
	return ctx_store_bytes(ctx, off, &outer, sizeof(outer), 0);
}

/* What dispatching p in mode (CT_S_NS_DSR, or with CT_S_NS_DSR_IPIP) adds
 * to it. */
static __always_inline __u32 dsr_overhead(const struct pkt *p, __u16 mode)
{
	if (mode & CT_S_NS_DSR_IPIP)
		return p->family == SP_AF_INET ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
	return p->family == SP_AF_INET ? sizeof(struct dsr_opt_v4) : sizeof(struct dsr_opt_v6);
}

/* Dispatches p (DNATed to a remote backend) by d->state's mode. */
static __always_inline int dsr_dispatch(struct __ctx_buff *ctx, struct pkt *p, const struct dsr_info *d)
{
	if (d->state & CT_S_NS_DSR_IPIP) {
		count(METRIC_DSR_IPIP);
		return dsr_encap(ctx, p, d);
	}
	count(METRIC_DSR_OPT);
	return p->family == SP_AF_INET ? dsr_add_opt4(ctx, p, d) : dsr_add_opt6(ctx, p, d);
}

/* Whether the option mode can carry p: the option goes right after the
 * fixed header, so none may be there already. */
static __always_inline int dsr_opt_fits(struct __ctx_buff *ctx, const struct pkt *p)
{
	__u32 base = p->family == SP_AF_INET ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);

	return p->l4_off == p->l3_off + base;
}

/* On the backend's node: reads a DSR option off p; 1 with *d filled when
 * there is one. The option stays: the backend's stack skips it. */
static __always_inline int dsr_read_opt(struct __ctx_buff *ctx, const struct pkt *p, struct dsr_info *d)
{
	__u32 off = p->l3_off;

	if (p->family == SP_AF_INET) {
		struct dsr_opt_v4 opt;

		if (p->l4_off != off + sizeof(struct iphdr) + sizeof(opt) ||
		    ctx_load_bytes(ctx, off + sizeof(struct iphdr), &opt, sizeof(opt)) < 0 ||
		    opt.type != DSR_IPV4_OPT_TYPE || opt.len != sizeof(opt))
			return 0;
		__builtin_memset(&d->addr, 0, sizeof(d->addr));
		d->addr.p[0] = opt.addr;
		d->port = opt.port;
	} else {
		struct dsr_opt_v6 opt;
		__u8 nh;

		if (ctx_load_bytes(ctx, off + offsetof(struct ipv6hdr, nexthdr), &nh, 1) < 0 ||
		    nh != IPPROTO_DSTOPTS ||
		    ctx_load_bytes(ctx, off + sizeof(struct ipv6hdr), &opt, sizeof(opt)) < 0 ||
		    opt.type != DSR_IPV6_OPT_TYPE || opt.len != sizeof(opt.addr) + sizeof(opt.port))
			return 0;
		__builtin_memcpy(&d->addr, opt.addr, 16);
		d->port = opt.port;
	}
	d->state = CT_S_NS_DSR;
	return 1;
}

/* On the backend's node: strips an IPIP / IPv6-in-IPv6 header whose
 * destination is a local pod; 1 with *d filled and p re-parsed. */
static __always_inline int dsr_decap(struct __ctx_buff *ctx, struct pkt *p, struct dsr_info *d)
{
	__u32 off = p->l3_off;
	__s32 len;

	if (p->family == SP_AF_INET && p->proto == IPPROTO_IPIP) {
		__be16 id;

		if (ctx_load_bytes(ctx, off + offsetof(struct iphdr, id), &id, sizeof(id)) < 0)
			return 0;
		len = sizeof(struct iphdr);
		d->port = id;
	} else if (p->family == SP_AF_INET6 && p->proto == IPPROTO_IPV6) {
		__be32 vtcfl;

		if (ctx_load_bytes(ctx, off, &vtcfl, sizeof(vtcfl)) < 0)
			return 0;
		len = sizeof(struct ipv6hdr);
		d->port = bpf_htons(bpf_ntohl(vtcfl) & 0xffff);
	} else {
		return 0;
	}
	d->addr = p->saddr;
	d->state = CT_S_NS_DSR | CT_S_NS_DSR_IPIP;
	if (ctx_adjust_room(ctx, -len, BPF_ADJ_ROOM_MAC, 0) < 0)
		return -1;
	if (parse_packet(ctx, p) < 0)
		return -1;
	return 1;
}

/* Records a DSR flow on the backend's node as a flow entry, so the egress
 * program answers the client from the service address (lb_reply). */
static __always_inline void dsr_learn(struct __ctx_buff *ctx, const struct pkt *p, const struct dsr_info *d)
{
	struct ct_key k;

	ct_key_init(&k, &p->saddr, &p->daddr, p->sport, p->dport, p, 0);
	struct ct_entry *e = bpf_map_lookup_elem(&sp_ct, &k);
	if (!e || !addr_equal(&e->nat_addr, &d->addr) || e->nat_port != d->port || ct_is_reopen(e, p)) {
		struct ct_entry n = {.nat_addr = d->addr, .nat_port = d->port, .state = d->state | CT_S_NS_LEARNED};

		if (bpf_map_update_elem(&sp_ct, &k, &n, BPF_ANY) < 0) {
			count(METRIC_CT_CREATE_FAILED);
			return;
		}
		count(METRIC_DSR_LEARNED);
		e = bpf_map_lookup_elem(&sp_ct, &k);
		if (!e)
			return;
	}
	ct_account(e, p, ctx_len(ctx), 0);
}
