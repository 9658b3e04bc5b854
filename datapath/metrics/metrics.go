// Package metrics reads the datapath's per-CPU, per-reason counters.
package metrics

import (
	"fmt"

	"github.com/cilium/ebpf"
)

// Names follow enum metric in bpf/lib/metrics.h, in order.
var Names = []string{
	"pass",
	"lb_new",
	"lb_established",
	"rev_nat",
	"icmp_rev_nat",
	"no_backend_reject",
	"no_backend_drop",
	"frag_not_found",
	"frag_no_flow",
	"backend_gone",
	"ct_reopen",
	"slot_missing",
	"ct_create_failed",
	"malformed",
	"sock_xlate",
	"sock_rev_xlate",
	"sock_rev_miss",
	"sock_no_backend",
	"sock_other_netns",
	"sock_destroyed",
	"affinity_hit",
	"sock_bind_refused",
	"ct_tuple_reused",
	"redirect_peer",
	"redirect_local",
	"redirect_neigh",
	"fib_pass",
	"np_local",
	"np_snat",
	"np_rev_snat",
	"nat_retry_0",
	"nat_retry_1",
	"nat_retry_2_3",
	"nat_retry_4_7",
	"nat_retry_8_plus",
	"nat_exhausted",
	"dsr_opt",
	"dsr_ipip",
	"dsr_fallback",
	"dsr_learned",
	"source_range_denied",
	"etp_local_drop",
	"fib_failed",
	"xdp_tx",
	"xdp_redirect",
	"xdp_to_tc",
	"np_icmp_rev_snat",
	"np_icmp_snat",
	"hairpin",
	"frag_pass",
	"itp_local_drop",
	"np_host",
	"icmp_to_backend",
	"ct_rst_out_of_window",
	"nat_released",
	"ttl_exceeded",
	"dsr_frag_needed",
	"edt_horizon_drop",
}

// Read sums each counter over CPUs, keyed by name.
func Read(m *ebpf.Map) (map[string]uint64, error) {
	if int(m.MaxEntries()) != len(Names) {
		return nil, fmt.Errorf("metrics map has %d counters, this servicepath knows %d: reload the datapath", m.MaxEntries(), len(Names))
	}
	out := make(map[string]uint64, len(Names))
	var perCPU []uint64
	for i, name := range Names {
		if err := m.Lookup(uint32(i), &perCPU); err != nil {
			return nil, fmt.Errorf("read counter %s: %w", name, err)
		}
		var sum uint64
		for _, v := range perCPU {
			sum += v
		}
		out[name] = sum
	}
	return out, nil
}
