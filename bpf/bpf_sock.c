// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* cgroup socket hooks: Service addresses translated once, at the socket,
 * so TCP and connected UDP need no per-packet NAT. */

#include <linux/errno.h>

#include "lib/common.h"
#include "lib/config.h"
#include "lib/lb.h"
#include "lib/metrics.h"
#include "lib/sock_maps.h"

#define SYS_REJECT 0
#define SYS_PROCEED 1

/* IPv4 as the hooks see it: a port in network order in the low 16 bits. */
static __always_inline void fe_from_v4(struct lb_frontend *fe, __u32 ip, __u32 port, __u8 proto)
{
	__builtin_memset(fe, 0, sizeof(*fe));
	fe->addr.p[0] = ip;
	fe->port = (__be16)port;
	fe->proto = proto;
	fe->family = SP_AF_INET;
}

/* An IPv6 socket address; v4-mapped (::ffff:a.b.c.d) is looked up as IPv4
 * so dual-stack sockets reach IPv4 services. Returns 1 when v4-mapped. */
static __always_inline int fe_from_v6(struct lb_frontend *fe, const __u32 *ip6, __u32 port, __u8 proto)
{
	__builtin_memset(fe, 0, sizeof(*fe));
	fe->port = (__be16)port;
	fe->proto = proto;
	if (ip6[0] == 0 && ip6[1] == 0 && ip6[2] == bpf_htonl(0xffff)) {
		fe->addr.p[0] = ip6[3];
		fe->family = SP_AF_INET;
		return 1;
	}
	fe->addr.p[0] = ip6[0];
	fe->addr.p[1] = ip6[1];
	fe->addr.p[2] = ip6[2];
	fe->addr.p[3] = ip6[3];
	fe->family = SP_AF_INET6;
	return 0;
}

/* The loader's netns is the host's; 0 means the kernel could not tell. */
#define in_host_netns(ctx) (cfg_host_netns_cookie && bpf_get_netns_cookie(ctx) == cfg_host_netns_cookie)

static __always_inline int in_scope(struct bpf_sock_addr *ctx)
{
	if (!cfg_sock_lb_host_only || in_host_netns(ctx))
		return 1;
	count(METRIC_SOCK_OTHER_NETNS);
	return 0;
}

/* Finds the service a destination means, as in-cluster clients see it
 * (lb_in_cluster). An exact frontend first, except that the host reaches a
 * non-local ExternalIP by routing, untranslated, as Kubernetes asks.
 * Otherwise a node address (or loopback, from the host
 * only: a pod's loopback is its own) means the NodePort frontend, whose
 * key has an all-zero address; fe is rewritten to that key. */
static __always_inline struct lb_svc_value *sock_lookup(struct lb_frontend *fe, int host)
{
	struct lb_svc_value *svc = lb_lookup_service(fe);
	int loopback = is_loopback(&fe->addr, fe->family);

	if (svc) {
		if ((svc->flags & SVC_F_EXTERNAL_IP) && host && !loopback && !is_node_addr(&fe->addr, fe->family))
			return 0;
		return lb_in_cluster(fe, svc);
	}
	if (!(host && loopback) && !is_node_addr(&fe->addr, fe->family))
		return 0;
	__builtin_memset(&fe->addr, 0, sizeof(fe->addr));
	svc = lb_lookup_service(fe);
	return svc && (svc->flags & SVC_F_NODEPORT) ? lb_in_cluster(fe, svc) : 0;
}

static __always_inline int refuse(struct bpf_sock_addr *ctx)
{
	count(METRIC_SOCK_NO_BACKEND);
	/* As kube-proxy's ICMP reject would: ECONNREFUSED where the kernel
	 * lets us say so, EPERM otherwise. */
	if (cfg_have_set_retval)
		bpf_set_retval(-ECONNREFUSED);
	return SYS_REJECT;
}

static __always_inline int same_backend(const struct sock_flow *f, const union v6addr *addr, __be16 port, __u8 family)
{
	return f->family == family && f->backend_port == port && addr_equal(&f->backend, addr);
}

static __always_inline int same_frontend(const struct sock_flow *f, const struct lb_frontend *fe)
{
	return f->family == fe->family && f->proto == fe->proto && f->vip_port == fe->port && addr_equal(&f->vip, &fe->addr);
}

/* The socket's storage, where the hooks keep state there: every
 * translation in storage mode, and unconnected sends wherever the kernel
 * has socket storage. */
static __always_inline struct sock_ctx *sock_ctx_for(struct bpf_sock_addr *ctx, int connect)
{
	if (cfg_sock_state != SOCK_STATE_STORAGE && (connect || !cfg_have_sk_storage))
		return 0;
	return bpf_sk_storage_get(&sp_sock_ctx, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
}

/* The send flow this socket keeps for fe, or SOCK_CTX_FLOWS: flow[0] is
 * connect()'s while conn is set. */
static __always_inline __u32 send_flow(const struct sock_ctx *sc, const struct lb_frontend *fe)
{
	__u32 first = sc->conn ? 1 : 0, slot = SOCK_CTX_FLOWS;

#pragma unroll
	for (__u32 i = 0; i < SOCK_CTX_FLOWS; i++) {
		if (slot == SOCK_CTX_FLOWS && i >= first && same_frontend(&sc->flow[i], fe))
			slot = i;
	}
	return slot;
}

/* Unconnected UDP keeps one backend per socket and destination (QUIC and
 * DTLS need it) while that backend is in the service: the id still names
 * the address the flow was sent to. Returns its id, or 0 to pick anew. */
static __always_inline __u32 sticky_backend(const struct sock_ctx *sc, const struct lb_frontend *fe)
{
	__u32 slot = send_flow(sc, fe);

	if (slot >= SOCK_CTX_FLOWS)
		return 0;
	const struct sock_flow *f = &sc->flow[slot];
	return lb_backend_alive(f->backend_id, &f->backend, f->backend_port) ? f->backend_id : 0;
}

/* connect takes flow[0]. A send takes the flow it keeps for its
 * destination, else the next in turn, sparing connect()'s: one flow per
 * destination, so replies of sends to several services in flight at once
 * all read back. connect and sendmsg run their hooks under the socket
 * lock, so plain writes do not race. */
static __always_inline void storage_record(struct sock_ctx *sc, const struct lb_frontend *fe, const struct sock_flow *f,
					   int connect)
{
	__u32 slot = 0;

	if (connect) {
		sc->conn = 1;
	} else {
		__u32 first = sc->conn ? 1 : 0;

		slot = send_flow(sc, fe);
		if (slot >= SOCK_CTX_FLOWS) {
			slot = sc->next;
			if (slot < first || slot >= SOCK_CTX_FLOWS)
				slot = first;
			sc->next = slot + 1;
		}
	}
	if (slot < SOCK_CTX_FLOWS)
		sc->flow[slot] = *f;
}

/* Records the reverse mapping for this socket: what recvmsg and
 * getpeername turn the backend back into. */
static __always_inline void record(struct bpf_sock_addr *ctx, struct sock_ctx *sc, const struct lb_frontend *fe,
				   __u32 id, const struct lb_backend *b, int connect)
{
	if (sc) {
		struct sock_flow f = {
			.vip = fe->addr,
			.backend = b->addr,
			.backend_id = id,
			.vip_port = fe->port,
			.backend_port = b->port,
			.family = fe->family,
			.proto = fe->proto,
		};
		storage_record(sc, fe, &f, connect);
	}
	if (cfg_sock_state == SOCK_STATE_STORAGE)
		return;
	struct sock_revnat_key k = {
		.cookie = bpf_get_socket_cookie(ctx),
		.addr = b->addr,
		.port = b->port,
		.family = fe->family,
	};
	struct sock_revnat_value v = {
		.addr = fe->addr,
		.port = fe->port,
	};
	bpf_map_update_elem(&sp_sock_revnat, &k, &v, BPF_ANY);
}

/* A connect that is not translated leaves the socket with no service
 * peer: forget the last one, so socket destroy never takes it for one. */
static __always_inline void forget_connect(struct bpf_sock_addr *ctx, int connect)
{
	if (cfg_sock_state != SOCK_STATE_STORAGE || !connect)
		return;
	struct sock_ctx *sc = bpf_sk_storage_get(&sp_sock_ctx, ctx->sk, 0, 0);
	if (sc)
		sc->conn = 0;
}

/* Picks a backend for fe and records the reverse mapping for this socket.
 * Returns 1 and fills *be when translated, 0 when fe is no service, and -1
 * when the service has no backend to offer. */
static __always_inline int sock_select(struct bpf_sock_addr *ctx, const struct lb_frontend *fe, struct lb_backend *be,
				       int connect)
{
	struct lb_frontend key = *fe;
	struct lb_svc_value *svc = sock_lookup(&key, in_host_netns(ctx));

	if (!svc) {
		forget_connect(ctx, connect);
		return 0;
	}
	/* No memory for the storage: translated all the same, but replies
	 * keep the backend's address (storage mode) and sends are balanced
	 * one by one. */
	struct sock_ctx *sc = sock_ctx_for(ctx, connect);
	__u32 id = sc && !connect ? sticky_backend(sc, fe) : 0;
	if (!id) {
		if (svc->count == 0)
			return -1;
		struct lb_client client = {.by_cookie = 1};
		client.id.d[0] = bpf_get_netns_cookie(ctx);
		id = lb_pick(&key, svc, &client);
	}
	struct lb_backend *b = id ? bpf_map_lookup_elem(&sp_backends, &id) : 0;
	if (!b) {
		count(METRIC_SLOT_MISSING);
		return -1;
	}
	*be = *b;
	record(ctx, sc, fe, id, b, connect);
	count(METRIC_SOCK_XLATE);
	return 1;
}

static __always_inline int xlate4(struct bpf_sock_addr *ctx, int connect)
{
	struct lb_frontend fe;
	struct lb_backend be;

	if (!in_scope(ctx))
		return SYS_PROCEED;
	fe_from_v4(&fe, ctx->user_ip4, ctx->user_port, ctx->protocol);
	int ret = sock_select(ctx, &fe, &be, connect);
	if (ret < 0)
		return refuse(ctx);
	if (ret > 0) {
		ctx->user_ip4 = be.addr.p[0];
		ctx->user_port = (__u32)be.port;
	}
	return SYS_PROCEED;
}

static __always_inline int xlate6(struct bpf_sock_addr *ctx, int connect)
{
	struct lb_frontend fe;
	struct lb_backend be;
	__u32 ip6[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};

	if (!in_scope(ctx))
		return SYS_PROCEED;
	int mapped = fe_from_v6(&fe, ip6, ctx->user_port, ctx->protocol);
	int ret = sock_select(ctx, &fe, &be, connect);
	if (ret < 0)
		return refuse(ctx);
	if (ret > 0) {
		if (mapped) {
			ctx->user_ip6[0] = 0;
			ctx->user_ip6[1] = 0;
			ctx->user_ip6[2] = bpf_htonl(0xffff);
			ctx->user_ip6[3] = be.addr.p[0];
		} else {
			ctx->user_ip6[0] = be.addr.p[0];
			ctx->user_ip6[1] = be.addr.p[1];
			ctx->user_ip6[2] = be.addr.p[2];
			ctx->user_ip6[3] = be.addr.p[3];
		}
		ctx->user_port = (__u32)be.port;
	}
	return SYS_PROCEED;
}

/* Finds the VIP this socket sent to that backend, if it did: a flow in
 * its storage, or an entry of sp_sock_revnat under its cookie. */
static __always_inline int revnat_lookup(struct bpf_sock_addr *ctx, const union v6addr *addr, __u32 port, __u8 family,
					 union v6addr *vip, __be16 *vip_port)
{
	int found = 0;

	if (cfg_sock_state == SOCK_STATE_STORAGE) {
		struct sock_ctx *sc = bpf_sk_storage_get(&sp_sock_ctx, ctx->sk, 0, 0);

#pragma unroll
		for (int i = 0; i < SOCK_CTX_FLOWS; i++) {
			if (sc && !found && same_backend(&sc->flow[i], addr, (__be16)port, family)) {
				*vip = sc->flow[i].vip;
				*vip_port = sc->flow[i].vip_port;
				found = 1;
			}
		}
	} else {
		struct sock_revnat_key k = {
			.cookie = bpf_get_socket_cookie(ctx),
			.addr = *addr,
			.port = (__be16)port,
			.family = family,
		};
		struct sock_revnat_value *v = bpf_map_lookup_elem(&sp_sock_revnat, &k);

		if (v) {
			*vip = v->addr;
			*vip_port = v->port;
			found = 1;
		}
	}
	count(found ? METRIC_SOCK_REV_XLATE : METRIC_SOCK_REV_MISS);
	return found;
}

static __always_inline int revnat4(struct bpf_sock_addr *ctx)
{
	union v6addr a = {.p[0] = ctx->user_ip4};
	/* Initialised: clang may read them on the miss path too, which
	 * verifiers before 6.x reject as uninitialised stack. */
	union v6addr vip = {};
	__be16 vip_port = 0;

	if (revnat_lookup(ctx, &a, ctx->user_port, SP_AF_INET, &vip, &vip_port)) {
		ctx->user_ip4 = vip.p[0];
		ctx->user_port = (__u32)vip_port;
	}
	return SYS_PROCEED;
}

static __always_inline int revnat6(struct bpf_sock_addr *ctx)
{
	struct lb_frontend peer;
	__u32 ip6[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
	int mapped = fe_from_v6(&peer, ip6, ctx->user_port, 0);
	union v6addr vip = {};
	__be16 vip_port = 0;

	if (!revnat_lookup(ctx, &peer.addr, ctx->user_port, peer.family, &vip, &vip_port))
		return SYS_PROCEED;
	if (mapped) {
		ctx->user_ip6[3] = vip.p[0];
	} else {
		ctx->user_ip6[0] = vip.p[0];
		ctx->user_ip6[1] = vip.p[1];
		ctx->user_ip6[2] = vip.p[2];
		ctx->user_ip6[3] = vip.p[3];
	}
	ctx->user_port = (__u32)vip_port;
	return SYS_PROCEED;
}

static __always_inline int is_zero(const union v6addr *a)
{
	return a->d[0] == 0 && a->d[1] == 0;
}

/* Whether binding ip:port would take a NodePort's port on this node. */
static __always_inline int takes_nodeport(const union v6addr *ip, __u8 family, __u32 port, __u8 proto)
{
	struct lb_frontend wild = {.port = bpf_htons(port), .proto = proto, .family = family};
	struct lb_svc_value *svc;

	if (!is_zero(ip) && !is_loopback(ip, family) && !is_node_addr(ip, family))
		return 0;
	svc = lb_lookup_service(&wild);
	return svc && (svc->flags & SVC_F_NODEPORT);
}

static __always_inline int refuse_bind(void)
{
	count(METRIC_SOCK_BIND_REFUSED);
	if (cfg_have_set_retval)
		bpf_set_retval(-EADDRINUSE);
	return SYS_REJECT;
}

/* A host socket may not bind a NodePort's port on a node address: the
 * port belongs to the service, as with kube-proxy's port reservation. */
SEC("cgroup/post_bind4")
int sp_post_bind4(struct bpf_sock *ctx)
{
	union v6addr ip = {.p[0] = ctx->src_ip4};

	if (!in_host_netns(ctx) || !takes_nodeport(&ip, SP_AF_INET, ctx->src_port, ctx->protocol))
		return SYS_PROCEED;
	return refuse_bind();
}

SEC("cgroup/post_bind6")
int sp_post_bind6(struct bpf_sock *ctx)
{
	struct lb_frontend fe;
	__u32 ip6[4] = {ctx->src_ip6[0], ctx->src_ip6[1], ctx->src_ip6[2], ctx->src_ip6[3]};

	if (!in_host_netns(ctx))
		return SYS_PROCEED;
	fe_from_v6(&fe, ip6, 0, ctx->protocol);
	if (takes_nodeport(&fe.addr, fe.family, ctx->src_port, ctx->protocol))
		return refuse_bind();
	/* [::] also takes the IPv4 wildcard on a dual-stack socket. */
	if (is_zero(&fe.addr) && takes_nodeport(&fe.addr, SP_AF_INET, ctx->src_port, ctx->protocol))
		return refuse_bind();
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int sp_connect4(struct bpf_sock_addr *ctx)
{
	return xlate4(ctx, 1);
}

SEC("cgroup/connect6")
int sp_connect6(struct bpf_sock_addr *ctx)
{
	return xlate6(ctx, 1);
}

/* Unconnected UDP: each datagram, to the backend its socket keeps for
 * that destination (sticky_backend). */
SEC("cgroup/sendmsg4")
int sp_sendmsg4(struct bpf_sock_addr *ctx)
{
	return xlate4(ctx, 0);
}

SEC("cgroup/sendmsg6")
int sp_sendmsg6(struct bpf_sock_addr *ctx)
{
	return xlate6(ctx, 0);
}

SEC("cgroup/recvmsg4")
int sp_recvmsg4(struct bpf_sock_addr *ctx)
{
	return revnat4(ctx);
}

SEC("cgroup/recvmsg6")
int sp_recvmsg6(struct bpf_sock_addr *ctx)
{
	return revnat6(ctx);
}

SEC("cgroup/getpeername4")
int sp_getpeername4(struct bpf_sock_addr *ctx)
{
	return revnat4(ctx);
}

SEC("cgroup/getpeername6")
int sp_getpeername6(struct bpf_sock_addr *ctx)
{
	return revnat6(ctx);
}

char __license[] SEC("license") = "Dual BSD/GPL";
