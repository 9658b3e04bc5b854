/* tc's context (bpf/lib/ctx.h): every wrapper is the kernel's own helper. */
#pragma once

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#define __ctx_buff __sk_buff
#define CTX_IS_XDP 0

#define CTX_ACT_OK TC_ACT_OK
#define CTX_ACT_DROP TC_ACT_SHOT
#define CTX_ACT_REDIRECT TC_ACT_REDIRECT

static __always_inline long ctx_load_bytes(struct __sk_buff *ctx, __u32 off, void *to, __u32 len)
{
	return bpf_skb_load_bytes(ctx, off, to, len);
}

static __always_inline long ctx_store_bytes(struct __sk_buff *ctx, __u32 off, const void *from, __u32 len, __u64 flags)
{
	return bpf_skb_store_bytes(ctx, off, from, len, flags);
}

static __always_inline long ctx_l3_csum_replace(struct __sk_buff *ctx, __u32 off, __u64 from, __u64 to, __u64 flags)
{
	return bpf_l3_csum_replace(ctx, off, from, to, flags);
}

static __always_inline long ctx_l4_csum_replace(struct __sk_buff *ctx, __u32 off, __u64 from, __u64 to, __u64 flags)
{
	return bpf_l4_csum_replace(ctx, off, from, to, flags);
}

static __always_inline long ctx_adjust_room(struct __sk_buff *ctx, __s32 len_diff, __u32 mode, __u64 flags)
{
	return bpf_skb_adjust_room(ctx, len_diff, mode, flags);
}

static __always_inline long ctx_change_tail(struct __sk_buff *ctx, __u32 len)
{
	return bpf_skb_change_tail(ctx, len, 0);
}

static __always_inline __u32 ctx_len(const struct __sk_buff *ctx)
{
	return ctx->len;
}

/* A GSO packet (TSO, BIG TCP) is ctx_len bytes that leave in segments of
 * gso_size; past 64 KiB its IP length fields read 0. */
static __always_inline int ctx_is_gso(const struct __sk_buff *ctx)
{
	return ctx->gso_size != 0;
}

static __always_inline __u32 ctx_ifindex(const struct __sk_buff *ctx)
{
	return ctx->ifindex;
}

static __always_inline __be16 ctx_protocol(struct __sk_buff *ctx)
{
	return ctx->protocol;
}

/* The word XDP left ahead of the packet in its metadata (ctx_xdp.h:
 * ctx_set_xfer); 0 when there is none. It is read, never cleared: a write
 * would have the verifier unclone every cloned skb first, and on kernels
 * where that drops the metadata a tcpdump would lose the word. */
static __always_inline __u64 ctx_xfer(struct __sk_buff *ctx)
{
	void *data = (void *)(long)ctx->data;
	__u32 *meta = (void *)(long)ctx->data_meta;

	if ((void *)(meta + 2) > data)
		return 0;
	return (__u64)meta[1] << 32 | meta[0];
}
