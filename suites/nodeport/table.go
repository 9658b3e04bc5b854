package nodeport

import (
	"net"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/packet"
)

// Fixtures is the north-south table for both families, entering by tc.
func (b *Bed) Fixtures() []inject.Fixture {
	return b.table(ingress{hook: inject.FromNetdev, bed: b}, nil)
}

// XDPFixtures is the same table entering by XDP, ahead of tc: where XDP
// ends a packet as tc would, only the verdict differs; where it hands the
// packet to tc, the row expects the hand-over.
func (b *Bed) XDPFixtures(t testing.TB) []inject.Fixture {
	via := ingress{hook: inject.XDPFromNetdev, xdp: true, bed: b, handover: map[uint32][]byte{0: make([]byte, 8)}}
	actions := []uint32{loader.HandoverDeliver, loader.HandoverRoute}
	for _, f := range b.Families() {
		for _, d := range []service.Dispatch{service.Option, service.IPIP} {
			actions = append(actions, loader.HandoverTooBig|uint32(f.dsrFit(d))<<8)
		}
	}
	for _, a := range actions {
		meta, err := loader.HandoverMeta(a)
		require.NoError(t, err, "hand-over word of this netns")
		via.handover[a] = meta
	}
	return b.table(via, func(c *loader.Config) { c.XDP = true })
}

func (b *Bed) table(via ingress, cfg func(*loader.Config)) []inject.Fixture {
	var out []inject.Fixture
	for _, f := range b.Families() {
		out = append(out, b.familyFixtures(f, via)...)
	}
	for i := range out {
		rowCfg := out[i].Config
		if rowCfg == nil {
			rowCfg = stackRouting
		}
		out[i].Config = func(c *loader.Config) {
			rowCfg(c)
			if cfg != nil {
				cfg(c)
			}
		}
	}
	return out
}

// ingress is the program north-south packets enter a node by: tc's
// from-netdev, or XDP's ahead of it. Rows are written once; the ingress
// says how each outcome looks at its program.
type ingress struct {
	hook inject.Hook
	xdp  bool
	bed  *Bed
	// handover is the metadata XDP leaves by hand-over action (0: none).
	handover map[uint32][]byte
}

// outcome is what a row expects of the program its packet enters.
type outcome struct {
	verdict  inject.Verdict
	output   []byte
	meta     []byte
	counters map[string]uint64
}

func (via ingress) row(f inject.Fixture, o outcome) inject.Fixture {
	f.Hook = via.hook
	f.Verdict, f.Output, f.Meta, f.Counters = o.verdict, o.output, o.meta, o.counters
	return f
}

// hop is where a translated packet leaves for: the next hop's MAC, and
// the MAC of the device it leaves by, when that is not the one it came in
// on (nil: back out the wire).
type hop struct{ dst, dev net.HardwareAddr }

// sent: translated and sent off the node. tc leaves the MACs to
// bpf_redirect_neigh; XDP writes the FIB's and sends the frame itself.
func (via ingress) sent(to hop, out []byte, counters map[string]uint64) outcome {
	if !via.xdp {
		return outcome{inject.Redirect, out, nil, plus(counters, "redirect_neigh", 1)}
	}
	if to.dev == nil {
		return outcome{inject.XDPTX, withMACs(out, to.dst, via.bed.NodeMAC), via.handover[0], plus(counters, "xdp_tx", 1)}
	}
	return outcome{inject.XDPRedirect, withMACs(out, to.dst, to.dev), via.handover[0], plus(counters, "xdp_redirect", 1)}
}

// unresolved: translated for a next hop whose neighbour is unknown. XDP
// has no bpf_redirect_neigh: it hands the packet to tc to send.
func (via ingress) unresolved(out []byte, counters map[string]uint64) outcome {
	if !via.xdp {
		return outcome{inject.Redirect, out, nil, plus(counters, "redirect_neigh", 1)}
	}
	return outcome{inject.XDPPass, out, via.handover[loader.HandoverRoute], plus(counters, "xdp_to_tc", 1)}
}

// local: translated for this node, delivered by the stack. XDP hands it
// to tc, which delivers it.
func (via ingress) local(out []byte, counters map[string]uint64) outcome {
	if !via.xdp {
		return outcome{inject.OK, out, nil, counters}
	}
	return outcome{inject.XDPPass, out, via.handover[loader.HandoverDeliver], plus(counters, "xdp_to_tc", 1)}
}

// intoPod: translated for this node with BPF host routing: tc sends the
// frame, rewritten for the pod (peerOut), straight in with
// bpf_redirect_peer; XDP, which cannot, hands out to tc to do that.
func (via ingress) intoPod(out, peerOut []byte, counters map[string]uint64) outcome {
	if !via.xdp {
		return outcome{inject.Redirect, peerOut, nil, plus(counters, "redirect_peer", 1)}
	}
	return via.local(out, counters)
}

// passed: not for north-south, untouched. XDP leaves the reason to tc,
// which sees the packet next, and counts the hand-over alone.
func (via ingress) passed(counters map[string]uint64) outcome {
	if !via.xdp {
		return outcome{inject.OK, nil, nil, counters}
	}
	return outcome{inject.XDPPass, nil, via.handover[0], inject.CountersOf("xdp_to_tc", 1)}
}

// rejected: a service without backends answers with port unreachable.
// The reply grows the packet, for which XDP may have no room: it passes
// the packet, untranslated, to tc to answer.
func (via ingress) rejected(reply []byte, counters map[string]uint64) outcome {
	if !via.xdp {
		return outcome{inject.Redirect, reply, nil, counters}
	}
	return via.passed(counters)
}

// overMTU: a frame longer than the device's MTU, which only GRO makes
// (generic XDP runs after it) and whose checksums are then partial: XDP
// leaves it to tc, where o is what happens.
func (via ingress) overMTU(o outcome) outcome {
	if !via.xdp {
		return o
	}
	return via.passed(o.counters)
}

// icmpError: an ICMP error about a SNATed flow, translated for the client
// or the backend and sent to it by tc. XDP passes ICMP on to tc untouched.
func (via ingress) icmpError(to hop, out []byte, counters map[string]uint64) outcome {
	if via.xdp {
		return via.passed(counters)
	}
	return via.sent(to, out, counters)
}

// icmpErrorLocal: an ICMP error translated by tc for a backend on this
// node, delivered by the stack, or with BPF host routing (peerOut not nil)
// straight into its pod. XDP passes ICMP on to tc untouched.
func (via ingress) icmpErrorLocal(out, peerOut []byte, counters map[string]uint64) outcome {
	if via.xdp {
		return via.passed(counters)
	}
	if peerOut != nil {
		return via.intoPod(out, peerOut, counters)
	}
	return via.local(out, counters)
}

// tooBig: a DSR packet its overhead would take past the route's MTU, of
// which fit bytes are left: tc answers the client with reply, frag needed
// or packet too big. XDP hands the packet, DNATed (dnat), to tc for that.
func (via ingress) tooBig(reply, dnat []byte, fit uint16, counters map[string]uint64) outcome {
	if !via.xdp {
		return outcome{inject.Redirect, reply, nil, plus(counters, "dsr_frag_needed", 1)}
	}
	return outcome{inject.XDPPass, dnat, via.handover[loader.HandoverTooBig|uint32(fit)<<8], plus(counters, "xdp_to_tc", 1)}
}

// expiringIntoPod: for a local pod with BPF host routing, but its TTL /
// hop limit would run out: tc gives out to the stack, whose ip_forward
// answers with time exceeded. XDP hands it to tc, which does that.
func (via ingress) expiringIntoPod(out []byte, counters map[string]uint64) outcome {
	if !via.xdp {
		return outcome{inject.OK, out, nil, plus(counters, "ttl_exceeded", 1)}
	}
	return via.local(out, counters)
}

// icmpErrorDropped: an ICMP error translated by tc and dropped there.
// XDP passes ICMP on to tc untouched.
func (via ingress) icmpErrorDropped(out []byte, counters map[string]uint64) outcome {
	if via.xdp {
		return via.passed(counters)
	}
	return via.dropped(out, counters)
}

func (via ingress) dropped(out []byte, counters map[string]uint64) outcome {
	if !via.xdp {
		return outcome{inject.Shot, out, nil, counters}
	}
	return outcome{inject.XDPDrop, out, nil, counters}
}

// plus is counters with more; nil (counters not checked) stays nil.
func plus(counters map[string]uint64, kv ...any) map[string]uint64 {
	if counters == nil {
		return nil
	}
	out := inject.CountersOf(kv...)
	for k, v := range counters {
		out[k] += v
	}
	return out
}

func withMACs(frame []byte, dst, src net.HardwareAddr) []byte {
	out := append([]byte(nil), frame...)
	copy(out[0:6], dst)
	copy(out[6:12], src)
	return out
}

func (b *Bed) familyFixtures(f Family, via ingress) []inject.Fixture {
	dev := b.wire()
	node := b.node(dev)
	name := func(s string) string { return f.Name + "/" + s }
	local, remote := f.at(f.Local), f.at(f.Remote)
	in := packet.Opts{}
	out := packet.Opts{FromHost: true} // the frame as redirect_peer leaves it for the pod
	// What BPF forwards has had its TTL / hop limit decremented; what it
	// hands to the stack or XDP to tc has not.
	fwd, outFwd := in.Forwarded(), out.Forwarded()
	lastHop := packet.Opts{Hops: 63} // TTL / hop limit 1: no router may forward it
	df := packet.Opts{DF: true}
	syn := tcp(f.Client, f.nodePort(), packet.SYN, in)
	otherClient := netip.AddrPortFrom(f.Client.Addr().Next(), ClientPort)
	// SNAT keeps the client's port when it lies in the range and is free.
	keepPorts := natPorts(ClientPort, ClientPort+1)
	snatted := f.snat(ClientPort)
	onePort := natPorts(ClientPort, ClientPort)
	otherSyn := tcp(otherClient, f.nodePort(), packet.SYN, in)
	// Half the sequence space away from what the fixtures' flows use.
	blindSeq := packet.Opts{Seq: 1000 + 1<<31}
	toPeer, toClient := hop{dst: b.PeerMAC}, hop{dst: b.ClientMAC}
	counters := inject.CountersOf
	// Two segments' worth, as GRO hands a merged frame to the stack (and
	// within what BPF_PROG_TEST_RUN takes: a page less head and tail room).
	merged := make([]byte, 2*1448)
	gro := &inject.Device{Do: dev.Do, Ifindex: dev.Ifindex, GSOSize: 1448}
	// Earlier packets of a row's flow enter as its packet does.
	first := func(pkt []byte) func(e *inject.Env) error { return inject.Send(dev, via.hook, pkt) }
	// A TCP flow to the remote backend, these packets into it.
	snatFlow := func(pkts ...[]byte) func(e *inject.Env) error {
		steps := []func(e *inject.Env) error{node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote}))}
		for _, p := range pkts {
			steps = append(steps, first(p))
		}
		return inject.Steps(steps...)
	}
	// An on-path router's address: any that is not the backend's.
	router := f.Unroutable
	l3 := func(frame []byte) []byte { return frame[14:] }

	return []inject.Fixture{via.row(inject.Fixture{
		Name:  name("nodeport-local-backend-dnat-to-stack"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Local}))),
		On:    dev,
		Input: syn,
		Check: checkFlow(f.Client, local, f.nodePort()),
	}, via.local(tcp(f.Client, local, packet.SYN, in), counters("lb_new", 1, "np_local", 1))), via.row(inject.Fixture{
		Name:  name("gro-merged-frame-over-the-mtu"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Local}))),
		On:    dev,
		Input: packet.TCP(f.Client, f.nodePort(), packet.ACK, merged, in),
	}, via.overMTU(via.local(packet.TCP(f.Client, local, packet.ACK, merged, in), counters("lb_new", 1, "np_local", 1)))), via.row(inject.Fixture{
		Name:   name("nodeport-local-backend-redirect-peer-with-bpf-routing"),
		Config: bpfRouting,
		Setup:  inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Local}))),
		On:     dev,
		Input:  syn,
	}, via.intoPod(tcp(f.Client, local, packet.SYN, in), tcp(f.Client, local, packet.SYN, outFwd), counters("lb_new", 1, "np_local", 1))), via.row(inject.Fixture{
		Name:   name("local-backend-ttl-expiring-up-the-stack-with-bpf-routing"),
		Config: bpfRouting,
		Setup:  inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Local}))),
		On:     dev,
		Input:  tcp(f.Client, f.nodePort(), packet.SYN, lastHop),
	}, via.expiringIntoPod(tcp(f.Client, local, packet.SYN, lastHop), counters("lb_new", 1, "np_local", 1))), {
		Name: name("local-backend-reply-leaves-from-nodeport"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Local})),
			first(syn)),
		On:       dev,
		Hook:     inject.ToNetdev,
		Input:    tcp(local, f.Client, packet.SYNACK, in),
		Verdict:  inject.OK,
		Output:   tcp(f.nodePort(), f.Client, packet.SYNACK, in),
		Counters: counters("rev_nat", 1),
	}, via.row(inject.Fixture{
		Name:   name("remote-backend-snat-keeps-client-port"),
		Config: keepPorts,
		Setup:  inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote}))),
		On:     dev,
		Input:  syn,
		Check:  checkFlow(f.Client, remote, f.nodePort(), "ns-snat"),
	}, via.sent(toPeer, tcp(snatted, remote, packet.SYN, fwd), counters("lb_new", 1, "np_snat", 1, "nat_retry_0", 1))), via.row(inject.Fixture{
		// Only DNATed, so the stack forwards it as its own: its ip_forward
		// answers with time exceeded, whose quote the egress program
		// translates (backend-node-...-quotes-the-service rows).
		Name:   name("remote-backend-ttl-expiring-up-the-stack-before-snat"),
		Config: keepPorts,
		Setup:  inject.Steps(node, inject.Upsert(f.nodePortSvc(service.UDP, []netip.Addr{f.Remote}))),
		On:     dev,
		Input:  udp(f.Client, f.nodePort(), lastHop),
	}, via.local(udp(f.Client, remote, lastHop), counters("lb_new", 1, "ttl_exceeded", 1))), via.row(inject.Fixture{
		Name:  name("dsr-ttl-expiring-up-the-stack-without-the-option"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote}, dsr(service.Option)))),
		On:    dev,
		Input: tcp(f.Client, f.nodePort(), packet.SYN, lastHop),
	}, via.local(tcp(f.Client, remote, packet.SYN, lastHop), counters("lb_new", 1, "ttl_exceeded", 1))), via.row(inject.Fixture{
		Name:   name("remote-backend-udp-snat"),
		Config: keepPorts,
		Setup:  inject.Steps(node, inject.Upsert(f.nodePortSvc(service.UDP, []netip.Addr{f.Remote}))),
		On:     dev,
		Input:  udp(f.Client, f.nodePort(), in),
	}, via.sent(toPeer, udp(snatted, remote, fwd), counters("lb_new", 1, "np_snat", 1, "nat_retry_0", 1))), via.row(inject.Fixture{
		Name:   name("snat-established-keeps-its-port"),
		Config: keepPorts,
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote})),
			first(syn)),
		On:    dev,
		Input: tcp(f.Client, f.nodePort(), packet.ACK, in),
	}, via.sent(toPeer, tcp(snatted, remote, packet.ACK, fwd), counters("lb_established", 1, "np_snat", 1))), via.row(inject.Fixture{
		// GRO's merged frame is a GSO packet: routed whole to another
		// node, where the egress device segments it, not dropped for
		// its length.
		Name:   name("gro-merged-frame-to-remote-backend-snat-and-redirect"),
		Config: keepPorts,
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote})),
			first(syn)),
		On:    gro,
		Input: packet.TCP(f.Client, f.nodePort(), packet.ACK, merged, in),
	}, via.overMTU(via.sent(toPeer, packet.TCP(snatted, remote, packet.ACK, merged, fwd), counters("lb_established", 1, "np_snat", 1)))), via.row(inject.Fixture{
		Name:   name("snat-reply-back-to-client-from-nodeport"),
		Config: keepPorts,
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote})),
			first(syn)),
		On:    dev,
		Input: tcp(remote, snatted, packet.SYNACK, in),
	}, via.sent(toClient, tcp(f.nodePort(), f.Client, packet.SYNACK, fwd), counters("np_rev_snat", 1, "rev_nat", 1))), via.row(inject.Fixture{
		// Translated back, its source is this node's: no stack forwards it.
		Name:   name("snat-reply-ttl-expiring-dropped"),
		Config: keepPorts,
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote})),
			first(syn)),
		On:    dev,
		Input: tcp(remote, snatted, packet.SYNACK, lastHop),
	}, via.dropped(tcp(remote, f.Client, packet.SYNACK, lastHop), counters("np_rev_snat", 1, "ttl_exceeded", 1))), via.row(inject.Fixture{
		// The backend itself refuses: the client hears it from the service.
		Name:   name("snat-port-unreachable-from-backend-back-to-client"),
		Config: keepPorts,
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.UDP, []netip.Addr{f.Remote})),
			first(udp(f.Client, f.nodePort(), in))),
		On:    dev,
		Input: packet.ICMPError(packet.PortUnreachable, f.Remote, f.Node, packet.HeaderQuote(udp(snatted, remote, in)), in),
	}, via.icmpError(toClient, packet.ICMPError(packet.PortUnreachable, f.Node, f.Client.Addr(), packet.HeaderQuote(udp(f.Client, f.nodePort(), in)), fwd),
		counters("np_icmp_rev_snat", 1))), via.row(inject.Fixture{
		// A router's error keeps its source; the whole packet is quoted, so
		// the quoted TCP checksum is rewritten too.
		Name:   name("snat-frag-needed-from-router-back-to-client"),
		Config: keepPorts,
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote})),
			first(syn)),
		On:    dev,
		Input: packet.ICMPError(packet.FragNeeded, router, f.Node, l3(tcp(snatted, remote, packet.SYN, in)), in),
	}, via.icmpError(toClient, packet.ICMPError(packet.FragNeeded, router, f.Client.Addr(), l3(syn), fwd),
		counters("np_icmp_rev_snat", 1))), via.row(inject.Fixture{
		// About a reply on its way to the client: the backend hears it about
		// its own reply to this node.
		Name:   name("snat-frag-needed-about-reply-on-to-backend"),
		Config: keepPorts,
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote})),
			first(syn)),
		On:    dev,
		Input: packet.ICMPError(packet.FragNeeded, router, f.Node, l3(tcp(f.nodePort(), f.Client, packet.SYNACK, in)), in),
	}, via.icmpError(toPeer, packet.ICMPError(packet.FragNeeded, router, f.Remote, l3(tcp(remote, snatted, packet.SYNACK, in)), fwd),
		counters("np_icmp_snat", 1))), via.row(inject.Fixture{
		// ip_forward sends no error about an error: an expiring one is
		// dropped.
		Name:   name("snat-icmp-error-ttl-expiring-dropped"),
		Config: keepPorts,
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote})),
			first(syn)),
		On:    dev,
		Input: packet.ICMPError(packet.FragNeeded, router, f.Node, l3(tcp(f.nodePort(), f.Client, packet.SYNACK, in)), lastHop),
	}, via.icmpErrorDropped(packet.ICMPError(packet.FragNeeded, router, f.Remote, l3(tcp(remote, snatted, packet.SYNACK, in)), lastHop),
		counters("np_icmp_snat", 1, "ttl_exceeded", 1))), via.row(inject.Fixture{
		// A local backend's flow is only DNATed: the client's refusal of
		// the reply reaches the backend about its own reply, from the client.
		Name: name("local-backend-port-unreachable-from-client-on-to-backend"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.UDP, []netip.Addr{f.Local})),
			first(udp(f.Client, f.nodePort(), in))),
		On:    dev,
		Input: packet.ICMPError(packet.PortUnreachable, f.Client.Addr(), f.Node, packet.HeaderQuote(udp(f.nodePort(), f.Client, in)), in),
	}, via.icmpErrorLocal(packet.ICMPError(packet.PortUnreachable, f.Client.Addr(), f.Local, packet.HeaderQuote(udp(local, f.Client, in)), in), nil,
		counters("icmp_to_backend", 1))), via.row(inject.Fixture{
		Name:   name("local-backend-frag-needed-about-reply-into-pod-with-bpf-routing"),
		Config: bpfRouting,
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Local})),
			first(syn)),
		On:    dev,
		Input: packet.ICMPError(packet.FragNeeded, router, f.Node, l3(tcp(f.nodePort(), f.Client, packet.SYNACK, in)), in),
	}, via.icmpErrorLocal(packet.ICMPError(packet.FragNeeded, router, f.Local, l3(tcp(local, f.Client, packet.SYNACK, in)), in),
		packet.ICMPError(packet.FragNeeded, router, f.Local, l3(tcp(local, f.Client, packet.SYNACK, in)), outFwd),
		counters("icmp_to_backend", 1))), via.row(inject.Fixture{
		// externalTrafficPolicy Local keeps the client's address: only DNAT.
		Name: name("etp-local-frag-needed-about-reply-on-to-backend"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Local}, f.loadBalancer(), externalLocal)),
			first(tcp(f.Client, f.lb(), packet.SYN, in))),
		On:    dev,
		Input: packet.ICMPError(packet.FragNeeded, router, f.LBVIP, l3(tcp(f.lb(), f.Client, packet.SYNACK, in)), in),
	}, via.icmpErrorLocal(packet.ICMPError(packet.FragNeeded, router, f.Local, l3(tcp(local, f.Client, packet.SYNACK, in)), in), nil,
		counters("icmp_to_backend", 1))), via.row(inject.Fixture{
		// The backend's node answered the client from the service, so
		// errors about its replies come here: on to the backend, unwrapped.
		Name: name("dsr-frag-needed-about-reply-on-to-backend"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote}, dsr(service.Option))),
			first(syn)),
		On:    dev,
		Input: packet.ICMPError(packet.FragNeeded, router, f.Node, l3(tcp(f.nodePort(), f.Client, packet.SYNACK, in)), in),
	}, via.icmpError(toPeer, packet.ICMPError(packet.FragNeeded, router, f.Remote, l3(tcp(remote, f.Client, packet.SYNACK, in)), fwd),
		counters("icmp_to_backend", 1))), via.row(inject.Fixture{
		Name: name("dsr-ipip-port-unreachable-from-client-on-to-backend"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.UDP, []netip.Addr{f.Remote}, dsr(service.IPIP))),
			first(udp(f.Client, f.nodePort(), in))),
		On:    dev,
		Input: packet.ICMPError(packet.PortUnreachable, f.Client.Addr(), f.Node, packet.HeaderQuote(udp(f.nodePort(), f.Client, in)), in),
	}, via.icmpError(toPeer, packet.ICMPError(packet.PortUnreachable, f.Client.Addr(), f.Remote, packet.HeaderQuote(udp(remote, f.Client, in)), fwd),
		counters("icmp_to_backend", 1))), {
		// The backend's node: the backend refuses a DSR datagram, quoting it
		// with the option; the client hears it from the service, about its
		// own datagram to the service.
		Name:     name("backend-node-dsr-port-unreachable-from-backend-quotes-the-service"),
		Setup:    inject.Steps(node, first(udp(f.Client, local, packet.Opts{DSR: f.lb()}))),
		On:       dev,
		Hook:     inject.ToNetdev,
		Input:    packet.ICMPError(packet.PortUnreachable, f.Local, f.Client.Addr(), l3(udp(f.Client, local, packet.Opts{DSR: f.lb()})), in),
		Verdict:  inject.OK,
		Output:   packet.ICMPError(packet.PortUnreachable, f.LBVIP, f.Client.Addr(), l3(udp(f.Client, f.lb(), packet.Opts{DSR: f.lb()})), in),
		Counters: counters("icmp_rev_nat", 1),
	}, {
		Name:     name("etp-local-port-unreachable-from-backend-quotes-the-service"),
		Setup:    inject.Steps(node, inject.Upsert(f.nodePortSvc(service.UDP, []netip.Addr{f.Local}, f.loadBalancer(), externalLocal)), first(udp(f.Client, f.lb(), in))),
		On:       dev,
		Hook:     inject.ToNetdev,
		Input:    packet.ICMPError(packet.PortUnreachable, f.Local, f.Client.Addr(), packet.HeaderQuote(udp(f.Client, local, in)), in),
		Verdict:  inject.OK,
		Output:   packet.ICMPError(packet.PortUnreachable, f.LBVIP, f.Client.Addr(), packet.HeaderQuote(udp(f.Client, f.lb(), in)), in),
		Counters: counters("icmp_rev_nat", 1),
	}, via.row(inject.Fixture{
		Name:   name("icmp-error-about-an-unknown-flow-passes"),
		Config: keepPorts,
		Setup:  inject.Steps(node, inject.Upsert(f.nodePortSvc(service.UDP, []netip.Addr{f.Remote}))),
		On:     dev,
		Input:  packet.ICMPError(packet.PortUnreachable, f.Remote, f.Node, packet.HeaderQuote(udp(snatted, remote, in)), in),
	}, via.passed(counters("pass", 1))), via.row(inject.Fixture{
		// The client's port is taken by another client's flow to the same
		// backend: the next free port, after one or two retries.
		Name:   name("snat-port-collision-takes-another-port"),
		Config: keepPorts,
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote})),
			first(tcp(otherClient, f.nodePort(), packet.SYN, in))),
		On:    dev,
		Input: syn,
		Check: func(t testing.TB, e *inject.Env) {
			c, err := e.Counters()
			require.NoError(t, err)
			assert.Equal(t, uint64(1), c["nat_retry_1"]+c["nat_retry_2_3"], "the second port was found after 1 or 2 retries")
		},
	}, via.sent(toPeer, tcp(f.snat(ClientPort+1), remote, packet.SYN, fwd), nil)), via.row(inject.Fixture{
		Name:   name("snat-ports-exhausted-drop"),
		Config: natPorts(ClientPort, ClientPort),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote})),
			first(tcp(otherClient, f.nodePort(), packet.SYN, in))),
		On:    dev,
		Input: syn,
	}, via.dropped(tcp(f.Client, remote, packet.SYN, fwd), counters("lb_new", 1, "nat_exhausted", 1))), via.row(inject.Fixture{
		// With one port, the next client gets it only if the closed flow
		// gave it back: its last ACK after both FINs does.
		Name:   name("snat-port-freed-by-the-last-ack-after-both-fins"),
		Config: onePort,
		Setup:  snatFlow(otherSyn, tcp(remote, snatted, packet.SYNACK, in), tcp(otherClient, f.nodePort(), packet.FINACK, in), tcp(remote, snatted, packet.FINACK, in), tcp(otherClient, f.nodePort(), packet.ACK, in)),
		On:     dev,
		Input:  syn,
	}, via.sent(toPeer, tcp(snatted, remote, packet.SYN, fwd), counters("lb_new", 1, "np_snat", 1, "nat_retry_0", 1))), via.row(inject.Fixture{
		Name:   name("snat-port-freed-by-the-backends-last-ack"),
		Config: onePort,
		Setup:  snatFlow(otherSyn, tcp(remote, snatted, packet.SYNACK, in), tcp(remote, snatted, packet.FINACK, in), tcp(otherClient, f.nodePort(), packet.FINACK, in), tcp(remote, snatted, packet.ACK, in)),
		On:     dev,
		Input:  syn,
	}, via.sent(toPeer, tcp(snatted, remote, packet.SYN, fwd), counters("lb_new", 1, "np_snat", 1, "nat_retry_0", 1))), via.row(inject.Fixture{
		Name:   name("snat-port-freed-by-an-rst"),
		Config: onePort,
		Setup:  snatFlow(otherSyn, tcp(otherClient, f.nodePort(), packet.RSTACK, in)),
		On:     dev,
		Input:  syn,
	}, via.sent(toPeer, tcp(snatted, remote, packet.SYN, fwd), counters("lb_new", 1, "np_snat", 1, "nat_retry_0", 1))), via.row(inject.Fixture{
		// Both FINs seen, the mapping stays for the last ACK, which goes
		// out on it and then frees it.
		Name:   name("snat-last-ack-translated-then-its-mapping-freed"),
		Config: keepPorts,
		Setup:  snatFlow(syn, tcp(remote, snatted, packet.SYNACK, in), tcp(f.Client, f.nodePort(), packet.FINACK, in), tcp(remote, snatted, packet.FINACK, in)),
		On:     dev,
		Input:  tcp(f.Client, f.nodePort(), packet.ACK, in),
		Check:  natEntriesAre(0),
	}, via.sent(toPeer, tcp(snatted, remote, packet.ACK, fwd), counters("lb_established", 1, "np_snat", 1, "nat_released", 1))), via.row(inject.Fixture{
		Name:   name("snat-backends-rst-back-to-client-then-its-mapping-freed"),
		Config: keepPorts,
		Setup:  snatFlow(syn, tcp(remote, snatted, packet.SYNACK, in)),
		On:     dev,
		Input:  tcp(remote, snatted, packet.RSTACK, in),
		Check:  natEntriesAre(0),
	}, via.sent(toClient, tcp(f.nodePort(), f.Client, packet.RSTACK, fwd), counters("np_rev_snat", 1, "rev_nat", 1, "nat_released", 1))), via.row(inject.Fixture{
		// An RST far from the sequence numbers the client was seen to use
		// (blind, or stale) goes on to the backend, which judges it itself,
		// and closes nothing here.
		Name:   name("out-of-window-rst-keeps-the-flow-and-its-port"),
		Config: keepPorts,
		Setup:  snatFlow(syn, tcp(remote, snatted, packet.SYNACK, in)),
		On:     dev,
		Input:  tcp(f.Client, f.nodePort(), packet.RSTACK, blindSeq),
		Check:  stillOpen(f.Client, remote),
	}, via.sent(toPeer, tcp(snatted, remote, packet.RSTACK, blindSeq.Forwarded()), counters("lb_established", 1, "np_snat", 1, "ct_rst_out_of_window", 1))), via.row(inject.Fixture{
		Name:   name("out-of-window-rst-from-backend-keeps-the-flow-and-its-port"),
		Config: keepPorts,
		Setup:  snatFlow(syn, tcp(remote, snatted, packet.SYNACK, in)),
		On:     dev,
		Input:  tcp(remote, snatted, packet.RSTACK, blindSeq),
		Check:  stillOpen(f.Client, remote),
	}, via.sent(toClient, tcp(f.nodePort(), f.Client, packet.RSTACK, blindSeq.Forwarded()), counters("np_rev_snat", 1, "rev_nat", 1, "ct_rst_out_of_window", 1))), via.row(inject.Fixture{
		// The flow's reply half was evicted and another client took its
		// port: the flow moves to a free port rather than share it.
		Name:   name("snat-out-mapping-without-its-reply-half-gets-a-new-port"),
		Config: keepPorts,
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote})),
			first(syn), evictReplyHalf(remote, snatted), first(otherSyn)),
		On:    dev,
		Input: tcp(f.Client, f.nodePort(), packet.ACK, in),
	}, via.sent(toPeer, tcp(f.snat(ClientPort+1), remote, packet.ACK, fwd), nil)), via.row(inject.Fixture{
		Name:   name("snat-to-an-unresolved-next-hop"),
		Config: keepPorts,
		Setup:  inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Unresolved}))),
		On:     dev,
		Input:  syn,
	}, via.unresolved(tcp(snatted, f.at(f.Unresolved), packet.SYN, fwd), counters("lb_new", 1, "np_snat", 1, "nat_retry_0", 1))), via.row(inject.Fixture{
		Name:   name("snat-out-another-node-device"),
		Config: keepPorts,
		Setup:  inject.Steps(node, b.sideNetdev, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Side}))),
		On:     dev,
		Input:  syn,
	}, via.sent(hop{sideMAC, b.SideMAC}, tcp(netip.AddrPortFrom(f.SideNode, ClientPort), f.at(f.Side), packet.SYN, fwd),
		counters("lb_new", 1, "np_snat", 1, "nat_retry_0", 1))), via.row(inject.Fixture{
		Name:  name("no-route-to-backend-drop"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Unroutable}))),
		On:    dev,
		Input: syn,
	}, via.dropped(tcp(f.Client, f.at(f.Unroutable), packet.SYN, in), counters("lb_new", 1, "fib_failed", 1))), via.row(inject.Fixture{
		Name:  name("no-backend-rejected-with-port-unreachable"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, nil))),
		On:    dev,
		Input: syn,
	}, via.rejected(packet.ICMPError(packet.PortUnreachable, f.Node, f.Client.Addr(), packet.HeaderQuote(syn), out),
		counters("no_backend_reject", 1))), via.row(inject.Fixture{
		Name:  name("dsr-option-carries-the-service"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote}, dsr(service.Option)))),
		On:    dev,
		Input: syn,
		Check: checkFlow(f.Client, remote, f.nodePort(), "ns-dsr"),
	}, via.sent(toPeer, tcp(f.Client, remote, packet.SYN, packet.Opts{DSR: f.nodePort(), Hops: 1}), counters("lb_new", 1, "dsr_opt", 1))), via.row(inject.Fixture{
		// A full-size segment: with the option it would not fit the wire.
		// The client hears what fits from the service, about its own
		// segment to the service (the quote's destination, checksums).
		Name:      name("dsr-option-full-size-segment-gets-frag-needed"),
		MinKernel: fibMTUKernel, Needs: fibMTUNeeds,
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote}, dsr(service.Option)))),
		On:    dev,
		Input: f.fullSize(f.nodePort(), 0, df),
	}, via.tooBig(packet.ICMPError(packet.FragNeeded, f.Node, f.Client.Addr(), packet.HeaderQuote(f.fullSize(f.nodePort(), 0, df)), packet.Opts{FromHost: true, MTU: f.dsrFit(service.Option)}),
		f.fullSize(remote, 0, df), f.dsrFit(service.Option), counters("lb_new", 1))), via.row(inject.Fixture{
		Name:  name("dsr-option-fills-the-mtu-exactly"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote}, dsr(service.Option)))),
		On:    dev,
		Input: f.fullSize(f.nodePort(), wireMTU-int(f.dsrFit(service.Option)), df),
	}, via.sent(toPeer, f.fullSize(remote, wireMTU-int(f.dsrFit(service.Option)), packet.Opts{DF: true, Hops: 1, DSR: f.nodePort()}),
		counters("lb_new", 1, "dsr_opt", 1))), via.row(inject.Fixture{
		// Without DF too: BPF cannot fragment it, and the sender fragments
		// what it sends next to the MTU it hears of.
		Name:      name("dsr-ipip-full-size-datagram-without-df-gets-frag-needed-too"),
		MinKernel: fibMTUKernel, Needs: fibMTUNeeds,
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.UDP, []netip.Addr{f.Remote}, dsr(service.IPIP)))),
		On:    dev,
		Input: f.fullSizeUDP(f.nodePort()),
	}, via.tooBig(packet.ICMPError(packet.FragNeeded, f.Node, f.Client.Addr(), packet.HeaderQuote(f.fullSizeUDP(f.nodePort())), packet.Opts{FromHost: true, MTU: f.dsrFit(service.IPIP)}),
		f.fullSizeUDP(remote), f.dsrFit(service.IPIP), counters("lb_new", 1))), via.row(inject.Fixture{
		Name:  name("dsr-ipip-tunnels-to-the-backend"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote}, dsr(service.IPIP)))),
		On:    dev,
		Input: syn,
		Check: checkFlow(f.Client, remote, f.nodePort(), "ns-dsr", "ns-dsr-ipip"),
	}, via.sent(toPeer, packet.WithEthernet(packet.Tunnel(f.nodePort(), f.Remote, packet.L3(6, f.Client, remote, packet.SYN, payload, fwd)), false),
		counters("lb_new", 1, "dsr_ipip", 1))), via.row(inject.Fixture{
		// A BIG TCP packet's length field reads 0 and stays 0 with the
		// option. (Such packets are GSO, which BPF_PROG_TEST_RUN cannot
		// grow: it sets no GSO type. The length field is what is tested.)
		Name:  name("dsr-option-big-tcp-packet-length-field-kept-zero"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote}, dsr(service.Option))), first(syn)),
		On:    dev,
		Input: packet.BigTCP(tcp(f.Client, f.nodePort(), packet.ACK, in)),
	}, via.sent(toPeer, packet.BigTCP(tcp(f.Client, remote, packet.ACK, packet.Opts{DSR: f.nodePort(), Hops: 1})),
		counters("lb_established", 1, "dsr_opt", 1))), via.row(inject.Fixture{
		// So do both of the tunnelled packet's.
		Name:  name("dsr-ipip-big-tcp-packet-length-fields-kept-zero"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote}, dsr(service.IPIP))), first(syn)),
		On:    dev,
		Input: packet.BigTCP(tcp(f.Client, f.nodePort(), packet.ACK, in)),
	}, via.sent(toPeer, packet.BigTCP(packet.WithEthernet(packet.Tunnel(f.nodePort(), f.Remote, packet.BigTCP(tcp(f.Client, remote, packet.ACK, fwd))[14:]), false)),
		counters("lb_established", 1, "dsr_ipip", 1))), via.row(inject.Fixture{
		Name:   name("hybrid-snats-udp"),
		Config: keepPorts,
		Setup:  inject.Steps(node, inject.Upsert(f.nodePortSvc(service.UDP, []netip.Addr{f.Remote}, hybrid))),
		On:     dev,
		Input:  udp(f.Client, f.nodePort(), in),
	}, via.sent(toPeer, udp(snatted, remote, fwd), counters("lb_new", 1, "np_snat", 1, "nat_retry_0", 1))), via.row(inject.Fixture{
		Name:  name("hybrid-dsr-for-tcp"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote}, hybrid))),
		On:    dev,
		Input: syn,
	}, via.sent(toPeer, tcp(f.Client, remote, packet.SYN, packet.Opts{DSR: f.nodePort(), Hops: 1}), counters("lb_new", 1, "dsr_opt", 1))), via.row(inject.Fixture{
		// This node as the backend's: the option tells it the service.
		Name:  name("backend-node-learns-dsr-option"),
		Setup: node,
		On:    dev,
		Input: tcp(f.Client, local, packet.SYN, packet.Opts{DSR: f.lb()}),
		Check: checkFlow(f.Client, local, f.lb(), "ns-dsr", "ns-learned"),
	}, via.local(nil, counters("dsr_learned", 1, "np_local", 1))), via.row(inject.Fixture{
		Name:   name("backend-node-dsr-ttl-expiring-up-the-stack-with-bpf-routing"),
		Config: bpfRouting,
		Setup:  node,
		On:     dev,
		Input:  tcp(f.Client, local, packet.SYN, packet.Opts{DSR: f.lb(), Hops: 63}),
	}, via.expiringIntoPod(nil, counters("dsr_learned", 1, "np_local", 1))), via.row(inject.Fixture{
		Name:  name("backend-node-decapsulates-ipip"),
		Setup: node,
		On:    dev,
		Input: packet.WithEthernet(packet.Tunnel(f.lb(), f.Local, packet.L3(6, f.Client, local, packet.SYN, payload, in)), false),
		Check: checkFlow(f.Client, local, f.lb(), "ns-dsr", "ns-dsr-ipip", "ns-learned"),
	}, via.local(tcp(f.Client, local, packet.SYN, in), counters("dsr_learned", 1, "np_local", 1))), {
		Name:     name("backend-node-answers-dsr-from-the-service"),
		Setup:    inject.Steps(node, first(tcp(f.Client, local, packet.SYN, packet.Opts{DSR: f.lb()}))),
		On:       dev,
		Hook:     inject.ToNetdev,
		Input:    tcp(local, f.Client, packet.SYNACK, in),
		Verdict:  inject.OK,
		Output:   tcp(f.lb(), f.Client, packet.SYNACK, in),
		Counters: counters("rev_nat", 1),
	}, via.row(inject.Fixture{
		// A hostNetwork backend on this node: up the stack to the host's
		// socket, which the FIB would not forward to.
		Name:  name("host-network-backend-up-the-stack"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Node}))),
		On:    dev,
		Input: syn,
		Check: checkFlow(f.Client, f.at(f.Node), f.nodePort()),
	}, via.local(tcp(f.Client, f.at(f.Node), packet.SYN, in), counters("lb_new", 1, "np_host", 1))), {
		Name:     name("host-network-backend-answers-from-the-service"),
		Setup:    inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Node})), first(syn)),
		On:       dev,
		Hook:     inject.ToNetdev,
		Input:    tcp(f.at(f.Node), f.Client, packet.SYNACK, in),
		Verdict:  inject.OK,
		Output:   tcp(f.nodePort(), f.Client, packet.SYNACK, in),
		Counters: counters("rev_nat", 1),
	}, via.row(inject.Fixture{
		Name: name("host-network-backend-port-unreachable-from-client-up-the-stack"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.UDP, []netip.Addr{f.Node})),
			first(udp(f.Client, f.nodePort(), in))),
		On:    dev,
		Input: packet.ICMPError(packet.PortUnreachable, f.Client.Addr(), f.Node, packet.HeaderQuote(udp(f.nodePort(), f.Client, in)), in),
	}, via.icmpErrorLocal(packet.ICMPError(packet.PortUnreachable, f.Client.Addr(), f.Node, packet.HeaderQuote(udp(f.at(f.Node), f.Client, in)), in), nil,
		counters("icmp_to_backend", 1))), via.row(inject.Fixture{
		// The in-cluster entry is for this node's pods and the host: what
		// comes in from outside keeps to this node's backends.
		Name: name("etp-local-ignores-in-cluster-entry"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, nil, externalLocal)),
			inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote}, inCluster))),
		On:    dev,
		Input: syn,
	}, via.dropped(nil, counters("etp_local_drop", 1))), via.row(inject.Fixture{
		Name:  name("etp-local-without-local-backends-drop"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, nil, externalLocal))),
		On:    dev,
		Input: syn,
	}, via.dropped(nil, counters("etp_local_drop", 1))), via.row(inject.Fixture{
		Name:  name("etp-local-keeps-client-source"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Local}, externalLocal))),
		On:    dev,
		Input: syn,
	}, via.local(tcp(f.Client, local, packet.SYN, in), counters("lb_new", 1, "np_local", 1))), via.row(inject.Fixture{
		Name:  name("source-range-allows-listed-client"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Local}, f.loadBalancer(f.AllowedClients)))),
		On:    dev,
		Input: tcp(f.Client, f.lb(), packet.SYN, in),
	}, via.local(tcp(f.Client, local, packet.SYN, in), counters("lb_new", 1, "np_local", 1))), via.row(inject.Fixture{
		Name:  name("source-range-denies-other-client"),
		Setup: inject.Steps(node, inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Local}, f.loadBalancer(f.AllowedClients)))),
		On:    dev,
		Input: tcp(otherClient, f.lb(), packet.SYN, in),
	}, via.dropped(nil, counters("source_range_denied", 1))), via.row(inject.Fixture{
		Name:  name("direct-traffic-to-a-pod-passes"),
		Setup: node,
		On:    dev,
		Input: tcp(f.Client, local, packet.SYN, in),
	}, via.passed(counters("pass", 1)))}
}
