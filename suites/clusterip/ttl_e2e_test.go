package clusterip

import (
	"net/netip"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/cluster"
	"github.com/servicepath/servicepath/harness/traffic"
)

// A traceroute from a pod to a ClusterIP, to a backend on its node and one
// on the other: BPF host routing shows the hops the upper stack does,
// each node answering with time exceeded where the TTL / hop limit runs
// out, about the pod's datagram to the VIP.
func TestClusterIPTraceroute(t *testing.T) {
	const closedPort = 9
	for _, routing := range []loader.HostRouting{loader.HostRoutingStack, loader.HostRoutingBPF} {
		t.Run(string(routing), func(t *testing.T) {
			c := cluster.New(t, cluster.Options{PerPacket: true, Mode: attach.Auto, HostRouting: routing, RemoteBackends: true})
			for _, n := range c.Topo.Nodes {
				require.NoError(t, traffic.UnlimitICMP(n), "%s's netns", n.Name)
			}
			node0, node1 := c.Topo.Nodes[0], c.Topo.Nodes[1]
			port := uint16(5400)
			for _, f := range Families {
				// node0's address toward its pods, node1's on the wire.
				routers := []netip.Addr{node0.GatewayIPv4, node1.WireIPv4}
				if f.VIP.Is6() {
					routers = []netip.Addr{node0.IPv6, node1.WireIPv6}
				}
				for _, b := range []struct {
					backend string
					hops    int
				}{{"backend-1", 1}, {"backend-2", 2}} {
					t.Run(f.Name+"/"+b.backend, func(t *testing.T) {
						port++
						c.ProgramTo(t, f.VIP, port, service.UDP, closedPort, b.backend)
						vip := netip.AddrPortFrom(f.VIP, port)
						before := c.Counters(t)["ttl_exceeded"]
						hops, err := traffic.Traceroute(c.Client, vip, 5, timeout)
						require.NoError(t, err, "trace %s", vip)
						require.Len(t, hops, b.hops+1, "hops to %s: %+v", vip, hops)
						for i, r := range hops[:b.hops] {
							assert.True(t, r.TimeExceeded(), "hop %d: time exceeded, not %+v", i+1, r)
							assert.Equal(t, routers[i], r.Offender, "hop %d is node %d", i+1, i)
							assert.Equal(t, vip, r.About, "hop %d's error is about the datagram to the VIP", i+1)
						}
						last := hops[b.hops]
						assert.Equal(t, syscall.ECONNREFUSED, last.Errno, "the backend refused at the last hop: %+v", last)
						assert.Equal(t, f.VIP, last.Offender, "the refusal came from the VIP")
						if routing == loader.HostRoutingBPF {
							assert.Positive(t, c.Counters(t)["ttl_exceeded"]-before, "the expiring probe was left to the stack")
						}
					})
				}
			}
		})
	}
}

// A pod's traceroute to a ClusterIP whose only backend is itself: the
// hairpin path takes a hop as the stack's forwarding would, so the first
// probe expires at the node, whose time exceeded is about the pod's
// datagram to the VIP, and the second reaches the pod, which refuses it
// from the VIP.
func TestClusterIPHairpinTraceroute(t *testing.T) {
	const closedPort = 9
	for _, routing := range []loader.HostRouting{loader.HostRoutingStack, loader.HostRoutingBPF} {
		t.Run(string(routing), func(t *testing.T) {
			c := cluster.New(t, cluster.Options{PerPacket: true, Mode: attach.Auto, HostRouting: routing})
			require.NoError(t, traffic.UnlimitICMP(c.Topo.Node), "node's netns")
			self := c.Topo.Pod(cluster.Backends[0])
			port := uint16(5500)
			for _, f := range Families {
				t.Run(f.Name, func(t *testing.T) {
					port++
					c.ProgramTo(t, f.VIP, port, service.UDP, closedPort, cluster.Backends[0])
					router := c.Topo.Node.GatewayIPv4
					if f.VIP.Is6() {
						router = c.Topo.Node.IPv6
					}
					vip := netip.AddrPortFrom(f.VIP, port)
					before := c.Counters(t)
					hops, err := traffic.Traceroute(self, vip, 5, timeout)
					require.NoError(t, err, "trace %s from %s", vip, self.Name)
					require.Len(t, hops, 2, "hops to %s: %+v", vip, hops)
					assert.True(t, hops[0].TimeExceeded(), "hop 1: time exceeded, not %+v", hops[0])
					assert.Equal(t, router, hops[0].Offender, "hop 1 is the node")
					assert.Equal(t, vip, hops[0].About, "hop 1's error is about the datagram to the VIP")
					assert.Equal(t, syscall.ECONNREFUSED, hops[1].Errno, "the pod refused at hop 2: %+v", hops[1])
					assert.Equal(t, f.VIP, hops[1].Offender, "the refusal came from the VIP")
					after := c.Counters(t)
					assert.Positive(t, after["hairpin"]-before["hairpin"], "the second probe was hairpinned")
					if routing == loader.HostRoutingBPF {
						assert.Equal(t, uint64(1), after["ttl_exceeded"]-before["ttl_exceeded"], "the expiring probe was left to the stack, counted once")
					}
				})
			}
		})
	}
}
