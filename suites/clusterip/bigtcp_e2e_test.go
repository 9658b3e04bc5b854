package clusterip

import (
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/cluster"
	"github.com/servicepath/servicepath/harness/netperf"
	"github.com/servicepath/servicepath/harness/topology"
)

const bigTCPPort = 5001

// A bulk TCP flow to a ClusterIP, between BIG TCP pods with BPF host
// routing, completes, and its packets cross the datapath as GSO packets
// over 64 KiB. A device counts a GSO packet once at its full length, so
// an average length over 64 KiB means some were larger: the client's
// device sent them and, delivered by bpf_redirect_peer, the backend's
// received them. Without BIG TCP no packet can exceed 64 KiB. To a backend
// on another node every such packet is routed by bpf_fib_lookup +
// bpf_redirect_neigh too, none left to the stack for its length.
func TestBigTCPThroughClusterIP(t *testing.T) {
	stats := func(t *testing.T, do func(func() error) error, dev string) netlink.LinkStatistics {
		s, err := topology.LinkStats(do, dev)
		require.NoError(t, err)
		return s
	}
	var matrix []cluster.Options
	for _, kind := range []topology.Kind{topology.Veth, topology.NetkitL3} {
		for _, remote := range []bool{false, true} {
			matrix = append(matrix, cluster.Options{PerPacket: true, Mode: attach.Auto, Kind: kind,
				HostRouting: loader.HostRoutingBPF, BigTCP: true, RemoteBackends: remote})
		}
	}
	for _, opts := range matrix {
		t.Run(opts.String(), func(t *testing.T) {
			c := cluster.New(t, opts)
			backend := c.Topo.Pod(backendNames[0])
			if opts.RemoteBackends {
				backend = c.Topo.Pod(backendNames[1])
			}
			for _, p := range []*topology.Pod{c.Client, backend} {
				for _, b := range p.BigTCP {
					if !b.IPv4() || !b.IPv6() {
						t.Skipf("the kernel left %v (refused: %v)", b, b.Refused)
					}
				}
			}
			srv, err := netperf.Listen(backend, 0, 0, netperf.Sink, 0)
			require.NoError(t, err, "sink in %s", backend.Name)
			t.Cleanup(func() { srv.Close() })
			for _, f := range Families {
				t.Run(f.Name, func(t *testing.T) {
					c.ProgramTo(t, f.VIP, bigTCPPort, service.TCP, srv.Port(), backend.Name)
					sent0 := stats(t, c.Client.Do, c.Client.IfName)
					got0 := stats(t, backend.Do, backend.IfName)
					before := c.Counters(t)
					st, err := netperf.RunStream(c.Client, srv, netip.AddrPortFrom(f.VIP, bigTCPPort), netperf.StreamOptions{Duration: 500 * time.Millisecond})
					require.NoError(t, err, "stream to %s:%d", f.VIP, bigTCPPort)
					require.Positive(t, st.Sink.Bytes, "bytes delivered")
					sent := stats(t, c.Client.Do, c.Client.IfName)
					got := stats(t, backend.Do, backend.IfName)
					packets := sent.TxPackets - sent0.TxPackets
					avgSent := (sent.TxBytes - sent0.TxBytes) / max(packets, 1)
					avgGot := (got.RxBytes - got0.RxBytes) / max(got.RxPackets-got0.RxPackets, 1)
					t.Logf("%.2f Gbit/s; client sent %d packets averaging %d bytes, backend received %d averaging %d",
						st.Gbps(), packets, avgSent, got.RxPackets-got0.RxPackets, avgGot)
					assert.Greater(t, avgSent, uint64(65536), "the client's device sent GSO packets over 64 KiB")
					after := c.Counters(t)
					grew := func(name string) uint64 { return after[name] - before[name] }
					if opts.RemoteBackends {
						// The client's few others are neighbour discovery with its
						// gateway, which goes up the stack.
						const others = 10
						assert.GreaterOrEqual(t, grew("redirect_neigh")+others, packets, "the client's packets were routed to the other node by the datapath")
						assert.Less(t, grew("fib_pass"), uint64(others), "no packet of the flow left to the stack")
						return
					}
					assert.Greater(t, avgGot, uint64(65536), "the backend's device received GSO packets over 64 KiB")
					assert.GreaterOrEqual(t, grew("redirect_peer")+grew("redirect_local"), packets, "every packet of the client was host-routed into the backend")
				})
			}
		})
	}
}
