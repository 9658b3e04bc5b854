package nodeport

import (
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/cluster"
	"github.com/servicepath/servicepath/harness/netperf"
	"github.com/servicepath/servicepath/harness/topology"
)

// A bulk flow from outside to a NodePort whose backend is on the other
// node arrives at the node device as GSO packets (veth and the bridge pass
// the sender's TSO packets on whole; GRO makes them on a NIC), which the
// entry node SNATs and sends on whole by bpf_redirect_neigh: none dropped
// for its length.
func TestNorthSouthBulkToAnotherNode(t *testing.T) {
	// The client's few other packets are neighbour discovery.
	const others = 10
	ns := cluster.NewNorthSouth(t, nil)
	backend := ns.Topo.Pod("backend-1")
	ext := ns.Topo.External
	port := uint16(NodePort + 100)
	for _, f := range e2eFamilies(ns) {
		t.Run(f.name, func(t *testing.T) {
			port++
			srv, err := netperf.Listen(backend, 0, 0, netperf.Sink, 0)
			require.NoError(t, err, "sink in %s", backend.Name)
			t.Cleanup(func() { srv.Close() })
			fe := service.Frontend{Addr: f.unspecified, Port: port, Kind: service.NodePort, Protocol: service.TCP}
			be := service.Backend{Addr: backend.IPv4, Port: srv.Port()}
			if f.client.Is6() {
				be.Addr = backend.IPv6
			}
			s := service.Service{Name: "default/bulk", Frontend: fe, Backends: []service.Backend{be}}
			for _, n := range ns.Nodes {
				require.NoError(t, n.Services.Upsert(s), "program %s on %s", fe, n.Name)
				t.Cleanup(func() { assert.NoError(t, n.Services.Delete(fe), "remove %s", fe) })
			}
			sent0, err := topology.LinkStats(ext.Do, ext.IfName)
			require.NoError(t, err)
			before := ns.Counters(t, 0)
			st, err := netperf.RunStream(ext, srv, netip.AddrPortFrom(f.nodes[0], port), netperf.StreamOptions{Duration: 500 * time.Millisecond})
			require.NoError(t, err, "stream to %s:%d", f.nodes[0], port)
			require.Positive(t, st.Sink.Bytes, "bytes delivered")
			sent, err := topology.LinkStats(ext.Do, ext.IfName)
			require.NoError(t, err)
			after := ns.Counters(t, 0)
			packets := sent.TxPackets - sent0.TxPackets
			avg := (sent.TxBytes - sent0.TxBytes) / max(packets, 1)
			t.Logf("%.2f Gbit/s; the client sent %d packets averaging %d bytes; node 0: np_snat %d, redirect_neigh %d, fib_failed %d",
				st.Gbps(), packets, avg, grew(before, after, "np_snat"), grew(before, after, "redirect_neigh"), grew(before, after, "fib_failed"))
			assert.Greater(t, avg, uint64(1500), "the client sent GSO packets over the MTU")
			assert.Zero(t, grew(before, after, "fib_failed"), "no packet dropped for its length")
			assert.GreaterOrEqual(t, grew(before, after, "np_snat")+others, packets, "the client's packets were SNATed")
			assert.GreaterOrEqual(t, grew(before, after, "redirect_neigh")+others, packets, "and sent on by redirect_neigh")
		})
	}
}
