/* Flow hashing for Maglev selection. Go mirror: suites/clusterip
 * (flowHash), which a fixture checks against this code. */
#pragma once

#include "common.h"

/* Bob Jenkins' lookup3, as the kernel's jhash2 computes it over 32-bit
 * words. */
#define JHASH_INITVAL 0xdeadbeef

static __always_inline __u32 rol32(__u32 w, unsigned int s)
{
	return (w << s) | (w >> (32 - s));
}

#define __jhash_mix(a, b, c)                        \
	{                                           \
		a -= c; a ^= rol32(c, 4); c += b;   \
		b -= a; b ^= rol32(a, 6); a += c;   \
		c -= b; c ^= rol32(b, 8); b += a;   \
		a -= c; a ^= rol32(c, 16); c += b;  \
		b -= a; b ^= rol32(a, 19); a += c;  \
		c -= b; c ^= rol32(b, 4); b += a;   \
	}

#define __jhash_final(a, b, c)             \
	{                                  \
		c ^= b; c -= rol32(b, 14); \
		a ^= c; a -= rol32(c, 11); \
		b ^= a; b -= rol32(a, 25); \
		c ^= b; c -= rol32(b, 16); \
		a ^= c; a -= rol32(c, 4);  \
		b ^= a; b -= rol32(a, 14); \
		c ^= b; c -= rol32(b, 24); \
	}

/* A fixed seed, not a per-boot random one: Maglev needs every node to hash
 * a flow alike, so a flow keeps its backend whichever node it reaches. */
#define LB_FLOW_HASH_SEED 0x5e4f1a9b

#define LB_FLOW_HASH_WORDS 10

/* The flow's 5-tuple and family as ten words: saddr[4], daddr[4], the
 * ports as they sit in the header, then family << 8 | proto. An IPv4
 * address fills its first word, the rest are zero. */
static __always_inline __u32 lb_flow_hash(const struct pkt *p)
{
	__u32 k[LB_FLOW_HASH_WORDS] = {
		p->saddr.p[0], p->saddr.p[1], p->saddr.p[2], p->saddr.p[3],
		p->daddr.p[0], p->daddr.p[1], p->daddr.p[2], p->daddr.p[3],
		((__u32)p->dport << 16) | p->sport,
		((__u32)p->family << 8) | p->proto,
	};
	__u32 a, b, c;

	a = b = c = JHASH_INITVAL + (LB_FLOW_HASH_WORDS << 2) + LB_FLOW_HASH_SEED;
#pragma unroll
	for (int i = 0; i < 9; i += 3) {
		a += k[i];
		b += k[i + 1];
		c += k[i + 2];
		__jhash_mix(a, b, c);
	}
	a += k[9];
	__jhash_final(a, b, c);
	return c;
}
