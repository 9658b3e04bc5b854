// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The node device's north-south path (bpf/lib/nodeport.h) at XDP, ahead of
 * tc's (bpf_host.c), which stays attached: what XDP translates and can
 * send itself leaves here (XDP_TX, XDP_REDIRECT); everything else goes on
 * to tc (XDP_PASS, counted xdp_to_tc), untouched, or translated with a
 * word saying what is left (np_handover). */

#define SP_CTX_XDP
#include "lib/common.h"
#include "lib/config.h"
#include "lib/frag.h"
#include "lib/lb_packet.h"
#include "lib/metrics.h"
#include "lib/nodeport.h"

SEC("xdp")
int sp_xdp_from_netdev(struct xdp_md *ctx)
{
	struct pkt p;
	__u32 mtu = 0;
	int verdict;

	/* Room for the hand-over word, now: a driver that keeps no metadata
	 * could not hand tc a translated packet, so it gets none from XDP.
	 * Nor does a frame over the device's MTU: GRO merged it (generic XDP
	 * runs after GRO), and its checksums are partial, which only tc's
	 * helpers update right. */
	if (ctx_set_xfer(ctx, 0) < 0 || bpf_check_mtu(ctx, 0, &mtu, 0, 0) != BPF_MTU_CHK_RET_SUCCESS)
		verdict = XDP_PASS;
	else if (pkt_prepare(ctx, &p, &verdict) == 0)
		verdict = np_from_netdev(ctx, &p);
	if (verdict == XDP_PASS)
		count(METRIC_XDP_TO_TC);
	return verdict;
}

char __license[] SEC("license") = "Dual BSD/GPL";
