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

static __always_inline void destroy_if_target(struct sock_common *sk, __u8 proto)
{
	union v6addr daddr = {};
	__u8 family;

	if (sk->skc_family == SP_AF_INET_SYS) {
		daddr.p[0] = sk->skc_daddr;
		family = SP_AF_INET;
	} else if (sk->skc_family == SP_AF_INET6_SYS) {
		__builtin_memcpy(&daddr, &sk->skc_v6_daddr, 16);
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

	struct sock_revnat_key rk = {
		.cookie = bpf_get_socket_cookie(sk),
		.addr = daddr,
		.port = sk->skc_dport,
		.family = family,
	};
	struct sock_revnat_value *v = bpf_map_lookup_elem(&sp_sock_revnat, &rk);
	if (!v)
		return; /* not load-balanced by us: a direct pod connection */

	struct sock_destroy_key dk = {
		.backend = daddr,
		.vip = v->addr,
		.backend_port = sk->skc_dport,
		.vip_port = v->port,
		.proto = proto,
		.family = family,
	};
	if (!bpf_map_lookup_elem(&sp_sock_destroy, &dk))
		return;
	if (bpf_sock_destroy(sk) == 0)
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
	destroy_if_target(sk, IPPROTO_TCP);
	return 0;
}

SEC("iter/udp")
int sp_destroy_udp(struct bpf_iter__udp *ctx)
{
	struct udp_sock *udp = ctx->udp_sk;

	if (!udp)
		return 0;
	destroy_if_target(&udp->inet.sk.__sk_common, IPPROTO_UDP);
	return 0;
}

char __license[] SEC("license") = "Dual BSD/GPL";
