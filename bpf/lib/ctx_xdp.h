/* XDP's context (bpf/lib/ctx.h). Bytes are read and written with
 * bpf_xdp_load_bytes / bpf_xdp_store_bytes (5.18), which take offsets as
 * tc's helpers do, so the lib keeps one shape. XDP has no checksum or
 * room helpers: those are built here from csum.h and bpf_xdp_adjust_head. */
#pragma once

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "csum.h"

#define __ctx_buff xdp_md
#define CTX_IS_XDP 1

#define CTX_ACT_OK XDP_PASS /* to tc, then the stack */
#define CTX_ACT_DROP XDP_DROP
#define CTX_ACT_REDIRECT XDP_REDIRECT

/* The XDP program is not frags-aware (SEC("xdp")): the packet is linear. */
static __always_inline __u32 ctx_len(const struct xdp_md *ctx)
{
	return ctx->data_end - ctx->data;
}

static __always_inline int ctx_is_gso(const struct xdp_md *ctx)
{
	return 0;
}

static __always_inline __u32 ctx_ifindex(const struct xdp_md *ctx)
{
	return ctx->ingress_ifindex;
}

static __always_inline long ctx_load_bytes(struct xdp_md *ctx, __u32 off, void *to, __u32 len)
{
	return bpf_xdp_load_bytes(ctx, off, to, len);
}

static __always_inline long ctx_store_bytes(struct xdp_md *ctx, __u32 off, const void *from, __u32 len, __u64 flags)
{
	return bpf_xdp_store_bytes(ctx, off, (void *)from, len);
}

static __always_inline __be16 ctx_protocol(struct xdp_md *ctx)
{
	__be16 proto;

	if (bpf_xdp_load_bytes(ctx, offsetof(struct ethhdr, h_proto), &proto, sizeof(proto)) < 0)
		return 0;
	return proto;
}

/* The difference a bpf_l[34]_csum_replace call describes: from -> to of
 * the size in flags' low bits, or, size 0, to is a bpf_csum_diff result. */
static __always_inline __u32 ctx_csum_diff(__u64 from, __u64 to, __u64 flags)
{
	switch (flags & BPF_F_HDR_FIELD_MASK) {
	case 0:
		return (__u32)to;
	case 2:
		return csum_diff16((__u16)from, (__u16)to);
	}
	return csum_add32(~(__u32)from, (__u32)to);
}

static __always_inline long ctx_l3_csum_replace(struct xdp_md *ctx, __u32 off, __u64 from, __u64 to, __u64 flags)
{
	__u16 sum;

	if (bpf_xdp_load_bytes(ctx, off, &sum, sizeof(sum)) < 0)
		return -1;
	sum = csum_apply(sum, ctx_csum_diff(from, to, flags));
	return bpf_xdp_store_bytes(ctx, off, &sum, sizeof(sum));
}

/* The packet's checksums are complete (XDP sees no CHECKSUM_PARTIAL), so
 * BPF_F_PSEUDO_HDR changes nothing here: it is for tc's skb->csum. */
static __always_inline long ctx_l4_csum_replace(struct xdp_md *ctx, __u32 off, __u64 from, __u64 to, __u64 flags)
{
	int mangled_0 = flags & BPF_F_MARK_MANGLED_0;
	__u16 sum;

	if (bpf_xdp_load_bytes(ctx, off, &sum, sizeof(sum)) < 0)
		return -1;
	/* IPv4 UDP without a checksum keeps none; a result of 0 is all ones. */
	if (mangled_0 && !sum)
		return 0;
	sum = csum_apply(sum, ctx_csum_diff(from, to, flags));
	if (mangled_0 && !sum)
		sum = 0xffff;
	return bpf_xdp_store_bytes(ctx, off, &sum, sizeof(sum));
}

/* Makes (len_diff > 0) or takes away room as bpf_skb_adjust_room does:
 * after Ethernet (BPF_ADJ_ROOM_MAC) or after the fixed IPv4 / IPv6 header
 * (BPF_ADJ_ROOM_NET). The head moves by len_diff and the headers before
 * the room are moved with it; what the room holds is the caller's to
 * write. flags (GSO hints for an skb) mean nothing to XDP. */
static __always_inline long ctx_adjust_room(struct xdp_md *ctx, __s32 len_diff, __u32 mode, __u64 flags)
{
	__u8 hdr[ETH_HLEN + sizeof(struct ipv6hdr)];
	__u32 keep = ETH_HLEN;

	if (mode == BPF_ADJ_ROOM_NET)
		keep += ctx_protocol(ctx) == bpf_htons(ETH_P_IP) ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
	/* keep varies: the verifier wants all of hdr written before a read
	 * of up to its size. */
	__builtin_memset(hdr, 0, sizeof(hdr));
	if (len_diff > 0) {
		if (bpf_xdp_adjust_head(ctx, -len_diff) < 0)
			return -1;
		if (bpf_xdp_load_bytes(ctx, len_diff, hdr, keep) < 0)
			return -1;
		return bpf_xdp_store_bytes(ctx, 0, hdr, keep);
	}
	if (bpf_xdp_load_bytes(ctx, 0, hdr, keep) < 0 || bpf_xdp_store_bytes(ctx, -len_diff, hdr, keep) < 0)
		return -1;
	return bpf_xdp_adjust_head(ctx, -len_diff);
}

/* Writes the word XDP hands tc along with a packet into the packet's
 * metadata, making room for it first; tc reads it (ctx_skb.h: ctx_xfer).
 * -1 when the driver keeps no metadata. */
static __always_inline int ctx_set_xfer(struct xdp_md *ctx, __u64 word)
{
	void *data = (void *)(long)ctx->data;
	__u32 *meta = (void *)(long)ctx->data_meta;

	if ((void *)(meta + 2) > data) {
		if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(word)) < 0)
			return -1;
		data = (void *)(long)ctx->data;
		meta = (void *)(long)ctx->data_meta;
		if ((void *)(meta + 2) > data)
			return -1;
	}
	meta[0] = (__u32)word;
	meta[1] = word >> 32;
	return 0;
}
