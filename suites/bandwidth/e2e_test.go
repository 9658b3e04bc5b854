package bandwidth

import (
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/bandwidth"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/netdev"
	"github.com/servicepath/servicepath/harness/cluster"
	"github.com/servicepath/servicepath/harness/netperf"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
)

// limit is the rated pod's egress: slow enough for an emulated guest's
// veths to carry several times over.
const limit = 20_000_000

// TestEgressBandwidthHolds streams from a rated pod to a pod on the other
// node, which leaves by the node device, and holds the rate within 25%
// (TCP's own losses at the drop horizon make it a little less); an
// unrated pod of the same node, and the rated one once its limit is
// lifted, go at least twice as fast. With stack routing and with BPF host
// routing, which sends the pod's packets straight to the node device.
func TestEgressBandwidthHolds(t *testing.T) {
	for _, routing := range []loader.HostRouting{loader.HostRoutingStack, loader.HostRoutingBPF} {
		t.Run(string(routing), func(t *testing.T) {
			c := cluster.New(t, cluster.Options{PerPacket: true, Mode: attach.Auto, HostRouting: routing, RemoteBackends: true})
			a := &attach.Attacher{LinkDir: filepath.Join(testenv.BPFFS(t), "links"), Mode: attach.Auto}
			err := c.Topo.Node.Do(func() error {
				if _, err := netdev.Attach(a, c.DP, topology.WireIfName, attach.XDPOff); err != nil {
					return err
				}
				l, err := netlink.LinkByName(topology.WireIfName)
				if err != nil {
					return err
				}
				return bandwidth.EnsureFQ(l)
			})
			testenv.RequireDriver(t, "fq qdisc (sch_fq)", "5.10", err)
			require.NoError(t, err, "node device programs and fq on %s", topology.WireIfName)

			mgr, err := bandwidth.NewManager(c.DP.Maps)
			require.NoError(t, err)
			unrated, remote := c.Topo.Pod(cluster.Backends[0]), c.Topo.Pod(cluster.Backends[1])
			srv, err := netperf.Listen(remote, 0, 0, netperf.Sink, 0)
			require.NoError(t, err, "sink in %s", remote.Name)
			t.Cleanup(func() { srv.Close() })

			for _, like := range []netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("fd00::1")} {
				dst := netip.AddrPortFrom(c.Addr(remote.Name, like), srv.Port())
				stream := func(from *topology.Pod) float64 {
					st, err := netperf.RunStream(from, srv, dst, netperf.StreamOptions{Duration: 2 * time.Second})
					require.NoError(t, err, "stream from %s to %s", from.Name, dst)
					return st.Gbps() * 1e9
				}
				t.Run(map[bool]string{true: "ipv4", false: "ipv6"}[like.Is4()], func(t *testing.T) {
					require.NoError(t, mgr.Set(c.Client.Hook().Ifindex, limit), "rate the client")
					got := stream(c.Client)
					free := stream(unrated)
					require.NoError(t, mgr.Delete(c.Client.Hook().Ifindex), "lift the client's rate")
					lifted := stream(c.Client)
					t.Logf("rated %.1f Mbit/s (limit %d), unrated pod %.1f, limit lifted %.1f", got/1e6, limit/1_000_000, free/1e6, lifted/1e6)
					assert.LessOrEqual(t, got, 1.05*limit, "the rated pod stays under its limit")
					assert.GreaterOrEqual(t, got, 0.75*limit, "the rated pod gets its limit")
					assert.GreaterOrEqual(t, free, 2.0*limit, "an unrated pod of the node is not slowed")
					assert.GreaterOrEqual(t, lifted, 2.0*limit, "a lifted limit no longer holds the pod")
				})
			}
		})
	}
}
