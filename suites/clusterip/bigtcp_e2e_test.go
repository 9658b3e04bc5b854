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

// linkStats reads dev's counters in the calling thread's netns.
func linkStats(t *testing.T, do func(func() error) error, dev string) netlink.LinkStatistics {
	var s netlink.LinkStatistics
	require.NoError(t, do(func() error {
		l, err := netlink.LinkByName(dev)
		if err == nil {
			s = *l.Attrs().Statistics
		}
		return err
	}), "counters of %s", dev)
	return s
}

// A bulk TCP flow to a ClusterIP, between BIG TCP pods with BPF host
// routing, completes, and its packets cross the datapath as GSO packets
// over 64 KiB. A device counts a GSO packet once at its full length, so
// an average length over 64 KiB means some were larger: the client's
// device sent them and, delivered by bpf_redirect_peer, the backend's
// received them. Without BIG TCP no packet can exceed 64 KiB.
func TestBigTCPThroughClusterIP(t *testing.T) {
	for _, kind := range []topology.Kind{topology.Veth, topology.NetkitL3} {
		opts := cluster.Options{PerPacket: true, Mode: attach.Auto, Kind: kind, HostRouting: loader.HostRoutingBPF, BigTCP: true}
		t.Run(opts.String(), func(t *testing.T) {
			c := cluster.New(t, opts)
			backend := c.Topo.Pod(backendNames[0])
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
					sent0 := linkStats(t, c.Client.Do, c.Client.IfName)
					got0 := linkStats(t, backend.Do, backend.IfName)
					peer0 := c.Counters(t)
					st, err := netperf.RunStream(c.Client, srv, netip.AddrPortFrom(f.VIP, bigTCPPort), netperf.StreamOptions{Duration: 500 * time.Millisecond})
					require.NoError(t, err, "stream to %s:%d", f.VIP, bigTCPPort)
					require.Positive(t, st.Sink.Bytes, "bytes delivered")
					sent := linkStats(t, c.Client.Do, c.Client.IfName)
					got := linkStats(t, backend.Do, backend.IfName)
					avgSent := (sent.TxBytes - sent0.TxBytes) / max(sent.TxPackets-sent0.TxPackets, 1)
					avgGot := (got.RxBytes - got0.RxBytes) / max(got.RxPackets-got0.RxPackets, 1)
					t.Logf("%.2f Gbit/s; client sent %d packets averaging %d bytes, backend received %d averaging %d",
						st.Gbps(), sent.TxPackets-sent0.TxPackets, avgSent, got.RxPackets-got0.RxPackets, avgGot)
					assert.Greater(t, avgSent, uint64(65536), "the client's device sent GSO packets over 64 KiB")
					assert.Greater(t, avgGot, uint64(65536), "the backend's device received GSO packets over 64 KiB")
					peer := c.Counters(t)
					redirected := peer["redirect_peer"] + peer["redirect_local"] - peer0["redirect_peer"] - peer0["redirect_local"]
					assert.GreaterOrEqual(t, redirected, sent.TxPackets-sent0.TxPackets, "every packet of the client was host-routed into the backend")
				})
			}
		})
	}
}
