package nodeport

import (
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/cluster"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
	"github.com/servicepath/servicepath/harness/traffic"
)

// sinkPort is where the bulk transfers' sink listens, in backend-1.
const sinkPort = 9098

// A bulk TCP transfer from the external client through a DSR service, in
// full-size segments: the option or outer header would take each past the
// wire's MTU, so node 0 answers with frag needed / packet too big, the
// client lowers its path MTU to what fits, and the transfer completes.
func TestNorthSouthDSRPathMTU(t *testing.T) {
	exerciseDSRPathMTU(t, cluster.NewNorthSouth(t, nil), NodePort+700)
}

// The same with XDP ahead of tc, generic then native, which hands tc what
// DSR makes too big for tc to answer. On a bed of its own: the ICMP
// stories lower backend-1's path MTU to the client, and with it the MSS
// backend-1 offers, below what would need the error.
func TestNorthSouthXDPDSRPathMTU(t *testing.T) {
	ns := cluster.NewNorthSouthWith(t, cluster.NSOptions{XDP: attach.XDPGeneric})
	for i, mode := range []attach.XDPMode{attach.XDPGeneric, attach.XDPNative} {
		t.Run(string(mode), func(t *testing.T) {
			ns.UseXDP(t, mode)
			exerciseDSRPathMTU(t, ns, NodePort+700+100*uint16(i))
		})
	}
}

// exerciseDSRPathMTU transfers through LoadBalancer ports from after port
// on, on ns.
func exerciseDSRPathMTU(t *testing.T, ns *cluster.NorthSouth, port uint16) {
	if !testenv.KernelAtLeast(t, fibMTUKernel) {
		t.Skipf("needs kernel %s: %s", fibMTUKernel, fibMTUNeeds)
	}
	// The client segments what it sends itself, as a host whose NIC does
	// no TSO, and node 0 takes each segment as it comes (no GRO, which
	// XDP's NAPI would do): veth would otherwise carry a GSO packet whole,
	// whose segments DSR's bpf_skb_adjust_room shrinks to fit.
	require.NoError(t, ns.Topo.External.Do(func() error { return topology.SetChecksumOffload(topology.WireIfName, false, true) }),
		"transmit offload off on the client's wire device")
	require.NoError(t, ns.Nodes[0].Do(func() error { return topology.SetGRO(topology.WireIfName, false) }),
		"GRO off on node 0's wire device")
	sink, err := traffic.ServeSink(ns.Topo.Pod("backend-1"), sinkPort)
	require.NoError(t, err, "sink in backend-1")
	t.Cleanup(func() { sink.Close() })
	const size = 1 << 20
	for _, f := range e2eFamilies(ns) {
		for _, d := range []service.Dispatch{service.Option, service.IPIP} {
			t.Run(f.name+"/"+d.String(), func(t *testing.T) {
				port++
				// A LoadBalancer address of its own, routed via node 0: the
				// client's path MTU to an address outlives a subtest.
				vip := f.lbVIP
				for range port - NodePort {
					vip = vip.Next()
				}
				routeVIP(t, ns, vip, f.nodes[0])
				be := service.Backend{Addr: ns.Backend("backend-1", f.client).Addr, Port: sinkPort}
				programOne(t, ns, f, port, service.TCP, be, func(s *service.Service) {
					dsr(d)(s)
					s.Frontend.Addr, s.Frontend.Kind = vip, service.LoadBalancer
				})
				dst := netip.AddrPortFrom(vip, port)
				before := ns.Counters(t, 0)
				b, err := traffic.TCPBulk(ns.Topo.External, dst, size, 20*time.Second)
				require.NoError(t, err, "send %d bytes to %s", size, dst)
				assert.Equal(t, int64(size), b.Received, "backend-1 got every byte")
				assert.Equal(t, int(dsrFit(f.client.Is4(), d)), b.PathMTU, "the client's path MTU is what DSR leaves of the wire's")
				assert.Positive(t, grew(before, ns.Counters(t, 0), "dsr_frag_needed"), "node 0 sent frag needed / packet too big")
			})
		}
	}
}
