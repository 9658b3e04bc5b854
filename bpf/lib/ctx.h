/* The packet context the lib code is built for. The lib takes a
 * struct __ctx_buff and calls ctx_* wrappers, so one source builds for tc
 * (struct __sk_buff, the default) and for XDP (struct xdp_md, when the
 * object defines SP_CTX_XDP before its first include: bpf_xdp.c).
 *
 * Each context header provides:
 *  - CTX_IS_XDP (0 or 1), for the few places where the two must differ;
 *  - CTX_ACT_OK (pass on: to the stack, or from XDP to tc), CTX_ACT_DROP,
 *    CTX_ACT_REDIRECT (what bpf_redirect* returns);
 *  - ctx_load_bytes, ctx_store_bytes, ctx_l3_csum_replace,
 *    ctx_l4_csum_replace, ctx_adjust_room (BPF_ADJ_ROOM_MAC / _NET), with
 *    the arguments and results of the bpf_skb_* / bpf_l[34]_csum_replace
 *    helpers they stand for;
 *  - ctx_len, ctx_is_gso (an skb to be segmented: its length is ctx_len,
 *    not its IP header's), ctx_ifindex (the device the packet arrived
 *    on), ctx_protocol (the ethertype, network order). */
#pragma once

#ifdef SP_CTX_XDP
#include "ctx_xdp.h"
#else
#include "ctx_skb.h"
#endif
