package nodeport

import (
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket/layers"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/packet"
	"github.com/servicepath/servicepath/harness/testenv"
)

// zoneModes are conntrack zones on (a small north-south zone) and off
// (one sp_ct shared by the pod-device and node-device objects).
var zoneModes = []struct {
	name   string
	config func(*loader.Config)
}{
	{"zones", func(c *loader.Config) { c.CTNorthSouthMapSize = 4096 }},
	{"shared", func(c *loader.Config) { c.CTNorthSouthMapSize = 0 }},
}

// clusterIP is an east-west VIP of the bed.
func (f Family) clusterIP() netip.AddrPort {
	if f.Node.Is4() {
		return netip.MustParseAddrPort("198.19.0.10:80")
	}
	return netip.MustParseAddrPort("[fd00:5f::10]:80")
}

func (f Family) clusterIPSvc(backend netip.Addr) service.Service {
	return service.Service{Name: "default/ew", Frontend: service.Frontend{Addr: f.clusterIP().Addr(), Port: f.clusterIP().Port(), Protocol: service.TCP},
		Backends: []service.Backend{{Addr: backend, Port: BackendPort}}}
}

// pod is where the local pod's packets are: its host-side device.
func (b *Bed) pod() *inject.Device {
	return &inject.Device{Do: b.Topo.Node.Do, Ifindex: b.Topo.Pod("local").HostIfIndex}
}

func entries(t testing.TB, m *ebpf.Map) int {
	n := 0
	var k maps.CTKey
	var v maps.CTEntry
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	require.NoError(t, it.Err(), "walk %s", m)
	return n
}

// inZones asserts ew entries in sp_ct and ns in the north-south zone, or
// all of them in sp_ct with zones off.
func inZones(ew, ns int) func(t testing.TB, e *inject.Env) {
	return func(t testing.TB, e *inject.Env) {
		m := e.DP.Maps
		if m.CTNS == nil {
			assert.Equal(t, ew+ns, entries(t, m.CT), "zones off: every entry in the shared sp_ct")
			return
		}
		assert.Equal(t, ew, entries(t, m.CT), "east-west entries in sp_ct")
		assert.Equal(t, ns, entries(t, m.CTNS), "north-south entries in sp_ct_ns")
	}
}

// icmpQuote is what an ICMP error quotes of an IP packet: IPv4's header
// and 8 bytes, all of a short IPv6 one.
func icmpQuote(l3 []byte) []byte {
	if l3[0]>>4 == 4 {
		return l3[:28]
	}
	return l3
}

// zoneFixtures prove which object tracks a flow in which map, and that a
// flow crossing both objects (a local backend's reply leaves through the
// pod device's from-pod program, then the wire's to-netdev program; an
// east-west flow to a remote backend crosses the wire's programs) is
// translated by the object that owns it and passed by the other, with
// zones on and off alike.
func (b *Bed) zoneFixtures(f Family) []inject.Fixture {
	wire, pod := b.wire(), b.pod()
	node := b.node(wire)
	name := func(s string) string { return f.Name + "/" + s }
	local, remote := f.at(f.Local), f.at(f.Remote)
	in := packet.Opts{}
	npLocal := inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Local}))
	nsSYN := tcp(f.Client, f.nodePort(), packet.SYN, in)
	localReply := tcp(local, f.Client, packet.SYNACK, in)
	dsrSYN := tcp(f.Client, local, packet.SYN, packet.Opts{DSR: f.lb()})
	podClient := netip.AddrPortFrom(f.Local, ClientPort)
	ewSYN := tcp(podClient, f.clusterIP(), packet.SYN, in)
	ewRemote := inject.Steps(node, inject.Upsert(f.clusterIPSvc(f.Remote)), inject.Send(pod, inject.FromPod, ewSYN))
	ewReply := tcp(remote, podClient, packet.SYNACK, in)
	udpFwd := packet.L3(layers.IPProtocolUDP, f.Client, local, packet.TCPFlags{}, payload, in)
	udpNP := packet.L3(layers.IPProtocolUDP, f.Client, f.nodePort(), packet.TCPFlags{}, payload, in)

	return []inject.Fixture{{
		Name:    name("nodeport-flow-tracked-north-south"),
		Setup:   inject.Steps(node, npLocal),
		On:      wire,
		Hook:    inject.FromNetdev,
		Input:   nsSYN,
		Verdict: inject.OK,
		Output:  tcp(f.Client, local, packet.SYN, in),
		Check:   inZones(0, 2),
	}, {
		Name:    name("dsr-flow-learned-north-south"),
		Setup:   node,
		On:      wire,
		Hook:    inject.FromNetdev,
		Input:   dsrSYN,
		Verdict: inject.OK,
		Check:   inZones(0, 1),
	}, {
		Name:    name("clusterip-flow-tracked-east-west"),
		Setup:   inject.Steps(node, inject.Upsert(f.clusterIPSvc(f.Remote))),
		On:      pod,
		Hook:    inject.FromPod,
		Input:   ewSYN,
		Verdict: inject.OK,
		Output:  tcp(podClient, remote, packet.SYN, in),
		Check:   inZones(2, 0),
	}, {
		// A pod reaching a NodePort is load-balanced at its own device.
		Name:    name("nodeport-from-a-pod-tracked-east-west"),
		Setup:   inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote}))),
		On:      pod,
		Hook:    inject.FromPod,
		Input:   tcp(podClient, f.nodePort(), packet.SYN, in),
		Verdict: inject.OK,
		Output:  tcp(podClient, remote, packet.SYN, in),
		Check:   inZones(2, 0),
	}, {
		// The pod-device object has no entry for it and must neither
		// translate it nor forget the node-device object's flow.
		Name:     name("local-backend-reply-passes-from-pod"),
		Setup:    inject.Steps(node, npLocal, inject.Send(wire, inject.FromNetdev, nsSYN)),
		On:       pod,
		Hook:     inject.FromPod,
		Input:    localReply,
		Verdict:  inject.OK,
		Counters: inject.CountersOf("pass", 1),
		Check:    inZones(0, 2),
	}, {
		// With BPF host routing the reply is sent to the wire's egress.
		Name:     name("local-backend-reply-routed-untranslated-with-bpf-routing"),
		Config:   bpfRouting,
		Setup:    inject.Steps(node, npLocal, inject.Send(wire, inject.FromNetdev, nsSYN)),
		On:       pod,
		Hook:     inject.FromPod,
		Input:    localReply,
		Verdict:  inject.Redirect,
		Output:   tcp(local, f.Client, packet.SYNACK, in.Forwarded()),
		Counters: inject.CountersOf("pass", 1, "redirect_neigh", 1),
		Check:    inZones(0, 2),
	}, {
		Name:     name("local-backend-reply-translated-at-the-wire"),
		Setup:    inject.Steps(node, npLocal, inject.Send(wire, inject.FromNetdev, nsSYN), inject.Send(pod, inject.FromPod, localReply)),
		On:       wire,
		Hook:     inject.ToNetdev,
		Input:    localReply,
		Verdict:  inject.OK,
		Output:   tcp(f.nodePort(), f.Client, packet.SYNACK, in),
		Counters: inject.CountersOf("rev_nat", 1),
	}, {
		Name: name("local-backend-icmp-error-translated-at-the-wire"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.UDP, []netip.Addr{f.Local})),
			inject.Send(wire, inject.FromNetdev, udp(f.Client, f.nodePort(), in))),
		On:       wire,
		Hook:     inject.ToNetdev,
		Input:    packet.ICMPError(packet.PortUnreachable, f.Local, f.Client.Addr(), icmpQuote(udpFwd), in),
		Verdict:  inject.OK,
		Output:   packet.ICMPError(packet.PortUnreachable, f.Node, f.Client.Addr(), icmpQuote(udpNP), in),
		Counters: inject.CountersOf("icmp_rev_nat", 1),
	}, {
		Name:     name("dsr-reply-passes-from-pod"),
		Setup:    inject.Steps(node, inject.Send(wire, inject.FromNetdev, dsrSYN)),
		On:       pod,
		Hook:     inject.FromPod,
		Input:    localReply,
		Verdict:  inject.OK,
		Counters: inject.CountersOf("pass", 1),
		Check:    inZones(0, 1),
	}, {
		Name:     name("dsr-reply-translated-at-the-wire"),
		Setup:    inject.Steps(node, inject.Send(wire, inject.FromNetdev, dsrSYN), inject.Send(pod, inject.FromPod, localReply)),
		On:       wire,
		Hook:     inject.ToNetdev,
		Input:    localReply,
		Verdict:  inject.OK,
		Output:   tcp(f.lb(), f.Client, packet.SYNACK, in),
		Counters: inject.CountersOf("rev_nat", 1),
	}, {
		Name:     name("east-west-request-leaves-the-wire-untouched"),
		Setup:    ewRemote,
		On:       wire,
		Hook:     inject.ToNetdev,
		Input:    tcp(podClient, remote, packet.SYN, in),
		Verdict:  inject.OK,
		Counters: inject.CountersOf("pass", 1),
		Check:    inZones(2, 0),
	}, {
		Name:     name("east-west-reply-passes-from-netdev"),
		Setup:    ewRemote,
		On:       wire,
		Hook:     inject.FromNetdev,
		Input:    ewReply,
		Verdict:  inject.OK,
		Counters: inject.CountersOf("pass", 1),
		Check:    inZones(2, 0),
	}, {
		Name:     name("east-west-reply-translated-at-to-pod"),
		Setup:    inject.Steps(ewRemote, inject.Send(wire, inject.FromNetdev, ewReply)),
		On:       pod,
		Hook:     inject.ToPod,
		Input:    ewReply,
		Verdict:  inject.OK,
		Output:   tcp(f.clusterIP(), podClient, packet.SYNACK, in),
		Counters: inject.CountersOf("rev_nat", 1),
	}}
}

func TestZones(t *testing.T) {
	testenv.RequireRoot(t)
	b := NewBed(t)
	var table []inject.Fixture
	for _, z := range zoneModes {
		for _, f := range b.Families() {
			for _, row := range b.zoneFixtures(f) {
				routing := row.Config
				if routing == nil {
					routing = stackRouting
				}
				row.Name = z.name + "/" + row.Name
				row.Config = func(c *loader.Config) { routing(c); z.config(c) }
				table = append(table, row)
			}
		}
	}
	inject.Run(t, table)
}
