package nodeport

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/cluster"
)

// The north-south exchanges with XDP ahead of tc on every node's wire
// device, generic then native, on one bed. Flows to the other node and
// their replies leave by XDP_TX once the neighbours are resolved (until
// then XDP hands them to tc, whose bpf_redirect_neigh resolves them);
// flows to the node's own backend are DNATed by XDP and delivered by tc.
// The bed has veth check every checksum, so each rewrite is proved.
func TestNorthSouthXDPEndToEnd(t *testing.T) {
	n := 40
	if testing.Short() {
		n = 16
	}
	ns := cluster.NewNorthSouthWith(t, cluster.NSOptions{XDP: attach.XDPGeneric})
	for _, mode := range []attach.XDPMode{attach.XDPGeneric, attach.XDPNative} {
		t.Run(string(mode), func(t *testing.T) {
			ns.UseXDP(t, mode)
			for _, f := range e2eFamilies(ns) {
				nodePort := netip.AddrPortFrom(f.nodes[0], NodePort)
				np := service.Frontend{Addr: f.unspecified, Port: NodePort, Kind: service.NodePort}

				t.Run(f.name+"/nodeport-snat", func(t *testing.T) {
					program(t, ns, np, nil)
					before := ns.Counters(t, 0)
					tally := exchange(t, ns, nodePort, n)
					after := ns.Counters(t, 0)
					assert.Positive(t, tally["backend-0"], "node 0's own backend answered: %v", tally)
					assert.Positive(t, tally["backend-1"], "the other node's backend answered: %v", tally)
					assert.Positive(t, grew(before, after, "np_snat"), "node 0 SNATed flows to the other node")
					assert.Positive(t, grew(before, after, "np_rev_snat"), "node 0 translated their replies back")
					assert.Positive(t, grew(before, after, "xdp_tx"), "XDP sent packets back out the wire itself")
					assert.Positive(t, grew(before, after, "np_local"), "node 0 served flows locally")
					assert.Positive(t, grew(before, after, "xdp_to_tc"), "XDP handed local deliveries to tc")
				})

				for _, d := range []service.Dispatch{service.Option, service.IPIP} {
					t.Run(f.name+"/dsr-"+d.String(), func(t *testing.T) {
						program(t, ns, np, func(s *service.Service) { s.Mode, s.Dispatch = service.DSR, d })
						entry, backend := ns.Counters(t, 0), ns.Counters(t, 1)
						tally := exchange(t, ns, nodePort, n)
						entry2, backend2 := ns.Counters(t, 0), ns.Counters(t, 1)
						assert.Positive(t, tally["backend-1"], "node 0 handed flows to backend-1: %v", tally)
						metric := map[service.Dispatch]string{service.Option: "dsr_opt", service.IPIP: "dsr_ipip"}[d]
						assert.Positive(t, grew(entry, entry2, metric), "node 0 dispatched by %s", d)
						assert.Positive(t, grew(entry, entry2, "xdp_tx"), "node 0's XDP sent the dispatched packets")
						assert.Zero(t, grew(entry, entry2, "np_rev_snat"), "no reply came back through node 0")
						assert.Positive(t, grew(backend, backend2, "dsr_learned"), "node 1 learned the DSR flows")
						assert.Positive(t, grew(backend, backend2, "rev_nat"), "node 1 answered from node 0's NodePort itself")
					})
				}
			}
			// XDP passes ICMP errors on to tc, which translates them.
			t.Run("icmp-errors", func(t *testing.T) {
				exerciseICMPErrors(t, ns, map[attach.XDPMode]uint16{attach.XDPGeneric: NodePort + 200, attach.XDPNative: NodePort + 300}[mode])
			})
			// XDP forwards as tc does, and hands tc what expires, for the stack.
			t.Run("traceroute", func(t *testing.T) {
				exerciseTraceroute(t, ns, map[attach.XDPMode]uint16{attach.XDPGeneric: NodePort + 500, attach.XDPNative: NodePort + 600}[mode])
			})
		})
	}
}
