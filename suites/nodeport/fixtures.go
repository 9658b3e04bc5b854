// Package nodeport holds the packet fixture table for north-south load
// balancing on a node device (bpf/bpf_host.c, bpf/lib/nodeport.h) and its
// end-to-end tests across emulated nodes with an external client.
package nodeport

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/ct"
	"github.com/servicepath/servicepath/datapath/endpoints"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/nodeaddrs"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/packet"
	"github.com/servicepath/servicepath/harness/topology"
)

// Ports of the fixtures' services and backends.
const (
	NodePort    = 30080
	BackendPort = 8080
	ClientPort  = 40000
)

// Bed is a node (the topology's first) with a local backend pod, a second
// node with a remote one, and an external client on the wire. Fixtures run
// as if the packet were on the first node's wire device, so
// bpf_fib_lookup sees real routes. Besides the topology, the first node
// has:
//   - neighbour entries for the second node and the client, so the FIB
//     gives XDP their MACs to send with;
//   - a route via a next hop with no neighbour (Family.Unresolved);
//   - a second node device, sideDev, whose far side is Family.Side.
type Bed struct {
	Topo *topology.Topology
	// MACs of the first node's wire device, of the second node's and of
	// the client's; SideMAC is the side device's own.
	NodeMAC, PeerMAC, ClientMAC, SideMAC net.HardwareAddr
}

// sideDev is the first node's second node device; sideMAC is its far
// side's neighbour entry.
const sideDev = "side0"

var sideMAC = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x5e, 0x01}

// NewBed builds the topology, torn down when the test ends.
func NewBed(t *testing.T) *Bed {
	b := &Bed{Topo: topology.NewForTest(t, topology.Spec{Name: "np", Nodes: 2, External: true,
		Pods: []topology.PodSpec{{Name: "local"}, {Name: "remote", Node: 1}}})}
	var err error
	b.PeerMAC, err = wireMAC(b.Topo.Nodes[1].Do)
	require.NoError(t, err, "second node's wire MAC")
	b.ClientMAC, err = wireMAC(b.Topo.External.Do)
	require.NoError(t, err, "client's wire MAC")
	b.NodeMAC, err = wireMAC(b.Topo.Node.Do)
	require.NoError(t, err, "node's wire MAC")
	require.NoError(t, b.Topo.Node.Do(b.plumb), "neighbours, routes and the side device of the node")
	return b
}

func wireMAC(do func(func() error) error) (mac net.HardwareAddr, err error) {
	err = do(func() error {
		l, err := netlink.LinkByName(topology.WireIfName)
		if err == nil {
			mac = l.Attrs().HardwareAddr
		}
		return err
	})
	return mac, err
}

// plumb runs in the first node's netns.
func (b *Bed) plumb() error {
	wire, err := netlink.LinkByName(topology.WireIfName)
	if err != nil {
		return err
	}
	// A veth whose peer stays in the node: the kernels tested here are not
	// all built with dummy devices.
	side := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: sideDev}, PeerName: sideDev + "-peer"}
	if err := netlink.LinkAdd(side); err != nil {
		return fmt.Errorf("add %s: %w", sideDev, err)
	}
	for _, name := range []string{sideDev, side.PeerName} {
		l, err := netlink.LinkByName(name)
		if err == nil {
			err = netlink.LinkSetUp(l)
		}
		if err != nil {
			return fmt.Errorf("%s up: %w", name, err)
		}
		if name == sideDev {
			b.SideMAC = l.Attrs().HardwareAddr
		}
	}
	neigh := func(l netlink.Link, ip netip.Addr, mac net.HardwareAddr) error {
		return netlink.NeighSet(&netlink.Neigh{LinkIndex: l.Attrs().Index, Family: family(ip), State: netlink.NUD_PERMANENT,
			IP: ip.AsSlice(), HardwareAddr: mac})
	}
	peer := b.Topo.Nodes[1]
	for i, f := range b.Families() {
		if err := neigh(wire, []netip.Addr{peer.WireIPv4, peer.WireIPv6}[i], b.PeerMAC); err != nil {
			return fmt.Errorf("neighbour of the second node: %w", err)
		}
		if err := neigh(wire, f.Client.Addr(), b.ClientMAC); err != nil {
			return fmt.Errorf("neighbour of the client: %w", err)
		}
		bits := map[bool]int{true: 24, false: 64}[f.Node.Is4()]
		a := &netlink.Addr{IPNet: netipPrefixNet(netip.PrefixFrom(f.SideNode, bits)), Flags: unix.IFA_F_NODAD}
		if err := netlink.AddrAdd(side, a); err != nil {
			return fmt.Errorf("address of %s: %w", sideDev, err)
		}
		if err := neigh(side, f.Side, sideMAC); err != nil {
			return fmt.Errorf("neighbour on %s: %w", sideDev, err)
		}
		r := &netlink.Route{LinkIndex: wire.Attrs().Index, Dst: netipPrefixNet(netip.PrefixFrom(f.Unresolved, f.Unresolved.BitLen())),
			Gw: f.unresolvedVia.AsSlice()}
		if err := netlink.RouteAdd(r); err != nil {
			return fmt.Errorf("route via a next hop without neighbour: %w", err)
		}
	}
	return nil
}

func family(a netip.Addr) int {
	if a.Is4() {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

// Family is one address family's addresses in the bed.
type Family struct {
	Name           string
	Client         netip.AddrPort
	Node           netip.Addr // the first node's wire address: NodePort, SNAT
	Local, Remote  netip.Addr // backend pods
	LBVIP          netip.Addr // a LoadBalancer address routed to the node
	Unroutable     netip.Addr
	AllowedClients netip.Prefix
	// Unresolved is routed via a next hop with no neighbour entry.
	Unresolved, unresolvedVia netip.Addr
	// Side is across the second node device, SideNode that device's
	// address.
	Side, SideNode netip.Addr
}

// Families are the bed's addresses, IPv4 then IPv6.
func (b *Bed) Families() []Family {
	n, e := b.Topo.Node, b.Topo.External
	l, r := b.Topo.Pod("local"), b.Topo.Pod("remote")
	return []Family{{
		Name: "ipv4", Client: netip.AddrPortFrom(e.IPv4, ClientPort), Node: n.WireIPv4,
		Local: l.IPv4, Remote: r.IPv4, LBVIP: netip.MustParseAddr("198.19.1.10"),
		Unroutable: netip.MustParseAddr("203.0.113.7"), AllowedClients: netip.PrefixFrom(e.IPv4, 32),
		Unresolved: netip.MustParseAddr("203.0.113.130"), unresolvedVia: netip.MustParseAddr("198.18.254.250"),
		Side: netip.MustParseAddr("192.0.2.50"), SideNode: netip.MustParseAddr("192.0.2.1"),
	}, {
		Name: "ipv6", Client: netip.AddrPortFrom(e.IPv6, ClientPort), Node: n.WireIPv6,
		Local: l.IPv6, Remote: r.IPv6, LBVIP: netip.MustParseAddr("fd00:5f:1::10"),
		Unroutable: netip.MustParseAddr("2001:db8::7"), AllowedClients: netip.PrefixFrom(e.IPv6, 128),
		Unresolved: netip.MustParseAddr("2001:db8:1::7"), unresolvedVia: netip.MustParseAddr("fd00:5e:fe::fa"),
		Side: netip.MustParseAddr("2001:db8:2::50"), SideNode: netip.MustParseAddr("2001:db8:2::1"),
	}}
}

func (f Family) nodePort() netip.AddrPort { return netip.AddrPortFrom(f.Node, NodePort) }
func (f Family) lb() netip.AddrPort       { return netip.AddrPortFrom(f.LBVIP, NodePort) }
func (f Family) at(a netip.Addr) netip.AddrPort {
	return netip.AddrPortFrom(a, BackendPort)
}
func (f Family) snat(port uint16) netip.AddrPort { return netip.AddrPortFrom(f.Node, port) }

func (f Family) unspecified() netip.Addr {
	if f.Node.Is4() {
		return netip.IPv4Unspecified()
	}
	return netip.IPv6Unspecified()
}

// nodePortSvc is a NodePort service with the given backends, then edits.
func (f Family) nodePortSvc(proto service.Protocol, backends []netip.Addr, edit ...func(*service.Service)) service.Service {
	s := service.Service{Name: "default/np", Frontend: service.Frontend{Addr: f.unspecified(), Port: NodePort, Protocol: proto, Kind: service.NodePort}}
	for _, a := range backends {
		s.Backends = append(s.Backends, service.Backend{Addr: a, Port: BackendPort})
	}
	for _, fn := range edit {
		fn(&s)
	}
	return s
}

func dsr(d service.Dispatch) func(*service.Service) {
	return func(s *service.Service) { s.Mode, s.Dispatch = service.DSR, d }
}

func hybrid(s *service.Service) { s.Mode = service.Hybrid }

// loadBalancer moves the frontend to the family's LoadBalancer address.
func (f Family) loadBalancer(ranges ...netip.Prefix) func(*service.Service) {
	return func(s *service.Service) {
		s.Frontend.Addr, s.Frontend.Kind, s.SourceRanges = f.LBVIP, service.LoadBalancer, ranges
	}
}

func externalLocal(s *service.Service) { s.ExternalLocal = true }

// inCluster makes s the in-cluster entry of an externalTrafficPolicy
// Local frontend.
func inCluster(s *service.Service) { s.Frontend.InCluster = true }

// wire is where fixtures' packets are: the first node's wire device.
func (b *Bed) wire() *inject.Device {
	ifindex := 0
	_ = b.Topo.Node.Do(func() error {
		l, err := netIfindex(topology.WireIfName)
		ifindex = l
		return err
	})
	return &inject.Device{Do: b.Topo.Node.Do, Ifindex: ifindex}
}

// node registers what the node's agent would: its addresses, its wire
// device for SNAT, and its local pod.
func (b *Bed) node(dev *inject.Device) func(e *inject.Env) error {
	return func(e *inject.Env) error {
		n, l := b.Topo.Node, b.Topo.Pod("local")
		if err := nodeaddrs.Sync(e.DP.Maps.NodeAddrs, []netip.Addr{n.WireIPv4, n.WireIPv6}); err != nil {
			return err
		}
		v4, _ := maps.AddrFrom(n.WireIPv4)
		v6, _ := maps.AddrFrom(n.WireIPv6)
		if err := e.DP.Maps.Netdevs.Put(uint32(dev.Ifindex), maps.NetdevInfo{V4: v4, V6: v6}); err != nil {
			return err
		}
		return endpoints.Upsert(e.DP.Endpoints, endpoints.Endpoint{
			Addrs: []netip.Addr{l.IPv4, l.IPv6}, Ifindex: l.HostIfIndex, Flags: endpoints.TCIngress,
			MAC: packet.PodMAC, NodeMAC: packet.HostMAC,
		})
	}
}

// sideNetdev registers the side device as a node device, with its
// addresses for SNAT.
func (b *Bed) sideNetdev(e *inject.Env) error {
	var ifindex int
	err := b.Topo.Node.Do(func() error {
		var err error
		ifindex, err = netIfindex(sideDev)
		return err
	})
	if err != nil {
		return err
	}
	var info maps.NetdevInfo
	for _, f := range b.Families() {
		a, _ := maps.AddrFrom(f.SideNode)
		if f.Node.Is4() {
			info.V4 = a
		} else {
			info.V6 = a
		}
	}
	return e.DP.Maps.Netdevs.Put(uint32(ifindex), info)
}

func netIfindex(name string) (int, error) {
	i, err := net.InterfaceByName(name)
	if err != nil {
		return 0, err
	}
	return i.Index, nil
}

var payload = []byte("servicepath north-south fixture payload")

// wireMTU is the MTU of the bed's wire devices.
const wireMTU = 1500

// DSR's frag needed announces the MTU bpf_fib_lookup reports, from 5.12.
const (
	fibMTUKernel = "5.12"
	fibMTUNeeds  = "bpf_fib_lookup's mtu_result, the route's MTU DSR's frag needed announces"
)

// ipHeader is the length of the family's fixed IP header.
func (f Family) ipHeader() int {
	if f.Node.Is4() {
		return 20
	}
	return 40
}

// dsrFit is what of the wire's MTU DSR by d leaves a packet
// (bpf/lib/dsr.h: the option, or the outer header).
func (f Family) dsrFit(d service.Dispatch) uint16 { return dsrFit(f.Node.Is4(), d) }

func dsrFit(v4 bool, d service.Dispatch) uint16 {
	over := map[bool]int{true: 8, false: 24}[v4]
	if d == service.IPIP {
		over = map[bool]int{true: 20, false: 40}[v4]
	}
	return uint16(wireMTU - over)
}

// fullSize is a TCP segment from the client to dst as long as the wire
// takes, less short bytes.
func (f Family) fullSize(dst netip.AddrPort, short int, o packet.Opts) []byte {
	return packet.TCP(f.Client, dst, packet.ACK, make([]byte, wireMTU-f.ipHeader()-20-short), o)
}

// fullSizeUDP is a UDP datagram from the client to dst as long as the
// wire takes, without DF.
func (f Family) fullSizeUDP(dst netip.AddrPort) []byte {
	return packet.UDP(f.Client, dst, make([]byte, wireMTU-f.ipHeader()-8), packet.Opts{})
}

func tcp(src, dst netip.AddrPort, fl packet.TCPFlags, o packet.Opts) []byte {
	return packet.TCP(src, dst, fl, payload, o)
}

func udp(src, dst netip.AddrPort, o packet.Opts) []byte { return packet.UDP(src, dst, payload, o) }

// natPorts narrows SNAT to ports [lo, hi].
func natPorts(lo, hi uint16) func(*loader.Config) {
	return func(c *loader.Config) { c.NATPortMin, c.NATPortMax = lo, hi }
}

func bpfRouting(c *loader.Config)   { c.HostRouting = loader.HostRoutingBPF }
func stackRouting(c *loader.Config) { c.HostRouting = loader.HostRoutingStack }

// checkFlow asserts the flow entry of client -> backend reverse-translates
// to svc, with the north-south states want (ct.StateNames).
func checkFlow(client, backend, svc netip.AddrPort, want ...string) func(t testing.TB, e *inject.Env) {
	return func(t testing.TB, e *inject.Env) {
		entries, err := ct.Dump(e.DP.Maps.NorthSouthCT())
		require.NoError(t, err, "dump the north-south conntrack")
		found := false
		for _, en := range entries {
			if en.Service || en.Source != client || en.Dest != backend {
				continue
			}
			found = true
			assert.Equal(t, svc, en.NAT, "flow entry reverse-translates to the service address")
			var ns []string
			for _, st := range en.State {
				if strings.HasPrefix(st, "ns-") {
					ns = append(ns, st)
				}
			}
			assert.Equal(t, want, ns, "north-south states of the flow")
		}
		assert.True(t, found, "a flow entry %s -> %s exists", client, backend)
	}
}

// natEntries counts the NAT map's entries.
func natEntries(t testing.TB, e *inject.Env) int {
	n := 0
	var k maps.CTKey
	var v maps.NATEntry
	it := e.DP.Maps.NAT.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	require.NoError(t, it.Err(), "walk the NAT map")
	return n
}

func natEntriesAre(n int) func(t testing.TB, e *inject.Env) {
	return func(t testing.TB, e *inject.Env) { assert.Equal(t, n, natEntries(t, e), "entries in the NAT map") }
}

// stillOpen asserts the flow client -> backend is not closed and keeps
// its SNAT mapping, both halves.
func stillOpen(client, backend netip.AddrPort) func(t testing.TB, e *inject.Env) {
	return func(t testing.TB, e *inject.Env) {
		entries, err := ct.Dump(e.DP.Maps.NorthSouthCT())
		require.NoError(t, err, "dump the north-south conntrack")
		found := false
		for _, en := range entries {
			if !en.Service && en.Source == client && en.Dest == backend {
				found = true
				assert.NotContains(t, en.State, "rst", "the flow is not closed")
			}
		}
		assert.True(t, found, "a flow entry %s -> %s exists", client, backend)
		assert.Equal(t, 2, natEntries(t, e), "the flow keeps its out and reply mappings")
	}
}

// evictReplyHalf deletes the reply mapping backend -> snatted, as the
// NAT map's LRU may.
func evictReplyHalf(backend, snatted netip.AddrPort) func(e *inject.Env) error {
	return func(e *inject.Env) error {
		b, fam := maps.AddrFrom(backend.Addr())
		n, _ := maps.AddrFrom(snatted.Addr())
		k := maps.CTKey{SAddr: b, DAddr: n, SPort: maps.NewBE16(backend.Port()), DPort: maps.NewBE16(snatted.Port()),
			Proto: unix.IPPROTO_TCP, Family: fam, Flags: maps.NATFlagIn}
		return e.DP.Maps.NAT.Delete(&k)
	}
}

func netipPrefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
