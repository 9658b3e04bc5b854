package clusterip

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/ct"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/packet"
)

// hairpinAddr is the family's default hairpin address (bpf/lib/config.h).
func (f Family) hairpinAddr() netip.Addr {
	if f.VIP.Is4() {
		return loader.DefaultHairpinIPv4
	}
	return loader.DefaultHairpinIPv6
}

// hairpinFixtures: backend 0 is also the client, sending from its own
// address to the VIP. Both directions go back into the pod (redirected,
// MACs swapped): the flow from the hairpin address to the pod's backend
// port, the reply from the VIP to the pod's client port, each one hop on
// as the stack's forwarding would have it. Its CT entries are keyed like
// any flow's, the client being the backend.
func hairpinFixtures(f Family) []inject.Fixture {
	name := func(s string) string { return f.Name + "/hairpin-" + s }
	pod := netip.AddrPortFrom(f.Backends[0], f.Client.Port())
	hairpin := netip.AddrPortFrom(f.hairpinAddr(), pod.Port())
	tcpSvc := f.Service(service.TCP, f.active(0))
	udpSvc := f.Service(service.UDP, f.active(0))
	syn := packet.TCP(pod, f.vip(), packet.SYN, nil, packet.Opts{})
	synack := packet.TCP(f.backend(0), hairpin, packet.SYNACK, nil, packet.Opts{})
	dgram := packet.UDP(pod, f.vip(), payload, packet.Opts{})
	back := packet.Opts{FromHost: true, Hops: 1}
	lastHop := packet.Opts{Hops: 63} // TTL / hop limit 1: no router may forward it
	udpLastHop := packet.UDP(pod, f.vip(), payload, lastHop)
	// The pod as the backend refusing its own datagram.
	portUnreachable := func(o packet.Opts) []byte {
		return packet.ICMPError(packet.PortUnreachable, f.Backends[0], hairpin.Addr(), quote(l3UDP(hairpin, f.backend(0))), o)
	}

	custom := func(c *loader.Config) {
		c.HairpinIPv4 = netip.MustParseAddr("169.254.7.7")
		c.HairpinIPv6 = netip.MustParseAddr("100::7")
	}
	customAddr := netip.MustParseAddr("169.254.7.7")
	if f.VIP.Is6() {
		customAddr = netip.MustParseAddr("100::7")
	}

	return []inject.Fixture{
		{
			Name:     name("tcp-syn-snat-to-hairpin-address"),
			Setup:    inject.Upsert(tcpSvc),
			Input:    syn,
			Verdict:  inject.Redirect,
			Output:   packet.TCP(hairpin, f.backend(0), packet.SYN, nil, back),
			Counters: inject.CountersOf("lb_new", 1, "hairpin", 1),
			Check:    checkClientCT(f, service.TCP, pod, f.backend(0)),
		},
		{
			Name:     name("tcp-reply-back-from-vip"),
			Setup:    inject.Steps(inject.Upsert(tcpSvc), inject.Send(nil, inject.FromPod, syn)),
			Input:    synack,
			Verdict:  inject.Redirect,
			Output:   packet.TCP(f.vip(), pod, packet.SYNACK, nil, back),
			Counters: inject.CountersOf("rev_nat", 1, "hairpin", 1),
			Check: func(t testing.TB, e *inject.Env) {
				entries, err := ct.Dump(e.DP.Maps.CT)
				require.NoError(t, err, "dump conntrack")
				require.Len(t, entries, 2, "the reply creates no entry")
				for _, en := range entries {
					if !en.Service {
						assert.Equal(t, []string{"replied"}, en.State, "flow entry saw the reply, still in SYN state")
						assert.Equal(t, uint64(1), en.RevPackets, "reply counted")
					}
				}
			},
		},
		{
			Name: name("tcp-established-stays-hairpinned"),
			Setup: inject.Steps(inject.Upsert(tcpSvc), inject.Send(nil, inject.FromPod, syn),
				inject.Send(nil, inject.FromPod, synack)),
			Input:    packet.TCP(pod, f.vip(), packet.ACK, payload, packet.Opts{}),
			Verdict:  inject.Redirect,
			Output:   packet.TCP(hairpin, f.backend(0), packet.ACK, payload, back),
			Counters: inject.CountersOf("lb_established", 1, "hairpin", 1),
		},
		{
			Name:     name("udp-snat-to-hairpin-address"),
			Setup:    inject.Upsert(udpSvc),
			Input:    dgram,
			Verdict:  inject.Redirect,
			Output:   packet.UDP(hairpin, f.backend(0), payload, back),
			Counters: inject.CountersOf("lb_new", 1, "hairpin", 1),
			Check:    checkClientCT(f, service.UDP, pod, f.backend(0)),
		},
		{
			Name:     name("udp-reply-back-from-vip"),
			Setup:    inject.Steps(inject.Upsert(udpSvc), inject.Send(nil, inject.FromPod, dgram)),
			Input:    packet.UDP(f.backend(0), hairpin, payload, packet.Opts{}),
			Verdict:  inject.Redirect,
			Output:   packet.UDP(f.vip(), pod, payload, back),
			Counters: inject.CountersOf("rev_nat", 1, "hairpin", 1),
		},
		{
			// The pod as the backend refuses its own datagram: it hears it as
			// the client, about its datagram to the VIP, from the VIP.
			Name:     name("port-unreachable-from-the-backend-back-from-vip"),
			Setup:    inject.Steps(inject.Upsert(udpSvc), inject.Send(nil, inject.FromPod, dgram)),
			Input:    portUnreachable(packet.Opts{}),
			Verdict:  inject.Redirect,
			Output:   packet.ICMPError(packet.PortUnreachable, f.VIP, f.Backends[0], quote(l3UDP(pod, f.vip())), back),
			Counters: inject.CountersOf("icmp_rev_nat", 1, "hairpin", 1),
		},
		{
			// The pod as the client refuses the VIP's reply: it hears it as
			// the backend, about its reply to the hairpin address, from there.
			Name:     name("port-unreachable-from-the-client-back-to-backend"),
			Setup:    inject.Steps(inject.Upsert(udpSvc), inject.Send(nil, inject.FromPod, dgram)),
			Input:    packet.ICMPError(packet.PortUnreachable, f.Backends[0], f.VIP, quote(l3UDP(f.vip(), pod)), packet.Opts{}),
			Verdict:  inject.Redirect,
			Output:   packet.ICMPError(packet.PortUnreachable, hairpin.Addr(), f.Backends[0], quote(l3UDP(f.backend(0), hairpin)), back),
			Counters: inject.CountersOf("icmp_to_backend", 1, "hairpin", 1),
		},
		{
			// The packet that would leave with TTL / hop limit 0 goes on,
			// DNATed only, to the stack's forwarding (or host routing's):
			// its time exceeded reaches the pod by lb_reply (traceroute).
			Name:     name("expiring-syn-to-the-stack-dnated"),
			Setup:    inject.Upsert(tcpSvc),
			Input:    packet.TCP(pod, f.vip(), packet.SYN, nil, lastHop),
			Verdict:  inject.OK,
			Output:   packet.TCP(pod, f.backend(0), packet.SYN, nil, lastHop),
			Counters: inject.CountersOf("lb_new", 1),
			Check:    checkClientCT(f, service.TCP, pod, f.backend(0)),
		},
		{
			// The stack's time exceeded about that packet, on its way into
			// the pod: about its datagram to the service.
			Name:     name("stack-time-exceeded-about-the-pod-to-itself"),
			Hook:     inject.ToPod,
			Setup:    inject.Steps(inject.Upsert(udpSvc), inject.Send(nil, inject.FromPod, udpLastHop)),
			Input:    packet.ICMPError(packet.TimeExceeded, f.Router, f.Backends[0], quote(l3UDP(pod, f.backend(0))), reply()),
			Verdict:  inject.OK,
			Output:   packet.ICMPError(packet.TimeExceeded, f.Router, f.Backends[0], quote(l3UDP(pod, f.vip())), reply()),
			Counters: inject.CountersOf("icmp_rev_nat", 1),
		},
		{
			// Untouched: the stack tells the pod about its reply to the
			// hairpin address, as the backend sent it.
			Name:     name("expiring-reply-to-the-stack-untouched"),
			Setup:    inject.Steps(inject.Upsert(tcpSvc), inject.Send(nil, inject.FromPod, syn)),
			Input:    packet.TCP(f.backend(0), hairpin, packet.SYNACK, nil, lastHop),
			Verdict:  inject.OK,
			Counters: inject.CountersOf("ttl_exceeded", 1),
		},
		{
			// An error is never answered with another: the stack drops it.
			Name:     name("expiring-port-unreachable-to-the-stack"),
			Setup:    inject.Steps(inject.Upsert(udpSvc), inject.Send(nil, inject.FromPod, dgram)),
			Input:    packet.ICMPError(packet.PortUnreachable, f.Backends[0], hairpin.Addr(), quote(l3UDP(hairpin, f.backend(0))), lastHop),
			Verdict:  inject.OK,
			Output:   packet.ICMPError(packet.PortUnreachable, f.VIP, f.Backends[0], quote(l3UDP(pod, f.vip())), lastHop),
			Counters: inject.CountersOf("icmp_rev_nat", 1, "ttl_exceeded", 1),
		},
		{
			// Another client of the same service is translated as ever.
			Name:     name("other-client-not-hairpinned"),
			Setup:    inject.Upsert(tcpSvc),
			Input:    packet.TCP(f.Client, f.vip(), packet.SYN, nil, packet.Opts{}),
			Verdict:  inject.OK,
			Output:   packet.TCP(f.Client, f.backend(0), packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("lb_new", 1),
		},
		{
			Name:     name("address-without-flow-passes"),
			Setup:    inject.Upsert(udpSvc),
			Input:    packet.UDP(f.backend(0), hairpin, payload, packet.Opts{}),
			Verdict:  inject.OK,
			Counters: inject.CountersOf("pass", 1),
		},
		{
			Name:     name("address-set-by-loader"),
			Config:   custom,
			Setup:    inject.Upsert(udpSvc),
			Input:    dgram,
			Verdict:  inject.Redirect,
			Output:   packet.UDP(netip.AddrPortFrom(customAddr, pod.Port()), f.backend(0), payload, back),
			Counters: inject.CountersOf("lb_new", 1, "hairpin", 1),
		},
	}
}
