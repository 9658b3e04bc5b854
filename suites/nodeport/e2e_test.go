package nodeport

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/cluster"
	"github.com/servicepath/servicepath/harness/topology"
	"github.com/servicepath/servicepath/harness/traffic"
)

const timeout = 3 * time.Second

// e2eFamily picks one family's addresses of the bed.
type e2eFamily struct {
	name        string
	client      netip.Addr
	nodes       []netip.Addr // wire addresses, by node
	lbVIP       netip.Addr
	unspecified netip.Addr
}

func e2eFamilies(ns *cluster.NorthSouth) []e2eFamily {
	var v4, v6 []netip.Addr
	for _, n := range ns.Nodes {
		v4, v6 = append(v4, n.WireIPv4), append(v6, n.WireIPv6)
	}
	e := ns.Topo.External
	return []e2eFamily{
		{"ipv4", e.IPv4, v4, netip.MustParseAddr("198.19.1.10"), netip.IPv4Unspecified()},
		{"ipv6", e.IPv6, v6, netip.MustParseAddr("fd00:5f:1::10"), netip.IPv6Unspecified()},
	}
}

// program gives every node the same frontend (TCP and UDP) over both
// backends, or only its own with ExternalLocal; edit adjusts it. The
// frontend goes when the subtest ends: with a port of its own, a subtest
// never sees a late packet of an earlier one's flows translated.
func program(t *testing.T, ns *cluster.NorthSouth, fe service.Frontend, edit func(*service.Service)) {
	for _, n := range ns.Nodes {
		for _, proto := range []service.Protocol{service.TCP, service.UDP} {
			s := service.Service{Name: "default/ns", Frontend: fe}
			s.Frontend.Protocol = proto
			if edit != nil {
				edit(&s)
			}
			for _, b := range []string{"backend-0", "backend-1"} {
				if !s.ExternalLocal || b == n.Backend {
					s.Backends = append(s.Backends, ns.Backend(b, fe.Addr))
				}
			}
			upsert(t, n, s)
		}
	}
}

// upsert programs s on node n until the subtest ends.
func upsert(t *testing.T, n *cluster.NSNode, s service.Service) {
	require.NoError(t, n.Services.Upsert(s), "program %s on %s", s.Frontend, n.Name)
	t.Cleanup(func() { assert.NoError(t, n.Services.Delete(s.Frontend), "remove %s from %s", s.Frontend, n.Name) })
}

// programOne gives every node f's NodePort port/proto with the one
// backend be, then edit, until the subtest ends. It returns node 0's
// address of it.
func programOne(t *testing.T, ns *cluster.NorthSouth, f e2eFamily, port uint16, proto service.Protocol, be service.Backend,
	edit func(*service.Service)) netip.AddrPort {
	for _, n := range ns.Nodes {
		s := service.Service{Name: "default/one", Backends: []service.Backend{be},
			Frontend: service.Frontend{Addr: f.unspecified, Port: port, Protocol: proto, Kind: service.NodePort}}
		if edit != nil {
			edit(&s)
		}
		upsert(t, n, s)
	}
	return netip.AddrPortFrom(f.nodes[0], port)
}

// exchange runs n TCP and n UDP exchanges from the external client to dst
// and tallies who answered; every UDP reply must come from dst.
func exchange(t *testing.T, ns *cluster.NorthSouth, dst netip.AddrPort, n int) traffic.Tally {
	all := traffic.Tally{}
	tally, err := traffic.Run(n, func(i int) (traffic.Reply, error) {
		return traffic.TCPExchange(ns.Topo.External, dst, []byte(fmt.Sprintf("tcp %d", i)), timeout)
	})
	require.NoError(t, err, "TCP from the external client to %s", dst)
	for k, v := range tally {
		all[k] += v
	}
	tally, err = traffic.Run(n, func(i int) (traffic.Reply, error) {
		r, err := traffic.UDPExchange(ns.Topo.External, dst, []byte(fmt.Sprintf("udp %d", i)), timeout)
		if err == nil && r.Peer != dst {
			err = fmt.Errorf("UDP reply came from %s, not %s", r.Peer, dst)
		}
		return r, err
	})
	require.NoError(t, err, "UDP from the external client to %s, every reply from it", dst)
	for k, v := range tally {
		all[k] += v
	}
	return all
}

func grew(before, after map[string]uint64, name string) uint64 { return after[name] - before[name] }

func TestNorthSouthEndToEnd(t *testing.T) {
	ns := cluster.NewNorthSouth(t, nil)
	n := 40
	if testing.Short() {
		n = 16
	}
	port := uint16(NodePort)
	for _, f := range e2eFamilies(ns) {
		var np service.Frontend
		nodePort := func(i int) netip.AddrPort { return netip.AddrPortFrom(f.nodes[i], np.Port) }
		// fresh gives each subtest a NodePort of its own.
		fresh := func() {
			port++
			np = service.Frontend{Addr: f.unspecified, Port: port, Kind: service.NodePort}
		}

		t.Run(f.name+"/nodeport-snat-spreads-over-both-nodes-backends", func(t *testing.T) {
			fresh()
			program(t, ns, np, nil)
			for i := range ns.Nodes {
				before := ns.Counters(t, i)
				tally := exchange(t, ns, nodePort(i), n)
				assert.Positive(t, tally["backend-0"], "entry node %d reached backend-0: %v", i, tally)
				assert.Positive(t, tally["backend-1"], "entry node %d reached backend-1: %v", i, tally)
				after := ns.Counters(t, i)
				assert.Positive(t, grew(before, after, "np_snat"), "node %d SNATed flows to the other node's backend", i)
				assert.Positive(t, grew(before, after, "np_rev_snat"), "node %d translated their replies back", i)
				assert.Positive(t, grew(before, after, "np_local"), "node %d served flows locally", i)
			}
		})

		for _, d := range []service.Dispatch{service.Option, service.IPIP} {
			t.Run(f.name+"/dsr-"+d.String()+"-replies-bypass-the-entry-node", func(t *testing.T) {
				fresh()
				program(t, ns, np, func(s *service.Service) { s.Mode, s.Dispatch = service.DSR, d })
				entry, backend := ns.Counters(t, 0), ns.Counters(t, 1)
				wire, err := traffic.StartCapture(ns.Topo.External, topology.WireIfName)
				require.NoError(t, err, "capture at the external client")
				tally := exchange(t, ns, nodePort(0), n)
				frames, err := wire.Stop()
				require.NoError(t, err, "capture at the external client")
				assert.Positive(t, tally["backend-1"], "node 0 handed flows to backend-1: %v", tally)
				// On the wire: replies from node 0's NodePort address that
				// node 1 sent, so they never passed node 0.
				fromMAC := repliesByMAC(frames, nodePort(0))
				node1, err := wireMAC(ns.Nodes[1].Do)
				require.NoError(t, err, "node 1's wire MAC")
				assert.Positive(t, fromMAC[node1.String()], "replies from %s arrived from node 1's MAC (all: %v)", nodePort(0), fromMAC)
				entry2, backend2 := ns.Counters(t, 0), ns.Counters(t, 1)
				metric := map[service.Dispatch]string{service.Option: "dsr_opt", service.IPIP: "dsr_ipip"}[d]
				assert.Positive(t, grew(entry, entry2, metric), "node 0 dispatched by %s", d)
				assert.Zero(t, grew(entry, entry2, "np_snat"), "node 0 SNATed nothing")
				assert.Zero(t, grew(entry, entry2, "np_rev_snat"), "no reply came back through node 0")
				assert.Positive(t, grew(backend, backend2, "dsr_learned"), "node 1 learned the DSR flows")
				assert.Positive(t, grew(backend, backend2, "rev_nat"), "node 1 answered from node 0's NodePort itself")
			})
		}

		t.Run(f.name+"/etp-local-serves-locally-and-keeps-the-client-address", func(t *testing.T) {
			fresh()
			program(t, ns, np, func(s *service.Service) { s.ExternalLocal = true })
			for i, node := range ns.Nodes {
				tally := exchange(t, ns, nodePort(i), n/2)
				assert.Equal(t, traffic.Tally{node.Backend: n}, tally, "node %d sent everything to its own backend", i)
				assert.True(t, ns.Servers[node.Backend].SawPeer(f.client), "%s saw the external client's own address", node.Backend)
			}
		})

		t.Run(f.name+"/loadbalancer-source-ranges", func(t *testing.T) {
			lb := service.Frontend{Addr: f.lbVIP, Port: NodePort, Kind: service.LoadBalancer}
			dst := netip.AddrPortFrom(f.lbVIP, NodePort)
			program(t, ns, lb, func(s *service.Service) {
				s.SourceRanges = []netip.Prefix{netip.PrefixFrom(f.client, f.client.BitLen())}
			})
			for i := range ns.Nodes {
				routeVIP(t, ns, f.lbVIP, f.nodes[i])
				tally := exchange(t, ns, dst, n/2)
				assert.Equal(t, n, tally["backend-0"]+tally["backend-1"], "an allowed client reaches the LoadBalancer address through node %d: %v", i, tally)
			}
			routeVIP(t, ns, f.lbVIP, f.nodes[0])

			other := netip.PrefixFrom(f.nodes[1], f.nodes[1].BitLen())
			program(t, ns, lb, func(s *service.Service) { s.SourceRanges = []netip.Prefix{other} })
			before := ns.Counters(t, 0)
			_, err := traffic.TCPExchange(ns.Topo.External, dst, []byte("denied"), time.Second)
			assert.Error(t, err, "a client outside the ranges gets nowhere")
			assert.Positive(t, grew(before, ns.Counters(t, 0), "source_range_denied"), "node 0 counted the denial")
		})

		t.Run(f.name+"/externalip", func(t *testing.T) {
			program(t, ns, service.Frontend{Addr: f.lbVIP, Port: NodePort + 1, Kind: service.ExternalIP}, nil)
			for i := range ns.Nodes {
				routeVIP(t, ns, f.lbVIP, f.nodes[i])
				tally := exchange(t, ns, netip.AddrPortFrom(f.lbVIP, NodePort+1), n/2)
				assert.Equal(t, n, tally["backend-0"]+tally["backend-1"], "the ExternalIP answers through node %d: %v", i, tally)
			}
		})

		t.Run(f.name+"/host-network-backend-answers-from-the-service", func(t *testing.T) {
			// A hostNetwork pod's server: a socket of node 0's own netns.
			const hostPort = 9090
			srv, err := traffic.Serve(ns.Nodes[0], "node-0-host", hostPort)
			require.NoError(t, err, "serve in node 0's netns")
			t.Cleanup(func() { srv.Close() })
			fresh()
			for _, proto := range []service.Protocol{service.TCP, service.UDP} {
				s := service.Service{Name: "default/hostnet", Frontend: np,
					Backends: []service.Backend{{Addr: f.nodes[0], Port: hostPort}}}
				s.Frontend.Protocol = proto
				require.NoError(t, ns.Nodes[0].Services.Upsert(s), "program %s on node 0", s.Frontend)
				t.Cleanup(func() { assert.NoError(t, ns.Nodes[0].Services.Delete(s.Frontend), "remove %s", s.Frontend) })
			}
			before := ns.Counters(t, 0)
			tally := exchange(t, ns, nodePort(0), n/2)
			assert.Equal(t, traffic.Tally{"node-0-host": n}, tally, "the node's own socket answered every exchange")
			assert.True(t, srv.SawPeer(f.client), "the host socket saw the external client's address")
			assert.GreaterOrEqual(t, grew(before, ns.Counters(t, 0), "np_host"), uint64(n), "every flow's packets went up node 0's stack")
		})

		t.Run(f.name+"/hostport-reaches-its-pod", func(t *testing.T) {
			const hostPort = 8081
			hp := service.Service{Name: "pod:default/backend-1", Frontend: service.Frontend{Addr: f.unspecified, Port: hostPort, Protocol: service.TCP, Kind: service.HostPort},
				Backends: []service.Backend{ns.Backend("backend-1", f.client)}}
			require.NoError(t, ns.Nodes[1].Services.Upsert(hp), "program the HostPort on node 1")
			r, err := traffic.TCPExchange(ns.Topo.External, netip.AddrPortFrom(f.nodes[1], hostPort), []byte("hostport"), timeout)
			require.NoError(t, err, "TCP to node 1's HostPort")
			assert.Equal(t, "backend-1", r.Identity, "the HostPort's pod answered")
		})
	}
}

// repliesByMAC counts the frames from svc (TCP or UDP) by source MAC.
func repliesByMAC(frames [][]byte, svc netip.AddrPort) map[string]int {
	out := map[string]int{}
	for _, f := range frames {
		pkt := gopacket.NewPacket(f, layers.LayerTypeEthernet, gopacket.NoCopy)
		eth, _ := pkt.Layer(layers.LayerTypeEthernet).(*layers.Ethernet)
		nl, tl := pkt.NetworkLayer(), pkt.TransportLayer()
		if eth == nil || nl == nil || tl == nil {
			continue
		}
		src, _ := netip.AddrFromSlice(nl.NetworkFlow().Src().Raw())
		port := binary.BigEndian.Uint16(tl.TransportFlow().Src().Raw())
		if src.Unmap() == svc.Addr() && port == svc.Port() {
			out[eth.SrcMAC.String()]++
		}
	}
	return out
}

// routeVIP routes vip from the external client through the node at via,
// as a LoadBalancer's announcement would.
func routeVIP(t *testing.T, ns *cluster.NorthSouth, vip, via netip.Addr) {
	err := ns.Topo.External.Do(func() error {
		l, err := netlink.LinkByName(topology.WireIfName)
		if err != nil {
			return err
		}
		return netlink.RouteReplace(&netlink.Route{LinkIndex: l.Attrs().Index,
			Dst: netipPrefixNet(netip.PrefixFrom(vip, vip.BitLen())), Gw: via.AsSlice()})
	})
	require.NoError(t, err, "route %s via %s on the external client", vip, via)
}
