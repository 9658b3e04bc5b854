/* One's-complement checksum arithmetic (RFC 1624) for fields the kernel's
 * csum helpers cannot reach: checksums quoted inside ICMP errors, and every
 * checksum in XDP, which has no such helpers (ctx_xdp.h). */
#pragma once

#include <linux/types.h>
#include <bpf/bpf_helpers.h>

static __always_inline __u32 csum_add32(__u32 a, __u32 b)
{
	__u32 r = a + b;

	return r + (r < a);
}

static __always_inline __u16 csum_fold32(__u32 c)
{
	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	return (__u16)~c;
}

/* Difference of one 16-bit word; raw network-order values. */
static __always_inline __u32 csum_diff16(__u16 from, __u16 to)
{
	return csum_add32((__u16)~from, to);
}

/* Applies a diff to a stored checksum, as inet_proto_csum_replace_by_diff. */
static __always_inline __u16 csum_apply(__u16 check, __u32 diff)
{
	return csum_fold32(csum_add32(diff, ~(__u32)check));
}
