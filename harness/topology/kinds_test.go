package topology_test

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/harness/topology"
	"github.com/servicepath/servicepath/harness/traffic"
)

// serveAll starts a TCP+UDP server named after each pod.
func serveAll(t *testing.T, pods []*topology.Pod, port uint16) {
	t.Helper()
	for _, p := range pods {
		s, err := traffic.Serve(p, p.Name, port)
		require.NoError(t, err, "serve in %s", p.Name)
		t.Cleanup(func() { s.Close() })
	}
}

// reach asserts from reaches every address of dst over TCP and UDP, and
// that the answer comes from the address asked.
func reach(t *testing.T, from traffic.Doer, what string, dst *topology.Pod, port uint16) {
	t.Helper()
	reachFamilies(t, from, what, dst, port, true)
}

func reachFamilies(t *testing.T, from traffic.Doer, what string, dst *topology.Pod, port uint16, udp4 bool) {
	t.Helper()
	for _, ip := range []netip.Addr{dst.IPv4, dst.IPv6} {
		to := netip.AddrPortFrom(ip, port)
		r, err := traffic.TCPExchange(from, to, []byte(what), timeout)
		if assert.NoError(t, err, "TCP %s -> %s", what, to) {
			assert.Equal(t, dst.Name, r.Identity, "TCP %s -> %s answered by the pod", what, to)
		}
		if ip.Is4() && !udp4 {
			continue
		}
		r, err = traffic.UDPExchange(from, to, []byte(what), timeout)
		if assert.NoError(t, err, "UDP %s -> %s", what, to) {
			assert.Equal(t, to, r.Peer, "UDP %s -> %s: reply from the address asked", what, to)
		}
	}
}

// Every kind plugs pods that reach each other and that their node reaches;
// each pod names where a datapath attaches for it.
func TestKinds(t *testing.T) {
	for _, kind := range topology.Kinds {
		t.Run(string(kind), func(t *testing.T) {
			topo := topology.NewForTest(t, topology.Spec{Name: "kind", Kind: kind,
				Pods: []topology.PodSpec{{Name: "a"}, {Name: "b"}}})
			assert.Equal(t, kind, topo.Kind, "topology reports its kind")
			const port = 8080
			serveAll(t, topo.Pods, port)
			a, b := topo.Pod("a"), topo.Pod("b")
			reach(t, a, "a->b", b, port)
			reach(t, b, "b->a", a, port)
			reach(t, topo.Node, "node->a", a, port)
			assert.Equal(t, netip.MustParseAddr("198.18.0.10"), a.IPv4, "first pod keeps the single-node address")
			assert.Equal(t, netip.MustParseAddr("fd00:5e::11"), b.IPv6, "second pod keeps the single-node address")

			for _, p := range topo.Pods {
				h := p.Hook()
				assert.Equal(t, p.Name, h.Name, "hook named after the pod")
				err := h.Do(func() error {
					l, err := netlink.LinkByName(h.Dev)
					if err != nil {
						return err
					}
					if l.Attrs().Index != h.Ifindex {
						return fmt.Errorf("%s has index %d, hook says %d", h.Dev, l.Attrs().Index, h.Ifindex)
					}
					return nil
				})
				assert.NoError(t, err, "hook device %s of %s is where the hook says", h.Dev, p.Name)
				switch kind {
				case topology.Veth:
					assert.Equal(t, [2]attach.Point{attach.TCIngress, attach.TCEgress}, [2]attach.Point{h.FromPod, h.ToPod}, "veth: host side tc")
				case topology.NetkitL3, topology.NetkitL2:
					assert.Equal(t, [2]attach.Point{attach.NetkitPeer, attach.NetkitPrimary}, [2]attach.Point{h.FromPod, h.ToPod}, "netkit: its own slots")
				default:
					assert.Equal(t, [2]attach.Point{attach.TCEgress, attach.TCIngress}, [2]attach.Point{h.FromPod, h.ToPod}, "ipvlan: the pod's own device")
					assert.False(t, h.HostSide, "ipvlan hooks are inside the pod")
				}
			}
		})
	}
}

// Auto is netkit where the kernel has it and veth otherwise.
func TestAutoKind(t *testing.T) {
	topo := topology.NewForTest(t, topology.Spec{Name: "auto", Kind: topology.Auto, Pods: []topology.PodSpec{{Name: "a"}}})
	assert.Contains(t, []topology.Kind{topology.NetkitL3, topology.Veth}, topo.Kind, "auto resolves to netkit or veth")
	assert.Equal(t, topo.Kind, topo.Pods[0].Kind, "pods have the resolved kind")
}

// Pods on different nodes reach each other over the wire, and the
// external client reaches every node's pods.
func TestMultiNode(t *testing.T) {
	for _, kind := range topology.Kinds {
		t.Run(string(kind), func(t *testing.T) {
			topo := topology.NewForTest(t, topology.Spec{Name: "multi", Kind: kind, Nodes: 2, External: true,
				Pods: []topology.PodSpec{{Name: "a"}, {Name: "b", Node: 1}, {Name: "c", Node: 1}}})
			require.Len(t, topo.Nodes, 2, "two nodes")
			a, b, c := topo.Pod("a"), topo.Pod("b"), topo.Pod("c")
			assert.Equal(t, netip.MustParseAddr("198.18.0.10"), a.IPv4, "node 0's pod in 198.18.0.0/24")
			assert.Equal(t, netip.MustParseAddr("198.18.1.11"), c.IPv4, "node 1's second pod in 198.18.1.0/24")
			assert.Equal(t, netip.MustParseAddr("fd00:5e:1::10"), b.IPv6, "node 1's pods in fd00:5e:1::/64")
			const port = 8080
			serveAll(t, topo.Pods, port)
			// ipvlan L3S hands datagrams that came in on the uplink to the
			// slave with the uplink's ifindex as IPv4 IP_PKTINFO, an index of
			// the node's netns: the server's reply, sent back through that
			// pktinfo, goes nowhere (seen on 7.2). TCP and IPv6 are fine.
			udp4 := kind != topology.IPvlanL3S
			reachFamilies(t, a, "a->b", b, port, udp4)
			reachFamilies(t, c, "c->a", a, port, udp4)
			reach(t, b, "b->c", c, port)
			require.NotNil(t, topo.External, "external client built")
			reachFamilies(t, topo.External, "external->a", a, port, udp4)
			reachFamilies(t, topo.External, "external->c", c, port, udp4)
		})
	}
}
