// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* TCP and UDP socket iterators that destroy the sockets servicepath's
 * socket hooks pointed at a backend since removed, so clients reconnect to
 * a live one. An iterator walks only the netns it is opened in; user space
 * opens it in each netns that holds such sockets. */

#include "lib/common.h"
#include "lib/kernel_sock.h"
#include "lib/metrics.h"
#include "lib/sock_maps.h"

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

/* The frontend and backend a socket was connected through: from its own
 * storage when the hooks keep state there (exact, whatever the socket's
 * family), else from sp_sock_revnat under its cookie and peer address.
 * Both are consulted so that sockets opened before a switch of
 * loader.SockState are found too, and user space need not know the mode. */
static __always_inline int connected_flow(struct sock_common *skc, void *sk, const union v6addr *daddr, __u8 family,
					  struct sock_destroy_key *dk)
{
	struct sock_ctx *sc = bpf_sk_storage_get(&sp_sock_ctx, sk, 0, 0);

	/* Without conn, a storage-mode connect went to no service, or the
	 * storage holds only map mode's unconnected sends: the map decides. */
	if (sc && sc->conn) {
		const struct sock_flow *f = &sc->flow[0];

		dk->backend = f->backend;
		dk->vip = f->vip;
		dk->backend_port = f->backend_port;
		dk->vip_port = f->vip_port;
		dk->family = f->family;
		return 1;
	}

	struct sock_revnat_key rk = {
		.cookie = bpf_get_socket_cookie(skc),
		.addr = *daddr,
		.port = skc->skc_dport,
		.family = family,
	};
	struct sock_revnat_value *v = bpf_map_lookup_elem(&sp_sock_revnat, &rk);
	if (!v)
		return 0; /* not load-balanced by us: a direct pod connection */
	dk->backend = *daddr;
	dk->vip = v->addr;
	dk->backend_port = skc->skc_dport;
	dk->vip_port = v->port;
	dk->family = family;
	return 1;
}

/* sk is skc as a full socket (NULL if it is not one), for its storage. */
static __always_inline void destroy_if_target(struct sock_common *skc, void *sk, __u8 proto)
{
	union v6addr daddr = {};
	__u8 family;

	if (skc->skc_family == SP_AF_INET_SYS) {
		daddr.p[0] = skc->skc_daddr;
		family = SP_AF_INET;
	} else if (skc->skc_family == SP_AF_INET6_SYS) {
		__builtin_memcpy(&daddr, &skc->skc_v6_daddr, 16);
		family = SP_AF_INET6;
		/* A dual-stack socket connected to an IPv4 service. */
		if (daddr.p[0] == 0 && daddr.p[1] == 0 && daddr.p[2] == bpf_htonl(0xffff)) {
			daddr.p[0] = daddr.p[3];
			daddr.p[3] = 0;
			daddr.p[2] = 0;
			family = SP_AF_INET;
		}
	} else {
		return;
	}
	/* Unconnected UDP sockets have no peer and are never destroyed. */
	if (daddr.d[0] == 0 && daddr.d[1] == 0)
		return;

	struct sock_destroy_key dk = {.proto = proto};
	if (!connected_flow(skc, sk, &daddr, family, &dk))
		return;
	if (!bpf_map_lookup_elem(&sp_sock_destroy, &dk))
		return;
	if (bpf_sock_destroy(skc) == 0)
		count(METRIC_SOCK_DESTROYED);
}

SEC("iter/tcp")
int sp_destroy_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *sk = ctx->sk_common;

	if (!sk)
		return 0;
	switch (sk->skc_state) {
	case TCP_LISTEN:
	case TCP_TIME_WAIT:
	case TCP_NEW_SYN_RECV:
		return 0;
	}
	destroy_if_target(sk, bpf_skc_to_tcp_sock(sk), IPPROTO_TCP);
	return 0;
}

SEC("iter/udp")
int sp_destroy_udp(struct bpf_iter__udp *ctx)
{
	struct udp_sock *udp = ctx->udp_sk;

	if (!udp)
		return 0;
	destroy_if_target(&udp->inet.sk.__sk_common, udp, IPPROTO_UDP);
	return 0;
}

char __license[] SEC("license") = "Dual BSD/GPL";
