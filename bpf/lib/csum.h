/* One's-complement checksum arithmetic (RFC 1624) for fields the kernel's
 * csum helpers cannot reach: checksums quoted inside ICMP errors. */
#pragma once

#include "common.h"

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

static __always_inline __u32 csum_diff_addr(const union v6addr *from, const union v6addr *to, __u8 family)
{
	__u32 size = family == SP_AF_INET ? 4 : 16;

	return (__u32)bpf_csum_diff((__be32 *)from, size, (__be32 *)to, size, 0);
}

/* Applies a diff to a stored checksum, as inet_proto_csum_replace_by_diff. */
static __always_inline __u16 csum_apply(__u16 check, __u32 diff)
{
	return csum_fold32(csum_add32(diff, ~(__u32)check));
}
