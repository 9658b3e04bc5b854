/* Service lookup and backend selection. */
#pragma once

#include "common.h"
#include "config.h"
#include "hash.h"
#include "lb_maps.h"
#include "metrics.h"

/* What a service is looked up by: the packet's or the socket's
 * destination. */
struct lb_frontend {
	union v6addr addr;
	__be16 port;
	__u8 proto;
	__u8 family;
	__u8 scope; /* LB_SCOPE_* */
};

static __always_inline void lb_frontend_of(const struct pkt *p, struct lb_frontend *fe)
{
	fe->addr = p->daddr;
	fe->port = p->dport;
	fe->proto = p->proto;
	fe->family = p->family;
	fe->scope = LB_SCOPE_EXT;
}

static __always_inline struct lb_svc_value *lb_lookup_slot(const struct lb_frontend *fe, __u16 slot)
{
	struct lb_svc_key k;

	__builtin_memset(&k, 0, sizeof(k));
	k.addr = fe->addr;
	k.port = fe->port;
	k.proto = fe->proto;
	k.family = fe->family;
	k.slot = slot;
	k.scope = fe->scope;
	return bpf_map_lookup_elem(&sp_services, &k);
}

static __always_inline struct lb_svc_value *lb_lookup_service(const struct lb_frontend *fe)
{
	return lb_lookup_slot(fe, 0);
}

/* What an in-cluster client gets for svc, fe's entry: an
 * externalTrafficPolicy Local frontend's in-cluster entry where user space
 * wrote one (fe then names it), else svc. */
static __always_inline struct lb_svc_value *lb_in_cluster(struct lb_frontend *fe, struct lb_svc_value *svc)
{
	if (!svc || !(svc->flags & SVC_F_ETP_LOCAL))
		return svc;
	fe->scope = LB_SCOPE_INT;
	struct lb_svc_value *in = lb_lookup_service(fe);
	if (in)
		return in;
	fe->scope = LB_SCOPE_EXT;
	return svc;
}

/* 1 when the client p comes from may use the service: it has no
 * loadBalancerSourceRanges, or the source is in one of them. */
static __always_inline int lb_src_allowed(const struct lb_svc_value *svc, const struct pkt *p)
{
	struct src_range_key k;

	if (!(svc->flags & SVC_F_SOURCE_RANGES))
		return 1;
	__builtin_memset(&k, 0, sizeof(k));
	k.prefixlen = 64 + (p->family == SP_AF_INET ? 32 : 128);
	k.svc_id = svc->svc_id;
	k.family = p->family;
	__builtin_memcpy(k.addr, &p->saddr, sizeof(k.addr));
	return bpf_map_lookup_elem(&sp_src_ranges, &k) != 0;
}

/* The active backend the service's Maglev table names for a flow hash;
 * 0 when the table is missing or names no active backend. */
static __always_inline __u32 lb_maglev_backend(const struct lb_svc_value *svc, __u32 hash)
{
	__u32 key = svc->svc_id;
	__u32 *table = bpf_map_lookup_elem(&sp_maglev, &key);
	__u32 idx = hash % cfg_maglev_size;

	if (!table)
		return 0;
	/* The value is cfg_maglev_size ids long (the loader sizes both): this
	 * check is the bound the verifier proves the read with. The compiler
	 * would drop it as implied by the modulo, hence the barrier. */
	asm volatile("" : "+r"(idx));
	if (idx >= cfg_maglev_size)
		return 0;
	__u32 id = table[idx];
	struct lb_backend *b = bpf_map_lookup_elem(&sp_backends, &id);

	return b && b->state == BACKEND_ACTIVE ? id : 0;
}

/* Maglev's pick when the service has a table naming an active backend,
 * else a random choice among the active backends; returns 0 when a slot
 * is missing, which the ordered map updates make impossible in steady
 * state. */
static __always_inline __u32 lb_select_backend(const struct lb_frontend *fe, const struct lb_svc_value *svc, __u32 hash)
{
	if (svc->flags & SVC_F_MAGLEV) {
		__u32 id = lb_maglev_backend(svc, hash);

		if (id)
			return id;
	}
	__u16 slot = (bpf_get_prandom_u32() % svc->count) + 1;
	struct lb_svc_value *v = lb_lookup_slot(fe, slot);

	return v ? v->backend_id : 0;
}

/* Who a client is, for session affinity, and its flow's hash for Maglev
 * (lb_flow_hash). A socket (by_cookie) has no 5-tuple yet at connect: it
 * gets a random table slot, so its picks follow the table's shares. */
struct lb_client {
	union v6addr id;
	__u8 by_cookie;
	__u32 hash;
};

/* Picks a backend id for a new flow: the client's affine backend while its
 * entry is fresh and the backend still active, else lb_select_backend's
 * (then remembered when the service has affinity). */
static __always_inline __u32 lb_pick(const struct lb_frontend *fe, const struct lb_svc_value *svc,
				     const struct lb_client *client)
{
	struct lb_affinity_key ak;
	__u64 now = 0;

	if (svc->affinity_timeout) {
		__builtin_memset(&ak, 0, sizeof(ak));
		ak.client = client->id;
		ak.by_cookie = client->by_cookie;
		ak.vip = fe->addr;
		ak.port = fe->port;
		ak.proto = fe->proto;
		ak.family = fe->family;
		now = bpf_ktime_get_ns();

		struct lb_affinity_value *av = bpf_map_lookup_elem(&sp_affinity, &ak);
		if (av && now - av->last_used <= (__u64)svc->affinity_timeout * 1000000000ULL) {
			__u32 id = av->backend_id;
			struct lb_backend *b = bpf_map_lookup_elem(&sp_backends, &id);

			if (b && b->state == BACKEND_ACTIVE) {
				av->last_used = now;
				count(METRIC_AFFINITY_HIT);
				return id;
			}
		}
	}
	__u32 hash = client->hash;
	if (client->by_cookie && (svc->flags & SVC_F_MAGLEV))
		hash = bpf_get_prandom_u32();
	__u32 id = lb_select_backend(fe, svc, hash);
	if (id && svc->affinity_timeout) {
		struct lb_affinity_value av = {.last_used = now, .backend_id = id};

		bpf_map_update_elem(&sp_affinity, &ak, &av, BPF_ANY);
	}
	return id;
}

/* A backend is alive for a flow while its id still names the address the
 * flow was sent to: ids of removed backends may be reused. */
static __always_inline struct lb_backend *lb_backend_alive(__u32 id, const union v6addr *addr, __be16 port)
{
	struct lb_backend *b = bpf_map_lookup_elem(&sp_backends, &id);

	if (!b || !addr_equal(&b->addr, addr) || b->port != port)
		return 0;
	return b;
}
