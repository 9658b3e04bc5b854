// Package clusterip holds the packet fixture table for per-packet ClusterIP
// load balancing at the pod device (bpf/bpf_lxc.c). Tests run it with
// inject.Run; bench/ runs the same rows with inject.Bench.
package clusterip

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket/layers"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/ct"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/packet"
)

// Family holds one address family's fixture addresses.
type Family struct {
	Name     string
	Client   netip.AddrPort
	VIP      netip.Addr
	Backends []netip.Addr
	Other    netip.Addr // neither a VIP nor a backend
	Router   netip.Addr // a hop that sends ICMP errors
}

var (
	V4 = Family{
		Name:     "ipv4",
		Client:   netip.MustParseAddrPort("198.18.0.10:40000"),
		VIP:      netip.MustParseAddr("198.19.0.10"),
		Backends: []netip.Addr{netip.MustParseAddr("198.18.0.11"), netip.MustParseAddr("198.18.0.12"), netip.MustParseAddr("198.18.0.13")},
		Other:    netip.MustParseAddr("198.18.0.99"),
		Router:   netip.MustParseAddr("198.18.0.1"),
	}
	V6 = Family{
		Name:     "ipv6",
		Client:   netip.MustParseAddrPort("[fd00:5e::10]:40000"),
		VIP:      netip.MustParseAddr("fd00:5f::10"),
		Backends: []netip.Addr{netip.MustParseAddr("fd00:5e::11"), netip.MustParseAddr("fd00:5e::12"), netip.MustParseAddr("fd00:5e::13")},
		Other:    netip.MustParseAddr("fd00:5e::99"),
		Router:   netip.MustParseAddr("fd00:5e::1"),
	}
	Families = []Family{V4, V6}
)

const (
	VIPPort     = 80
	BackendPort = 8080
)

var payload = []byte("servicepath fixture payload, 64 bytes long, padded to length...")

func (f Family) vip() netip.AddrPort { return netip.AddrPortFrom(f.VIP, VIPPort) }
func (f Family) backend(i int) netip.AddrPort {
	return netip.AddrPortFrom(f.Backends[i], BackendPort)
}

// Service builds a one-frontend service on the family's VIP.
func (f Family) Service(proto service.Protocol, backends ...service.Backend) service.Service {
	return service.Service{
		Name:     "default/fixture",
		Frontend: service.Frontend{Addr: f.VIP, Port: VIPPort, Protocol: proto},
		Backends: backends,
	}
}

// internalLocal is the VIP under internalTrafficPolicy Local, on a node
// without local backends.
func (f Family) internalLocal(proto service.Protocol) service.Service {
	s := f.Service(proto)
	s.InternalLocal = true
	return s
}

// external is the VIP as an externalTrafficPolicy Local LoadBalancer IP:
// the entry outside clients use, or the in-cluster one.
func (f Family) external(proto service.Protocol, inCluster bool, backends ...service.Backend) service.Service {
	s := f.Service(proto, backends...)
	s.Frontend.Kind, s.Frontend.InCluster, s.ExternalLocal = service.LoadBalancer, inCluster, !inCluster
	return s
}

func (f Family) active(i int) service.Backend {
	return service.Backend{Addr: f.Backends[i], Port: BackendPort}
}

func (f Family) terminating(i int) service.Backend {
	b := f.active(i)
	b.State = service.Terminating
	return b
}

func reply() packet.Opts { return packet.Opts{FromHost: true} }

func udp(src, dst netip.AddrPort) []byte { return packet.UDP(src, dst, payload, packet.Opts{}) }

// l3UDP is a datagram without Ethernet, as ICMP errors quote it.
func l3UDP(src, dst netip.AddrPort) []byte {
	return packet.L3(layers.IPProtocolUDP, src, dst, packet.TCPFlags{}, payload, packet.Opts{})
}

// checkCT asserts the two CT entries a new flow of f.Client creates.
func checkCT(f Family, proto service.Protocol, backend netip.AddrPort) func(t testing.TB, e *inject.Env) {
	return checkClientCT(f, proto, f.Client, backend)
}

// checkClientCT asserts the two CT entries a new flow of client creates.
func checkClientCT(f Family, proto service.Protocol, client, backend netip.AddrPort) func(t testing.TB, e *inject.Env) {
	return func(t testing.TB, e *inject.Env) {
		entries, err := ct.Dump(e.DP.Maps.CT)
		require.NoError(t, err, "dump conntrack")
		require.Len(t, entries, 2, "a new flow creates a service entry and a flow entry")
		for _, en := range entries {
			assert.Equal(t, uint8(proto), en.Protocol, "CT protocol")
			assert.Equal(t, client, en.Source, "CT source is the client")
			if en.Service {
				assert.Equal(t, f.vip(), en.Dest, "service entry is keyed by the VIP")
				assert.Equal(t, backend, en.NAT, "service entry names the backend")
			} else {
				assert.Equal(t, backend, en.Dest, "flow entry is keyed by the backend")
				assert.Equal(t, f.vip(), en.NAT, "flow entry reverse-translates to the VIP")
			}
			assert.Positive(t, en.ExpiresIn, "entry has a lifetime")
		}
	}
}

// quote is what an ICMP error carries of a packet: IPv4 routers quote the
// header and 8 bytes; IPv6 quotes as much as fits (here: all).
func quote(l3 []byte) []byte {
	if l3[0]>>4 == 4 {
		return l3[:28]
	}
	return l3
}

// Fixtures is the ClusterIP table, for both families.
func Fixtures() []inject.Fixture {
	var out []inject.Fixture
	for _, f := range Families {
		out = append(out, familyFixtures(f)...)
		out = append(out, affinityFixtures(f)...)
		out = append(out, maglevFixtures(f)...)
		out = append(out, sourceRangeFixtures(f)...)
		out = append(out, hairpinFixtures(f)...)
		out = append(out, topologyFixtures(f)...)
	}
	return append(out, inject.Fixture{
		Name:     "arp-passes",
		Setup:    inject.Upsert(V4.Service(service.TCP, V4.active(0))),
		Input:    arp(),
		Verdict:  inject.OK,
		Counters: inject.CountersOf("pass", 1),
	}, inject.Fixture{
		Name:     "ipv4/udp-without-checksum-keeps-none",
		Setup:    inject.Upsert(V4.Service(service.UDP, V4.active(0))),
		Input:    packet.UDP(V4.Client, V4.vip(), payload, packet.Opts{ZeroUDPChecksum: true}),
		Verdict:  inject.OK,
		Output:   packet.UDP(V4.Client, V4.backend(0), payload, packet.Opts{ZeroUDPChecksum: true}),
		Counters: inject.CountersOf("lb_new", 1),
	}, inject.Fixture{
		Name:     "ipv4/bad-header-length-passes-as-malformed",
		Setup:    inject.Upsert(V4.Service(service.TCP, V4.active(0))),
		Input:    badIHL(packet.TCP(V4.Client, V4.vip(), packet.SYN, nil, packet.Opts{})),
		Verdict:  inject.OK,
		Counters: inject.CountersOf("malformed", 1),
	})
}

// badIHL claims a 12-byte IPv4 header; the kernel refuses to inject a
// truncated one, so this is how an unreadable header gets in.
func badIHL(frame []byte) []byte {
	frame[14] = 0x43
	return frame
}

func arp() []byte {
	b := packet.WithEthernet(make([]byte, 28), false)
	b[12], b[13] = 0x08, 0x06
	return b
}

func familyFixtures(f Family) []inject.Fixture {
	tcpSvc := f.Service(service.TCP, f.active(0))
	udpSvc := f.Service(service.UDP, f.active(0))
	syn := packet.TCP(f.Client, f.vip(), packet.SYN, nil, packet.Opts{})
	ack := packet.TCP(f.Client, f.vip(), packet.ACK, payload, packet.Opts{})
	name := func(s string) string { return f.Name + "/" + s }
	otherClient := netip.AddrPortFrom(f.Client.Addr(), f.Client.Port()+1)

	fwdUDP := packet.L3(layers.IPProtocolUDP, f.Client, f.backend(0), packet.TCPFlags{}, payload, packet.Opts{})
	vipUDP := packet.L3(layers.IPProtocolUDP, f.Client, f.vip(), packet.TCPFlags{}, payload, packet.Opts{})
	fwdTCP := packet.L3(layers.IPProtocolTCP, f.Client, f.backend(0), packet.ACK, payload, packet.Opts{})
	vipTCP := packet.L3(layers.IPProtocolTCP, f.Client, f.vip(), packet.ACK, payload, packet.Opts{})

	const fragID = 0x5e5e
	vipFrags := packet.Fragment(vipUDP, 32, fragID, false)
	fwdFrags := packet.Fragment(fwdUDP, 32, fragID, false)
	other := netip.AddrPortFrom(f.Other, VIPPort)
	otherFrags := packet.Fragment(packet.L3(layers.IPProtocolUDP, f.Client, other, packet.TCPFlags{}, payload, packet.Opts{}), 32, fragID, false)
	replyFrags := packet.Fragment(packet.L3(layers.IPProtocolUDP, f.backend(0), f.Client, packet.TCPFlags{}, payload, packet.Opts{}), 32, fragID, true)
	vipOtherPort := packet.L3(layers.IPProtocolUDP, f.Client, netip.AddrPortFrom(f.VIP, VIPPort+1), packet.TCPFlags{}, payload, packet.Opts{})

	return []inject.Fixture{
		{
			Name:     name("tcp-syn-to-vip-dnat-to-backend"),
			Setup:    inject.Upsert(tcpSvc),
			Input:    syn,
			Verdict:  inject.OK,
			Output:   packet.TCP(f.Client, f.backend(0), packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("lb_new", 1),
			Check:    checkCT(f, service.TCP, f.backend(0)),
		},
		{
			Name:     name("udp-to-vip-dnat-to-backend"),
			Setup:    inject.Upsert(udpSvc),
			Input:    udp(f.Client, f.vip()),
			Verdict:  inject.OK,
			Output:   udp(f.Client, f.backend(0)),
			Counters: inject.CountersOf("lb_new", 1),
			Check:    checkCT(f, service.UDP, f.backend(0)),
		},
		{
			// Backends added after the SYN must not move the flow.
			Name: name("tcp-established-keeps-backend"),
			Setup: inject.Steps(inject.Upsert(tcpSvc), inject.Send(nil, inject.FromPod, syn),
				inject.Upsert(f.Service(service.TCP, f.active(0), f.active(1), f.active(2)))),
			Input:    ack,
			Verdict:  inject.OK,
			Output:   packet.TCP(f.Client, f.backend(0), packet.ACK, payload, packet.Opts{}),
			Counters: inject.CountersOf("lb_established", 1),
		},
		{
			Name:     name("tcp-reply-source-back-to-vip"),
			Setup:    inject.Steps(inject.Upsert(tcpSvc), inject.Send(nil, inject.FromPod, syn)),
			Hook:     inject.ToPod,
			Input:    packet.TCP(f.backend(0), f.Client, packet.SYNACK, nil, reply()),
			Verdict:  inject.OK,
			Output:   packet.TCP(f.vip(), f.Client, packet.SYNACK, nil, reply()),
			Counters: inject.CountersOf("rev_nat", 1),
			Check: func(t testing.TB, e *inject.Env) {
				entries, err := ct.Dump(e.DP.Maps.CT)
				require.NoError(t, err, "dump conntrack")
				for _, en := range entries {
					if !en.Service {
						assert.Equal(t, []string{"replied"}, en.State, "flow entry saw the reply, still in SYN state")
						assert.Equal(t, uint64(1), en.RevPackets, "reply counted")
					}
				}
			},
		},
		{
			Name:     name("udp-reply-source-back-to-vip"),
			Setup:    inject.Steps(inject.Upsert(udpSvc), inject.Send(nil, inject.FromPod, udp(f.Client, f.vip()))),
			Hook:     inject.ToPod,
			Input:    packet.UDP(f.backend(0), f.Client, payload, reply()),
			Verdict:  inject.OK,
			Output:   packet.UDP(f.vip(), f.Client, payload, reply()),
			Counters: inject.CountersOf("rev_nat", 1),
		},
		{
			Name:     name("not-a-service-passes-untouched"),
			Setup:    inject.Upsert(tcpSvc),
			Input:    packet.TCP(f.Client, netip.AddrPortFrom(f.Other, VIPPort), packet.SYN, nil, packet.Opts{}),
			Verdict:  inject.OK,
			Counters: inject.CountersOf("pass", 1),
		},
		{
			Name:     name("other-port-of-vip-passes-untouched"),
			Setup:    inject.Upsert(tcpSvc),
			Input:    packet.TCP(f.Client, netip.AddrPortFrom(f.VIP, VIPPort+1), packet.SYN, nil, packet.Opts{}),
			Verdict:  inject.OK,
			Counters: inject.CountersOf("pass", 1),
		},
		{
			// Straight to a pod: no flow, so nothing is rewritten.
			Name:     name("direct-reply-without-flow-untouched"),
			Setup:    inject.Upsert(udpSvc),
			Hook:     inject.ToPod,
			Input:    packet.UDP(f.backend(0), f.Client, payload, reply()),
			Verdict:  inject.OK,
			Counters: inject.CountersOf("pass", 1),
		},
		{
			Name:     name("tcp-no-backend-rejected-with-port-unreachable"),
			Setup:    inject.Upsert(f.Service(service.TCP)),
			Input:    syn,
			Verdict:  inject.Redirect,
			Output:   packet.ICMPError(packet.PortUnreachable, f.VIP, f.Client.Addr(), packet.HeaderQuote(syn), reply()),
			Counters: inject.CountersOf("no_backend_reject", 1),
		},
		{
			Name:     name("udp-no-backend-rejected-with-port-unreachable"),
			Setup:    inject.Upsert(f.Service(service.UDP)),
			Input:    udp(f.Client, f.vip()),
			Verdict:  inject.Redirect,
			Output:   packet.ICMPError(packet.PortUnreachable, f.VIP, f.Client.Addr(), packet.HeaderQuote(udp(f.Client, f.vip())), reply()),
			Counters: inject.CountersOf("no_backend_reject", 1),
		},
		{
			Name:     name("no-backend-dropped-when-configured"),
			Config:   func(c *loader.Config) { c.NoBackend = loader.Drop },
			Setup:    inject.Upsert(f.Service(service.TCP)),
			Input:    syn,
			Verdict:  inject.Shot,
			Counters: inject.CountersOf("no_backend_drop", 1),
		},
		{
			// kube-proxy drops, not rejects, when the node has no local
			// endpoint under internalTrafficPolicy Local.
			Name:     name("itp-local-without-local-backends-dropped"),
			Setup:    inject.Upsert(f.internalLocal(service.TCP)),
			Input:    syn,
			Verdict:  inject.Shot,
			Counters: inject.CountersOf("itp_local_drop", 1),
		},
		{
			// A pod reaching an externalTrafficPolicy Local frontend of a
			// node without local backends: the in-cluster entry's backends.
			Name: name("etp-local-frontend-from-a-pod-takes-in-cluster-entry"),
			Setup: inject.Steps(inject.Upsert(f.external(service.TCP, false)),
				inject.Upsert(f.external(service.TCP, true, f.active(0)))),
			Input:    syn,
			Verdict:  inject.OK,
			Output:   packet.TCP(f.Client, f.backend(0), packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("lb_new", 1),
			Check:    checkCT(f, service.TCP, f.backend(0)),
		},
		{
			// Only terminating backends: they take new flows (Kubernetes'
			// fallback to serving terminating endpoints).
			Name:     name("only-terminating-backends-take-new-flows"),
			Setup:    inject.Upsert(f.Service(service.TCP, f.terminating(0))),
			Input:    syn,
			Verdict:  inject.OK,
			Output:   packet.TCP(f.Client, f.backend(0), packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("lb_new", 1),
			Check:    checkCT(f, service.TCP, f.backend(0)),
		},
		{
			Name: name("terminating-backend-keeps-its-flow"),
			Setup: inject.Steps(inject.Upsert(tcpSvc), inject.Send(nil, inject.FromPod, syn),
				inject.Upsert(f.Service(service.TCP, f.terminating(0), f.active(1)))),
			Input:    ack,
			Verdict:  inject.OK,
			Output:   packet.TCP(f.Client, f.backend(0), packet.ACK, payload, packet.Opts{}),
			Counters: inject.CountersOf("lb_established", 1),
		},
		{
			Name: name("new-flow-avoids-terminating-backend"),
			Setup: inject.Steps(inject.Upsert(tcpSvc), inject.Send(nil, inject.FromPod, syn),
				inject.Upsert(f.Service(service.TCP, f.terminating(0), f.active(1)))),
			Input:    packet.TCP(otherClient, f.vip(), packet.SYN, nil, packet.Opts{}),
			Verdict:  inject.OK,
			Output:   packet.TCP(otherClient, f.backend(1), packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("lb_new", 1),
		},
		{
			Name: name("removed-backend-flow-reselected"),
			Setup: inject.Steps(inject.Upsert(tcpSvc), inject.Send(nil, inject.FromPod, syn),
				inject.Upsert(f.Service(service.TCP, f.active(1)))),
			Input:    ack,
			Verdict:  inject.OK,
			Output:   packet.TCP(f.Client, f.backend(1), packet.ACK, payload, packet.Opts{}),
			Counters: inject.CountersOf("backend_gone", 1, "lb_new", 1),
		},
		{
			// The client's port is reused after an RST: a new connection.
			Name: name("syn-after-rst-reopens-flow"),
			Setup: inject.Steps(inject.Upsert(tcpSvc), inject.Send(nil, inject.FromPod, syn),
				inject.Send(nil, inject.FromPod, packet.TCP(f.Client, f.vip(), packet.RSTACK, nil, packet.Opts{}))),
			Input:    syn,
			Verdict:  inject.OK,
			Output:   packet.TCP(f.Client, f.backend(0), packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("ct_reopen", 1, "lb_new", 1),
		},
		{
			// A new socket got the port of an old VIP flow to the same backend.
			Name:     name("direct-flow-reusing-a-translated-tuple-takes-it-over"),
			Setup:    inject.Steps(inject.Upsert(udpSvc), inject.Send(nil, inject.FromPod, udp(f.Client, f.vip()))),
			Input:    udp(f.Client, f.backend(0)),
			Verdict:  inject.OK,
			Counters: inject.CountersOf("pass", 1, "ct_tuple_reused", 1),
			Check: func(t testing.TB, e *inject.Env) {
				entries, err := ct.Dump(e.DP.Maps.CT)
				require.NoError(t, err, "dump conntrack")
				require.Len(t, entries, 1, "only the service entry is left")
				assert.True(t, entries[0].Service, "the flow entry that rewrote replies is gone")
				v, out, err := e.Inject(inject.ToPod, packet.UDP(f.backend(0), f.Client, payload, reply()))
				require.NoError(t, err, "inject the direct flow's reply")
				assert.Equal(t, inject.OK, v, "reply verdict")
				assert.Equal(t, packet.UDP(f.backend(0), f.Client, payload, reply()), out, "the direct reply is not rewritten")
			},
		},
		{
			// A TCP tuple is reused only by a new connection: its SYN.
			Name:     name("direct-syn-reusing-a-translated-tuple-takes-it-over"),
			Setup:    inject.Steps(inject.Upsert(tcpSvc), inject.Send(nil, inject.FromPod, syn)),
			Input:    packet.TCP(f.Client, f.backend(0), packet.SYN, nil, packet.Opts{}),
			Verdict:  inject.OK,
			Counters: inject.CountersOf("pass", 1, "ct_tuple_reused", 1),
		},
		{
			// Any other segment cannot open a connection: the translated
			// flow is left alone, and costs the packet no lookup.
			Name:     name("direct-segment-on-a-translated-tuple-leaves-it"),
			Setup:    inject.Steps(inject.Upsert(tcpSvc), inject.Send(nil, inject.FromPod, syn)),
			Input:    packet.TCP(f.Client, f.backend(0), packet.ACK, payload, packet.Opts{}),
			Verdict:  inject.OK,
			Counters: inject.CountersOf("pass", 1),
			Check: func(t testing.TB, e *inject.Env) {
				entries, err := ct.Dump(e.DP.Maps.CT)
				require.NoError(t, err, "dump conntrack")
				assert.Len(t, entries, 2, "the translated flow keeps both entries")
			},
		},
		{
			Name:     name("icmp-port-unreachable-from-backend-quotes-vip"),
			Setup:    inject.Steps(inject.Upsert(udpSvc), inject.Send(nil, inject.FromPod, udp(f.Client, f.vip()))),
			Hook:     inject.ToPod,
			Input:    packet.ICMPError(packet.PortUnreachable, f.Backends[0], f.Client.Addr(), quote(fwdUDP), reply()),
			Verdict:  inject.OK,
			Output:   packet.ICMPError(packet.PortUnreachable, f.VIP, f.Client.Addr(), quote(vipUDP), reply()),
			Counters: inject.CountersOf("icmp_rev_nat", 1),
		},
		{
			// A router on the path keeps its own source address.
			Name:     name("icmp-frag-needed-from-router-quotes-vip"),
			Setup:    inject.Steps(inject.Upsert(tcpSvc), inject.Send(nil, inject.FromPod, syn)),
			Hook:     inject.ToPod,
			Input:    packet.ICMPError(packet.FragNeeded, f.Router, f.Client.Addr(), quote(fwdTCP), reply()),
			Verdict:  inject.OK,
			Output:   packet.ICMPError(packet.FragNeeded, f.Router, f.Client.Addr(), quote(vipTCP), reply()),
			Counters: inject.CountersOf("icmp_rev_nat", 1),
		},
		{
			// The client refuses a reply from the VIP: the backend hears it
			// about its own reply, from the client, as through kube-proxy.
			Name:     name("icmp-port-unreachable-from-client-about-reply-to-backend"),
			Setup:    inject.Steps(inject.Upsert(udpSvc), inject.Send(nil, inject.FromPod, udp(f.Client, f.vip()))),
			Input:    packet.ICMPError(packet.PortUnreachable, f.Client.Addr(), f.VIP, quote(l3UDP(f.vip(), f.Client)), packet.Opts{}),
			Verdict:  inject.OK,
			Output:   packet.ICMPError(packet.PortUnreachable, f.Client.Addr(), f.Backends[0], quote(l3UDP(f.backend(0), f.Client)), packet.Opts{}),
			Counters: inject.CountersOf("icmp_to_backend", 1),
		},
		{
			Name:     name("icmp-error-for-unknown-flow-untouched"),
			Setup:    inject.Upsert(udpSvc),
			Hook:     inject.ToPod,
			Input:    packet.ICMPError(packet.PortUnreachable, f.Backends[0], f.Client.Addr(), quote(fwdUDP), reply()),
			Verdict:  inject.OK,
			Counters: inject.CountersOf("pass", 1),
		},
		{
			Name:     name("udp-first-fragment-dnat"),
			Setup:    inject.Upsert(udpSvc),
			Input:    vipFrags[0],
			Verdict:  inject.OK,
			Output:   fwdFrags[0],
			Counters: inject.CountersOf("lb_new", 1),
		},
		{
			Name:     name("udp-later-fragment-follows-first"),
			Setup:    inject.Steps(inject.Upsert(udpSvc), inject.Send(nil, inject.FromPod, vipFrags[0])),
			Input:    vipFrags[1],
			Verdict:  inject.OK,
			Output:   fwdFrags[1],
			Counters: inject.CountersOf("lb_established", 1),
		},
		{
			Name:     name("udp-later-fragment-without-first-dropped"),
			Setup:    inject.Upsert(udpSvc),
			Input:    vipFrags[1],
			Verdict:  inject.Shot,
			Counters: inject.CountersOf("frag_not_found", 1),
		},
		{
			// The port is unknown, so any fragment to a frontend's address
			// may be the service's.
			Name:     name("udp-later-fragment-to-vip-other-port-without-first-dropped"),
			Setup:    inject.Upsert(udpSvc),
			Input:    packet.Fragment(vipOtherPort, 32, fragID, false)[1],
			Verdict:  inject.Shot,
			Counters: inject.CountersOf("frag_not_found", 1),
		},
		{
			Name:     name("udp-later-fragment-to-no-service-without-first-passes"),
			Setup:    inject.Upsert(udpSvc),
			Input:    otherFrags[1],
			Verdict:  inject.OK,
			Counters: inject.CountersOf("frag_pass", 1),
		},
		{
			// Out of order: the later fragment passed first, then the first
			// one, untouched too, so the receiver reassembles them.
			Name:     name("udp-first-fragment-to-no-service-after-later-passes"),
			Setup:    inject.Steps(inject.Upsert(udpSvc), inject.Send(nil, inject.FromPod, otherFrags[1])),
			Input:    otherFrags[0],
			Verdict:  inject.OK,
			Counters: inject.CountersOf("pass", 1),
		},
		{
			Name:     name("udp-later-fragment-into-pod-without-first-passes"),
			Setup:    inject.Upsert(udpSvc),
			Hook:     inject.ToPod,
			Input:    replyFrags[1],
			Verdict:  inject.OK,
			Counters: inject.CountersOf("frag_pass", 1),
		},
		{
			Name:     name("udp-later-fragment-after-service-removed-passes"),
			Setup:    inject.Steps(inject.Upsert(udpSvc), func(e *inject.Env) error { return e.Services.Delete(udpSvc.Frontend) }),
			Input:    vipFrags[1],
			Verdict:  inject.OK,
			Counters: inject.CountersOf("frag_pass", 1),
		},
	}
}

// affine is a TCP service with ClientIP session affinity.
func (f Family) affine(backends ...service.Backend) service.Service {
	s := f.Service(service.TCP, backends...)
	s.Affinity = 60 * time.Second
	return s
}

// ageAffinity dates every affinity entry to the clock's first nanosecond:
// past any 1 s timeout on a machine up for more than a second.
func ageAffinity(e *inject.Env) error {
	var k maps.AffinityKey
	var v maps.AffinityValue
	entries := map[maps.AffinityKey]maps.AffinityValue{}
	it := e.DP.Maps.Affinity.Iterate()
	for it.Next(&k, &v) {
		entries[k] = v
	}
	if err := it.Err(); err != nil {
		return err
	}
	if len(entries) == 0 {
		return fmt.Errorf("no affinity entry to age")
	}
	for k, v := range entries {
		v.LastUsed = 1
		if err := e.DP.Maps.Affinity.Update(k, v, ebpf.UpdateExist); err != nil {
			return err
		}
	}
	return nil
}

// The first connection pins the client to backend 0 while it is the only
// one; later connections from the same client IP (other source ports)
// must stay there once more backends join, until the entry expires.
func affinityFixtures(f Family) []inject.Fixture {
	name := func(s string) string { return f.Name + "/" + s }
	all := f.affine(f.active(0), f.active(1), f.active(2))
	first := packet.TCP(f.Client, f.vip(), packet.SYN, nil, packet.Opts{})
	second := netip.AddrPortFrom(f.Client.Addr(), f.Client.Port()+7)
	shortAffinity := f.affine(f.active(0))
	shortAffinity.Affinity = time.Second
	return []inject.Fixture{
		{
			Name:     name("affinity-keeps-client-on-its-backend"),
			Setup:    inject.Steps(inject.Upsert(f.affine(f.active(0))), inject.Send(nil, inject.FromPod, first), inject.Upsert(all)),
			Input:    packet.TCP(second, f.vip(), packet.SYN, nil, packet.Opts{}),
			Verdict:  inject.OK,
			Output:   packet.TCP(second, f.backend(0), packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("lb_new", 1, "affinity_hit", 1),
		},
		{
			// Expired, though its backend is alive: chosen afresh, no hit.
			Name:     name("affinity-expired-chooses-afresh"),
			Setup:    inject.Steps(inject.Upsert(shortAffinity), inject.Send(nil, inject.FromPod, first), ageAffinity),
			Input:    packet.TCP(second, f.vip(), packet.SYN, nil, packet.Opts{}),
			Verdict:  inject.OK,
			Output:   packet.TCP(second, f.backend(0), packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("lb_new", 1),
		},
		{
			// A terminating backend takes no new connections, affinity or not.
			Name: name("affinity-never-picks-terminating-backend"),
			Setup: inject.Steps(inject.Upsert(f.affine(f.active(0))), inject.Send(nil, inject.FromPod, first),
				inject.Upsert(f.affine(f.terminating(0), f.active(1)))),
			Input:    packet.TCP(second, f.vip(), packet.SYN, nil, packet.Opts{}),
			Verdict:  inject.OK,
			Output:   packet.TCP(second, f.backend(1), packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("lb_new", 1),
		},
		{
			Name:     name("no-affinity-no-entry"),
			Setup:    inject.Upsert(f.Service(service.TCP, f.active(0))),
			Input:    first,
			Verdict:  inject.OK,
			Output:   packet.TCP(f.Client, f.backend(0), packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("lb_new", 1),
			Check: func(t testing.TB, e *inject.Env) {
				var k maps.AffinityKey
				var v maps.AffinityValue
				assert.False(t, e.DP.Maps.Affinity.Iterate().Next(&k, &v), "a service without affinity leaves no entry")
			},
		},
	}
}
