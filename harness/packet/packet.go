// Package packet builds test packets with gopacket, verifies their
// checksums independently of gopacket, and explains differences.
package packet

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// MACs of the two ends of a pod's veth in fixtures.
var (
	PodMAC  = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x01}
	HostMAC = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x02}
)

// TCPFlags selects TCP header flags.
type TCPFlags struct{ SYN, ACK, FIN, RST, PSH bool }

var (
	SYN    = TCPFlags{SYN: true}
	SYNACK = TCPFlags{SYN: true, ACK: true}
	ACK    = TCPFlags{ACK: true}
	FINACK = TCPFlags{FIN: true, ACK: true}
	RSTACK = TCPFlags{RST: true, ACK: true}
)

// Opts are header details fixtures sometimes set.
type Opts struct {
	// ZeroUDPChecksum sends IPv4 UDP without a checksum.
	ZeroUDPChecksum bool
	// IPID is the IPv4 identification.
	IPID uint16
	// FromHost reverses the Ethernet direction (host side to pod).
	FromHost bool
	// DSR carries a service address in the DSR IPv4 option or IPv6
	// destination option (bpf/lib/dsr.h) when valid.
	DSR netip.AddrPort
	// MTU is the next-hop MTU a FragNeeded error announces (0: 1400).
	MTU uint16
	// Seq is the TCP sequence number (0: 1000).
	Seq uint32
	// Hops is how many routers forwarded the packet: its TTL / hop limit
	// is 64 less that.
	Hops uint8
	// DF sets IPv4's don't fragment.
	DF bool
}

// Forwarded is o one hop further.
func (o Opts) Forwarded() Opts {
	o.Hops++
	return o
}

// DSR option types (bpf/lib/dsr.h).
const (
	DSROptionV4 = 0x9a
	DSROptionV6 = 0x1b
)

// dsrOption6 is the 24-byte destination options header carrying the
// service: next header, length, the option, and two Pad1 bytes.
func dsrOption6(next layers.IPProtocol, svc netip.AddrPort) []byte {
	b := []byte{byte(next), 2, DSROptionV6, 18}
	b = append(b, svc.Addr().AsSlice()...)
	return binary.BigEndian.AppendUint16(b, svc.Port())
}

// ethHeader is written by hand: gopacket's Ethernet layer pads a frame
// serialized on its own to the 60-byte minimum.
func ethHeader(v6, fromHost bool) []byte {
	src, dst := PodMAC, HostMAC
	if fromHost {
		src, dst = HostMAC, PodMAC
	}
	typ := uint16(layers.EthernetTypeIPv4)
	if v6 {
		typ = uint16(layers.EthernetTypeIPv6)
	}
	h := append(append(append([]byte(nil), dst...), src...), 0, 0)
	binary.BigEndian.PutUint16(h[12:], typ)
	return h
}

// IP returns an IPv4 or IPv6 layer for src -> dst.
func IP(src, dst netip.Addr, proto layers.IPProtocol, o Opts) gopacket.SerializableLayer {
	ttl := 64 - o.Hops
	if src.Unmap().Is4() {
		ip := &layers.IPv4{Version: 4, IHL: 5, TTL: ttl, Id: o.IPID, Protocol: proto,
			SrcIP: src.Unmap().AsSlice(), DstIP: dst.Unmap().AsSlice()}
		if o.DF {
			ip.Flags = layers.IPv4DontFragment
		}
		return ip
	}
	return &layers.IPv6{Version: 6, HopLimit: ttl, NextHeader: proto, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
}

func serialize(ls ...gopacket.SerializableLayer) []byte {
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...); err != nil {
		panic(fmt.Sprintf("serialize test packet: %v", err))
	}
	return buf.Bytes()
}

func withChecksumNet(l4 interface {
	SetNetworkLayerForChecksum(gopacket.NetworkLayer) error
}, ip gopacket.SerializableLayer) {
	if err := l4.SetNetworkLayerForChecksum(ip.(gopacket.NetworkLayer)); err != nil {
		panic(err)
	}
}

func tcpLayer(src, dst netip.AddrPort, f TCPFlags, seq uint32) *layers.TCP {
	if seq == 0 {
		seq = 1000
	}
	return &layers.TCP{SrcPort: layers.TCPPort(src.Port()), DstPort: layers.TCPPort(dst.Port()),
		Seq: seq, Ack: map[bool]uint32{true: 2000}[f.ACK], DataOffset: 5, Window: 64240,
		SYN: f.SYN, ACK: f.ACK, FIN: f.FIN, RST: f.RST, PSH: f.PSH}
}

// L3 builds an IP packet (no Ethernet) carrying TCP or UDP, for quoting
// inside ICMP errors and for fragmenting.
func L3(proto layers.IPProtocol, src, dst netip.AddrPort, f TCPFlags, payload []byte, o Opts) []byte {
	ip := IP(src.Addr(), dst.Addr(), proto, o)
	var ext []gopacket.SerializableLayer
	if o.DSR.IsValid() {
		if v4, ok := ip.(*layers.IPv4); ok {
			data := binary.BigEndian.AppendUint16(nil, o.DSR.Port())
			v4.Options = []layers.IPv4Option{{OptionType: DSROptionV4, OptionLength: 8, OptionData: append(data, o.DSR.Addr().Unmap().AsSlice()...)}}
		} else {
			ip.(*layers.IPv6).NextHeader = layers.IPProtocolIPv6Destination
			ext = append(ext, gopacket.Payload(append(dsrOption6(proto, o.DSR), 0, 0)))
		}
	}
	var l4 gopacket.SerializableLayer
	switch proto {
	case layers.IPProtocolTCP:
		t := tcpLayer(src, dst, f, o.Seq)
		withChecksumNet(t, ip)
		l4 = t
	case layers.IPProtocolUDP:
		u := &layers.UDP{SrcPort: layers.UDPPort(src.Port()), DstPort: layers.UDPPort(dst.Port())}
		withChecksumNet(u, ip)
		l4 = u
	default:
		panic("L3: TCP or UDP only")
	}
	b := serialize(append(append([]gopacket.SerializableLayer{ip}, ext...), l4, gopacket.Payload(payload))...)
	if proto == layers.IPProtocolUDP && o.ZeroUDPChecksum && src.Addr().Unmap().Is4() {
		b[20+6], b[20+7] = 0, 0
	}
	return b
}

// Tunnel wraps an IP packet in IPIP or IPv6-in-IPv6 as DSR dispatches it
// (bpf/lib/dsr.h): the outer source is the service address, DF, TTL 64,
// the service port in the IPv4 ID or the IPv6 flow label, the inner
// packet's traffic class.
func Tunnel(svc netip.AddrPort, dst netip.Addr, inner []byte) []byte {
	if svc.Addr().Unmap().Is4() {
		return serialize(&layers.IPv4{Version: 4, IHL: 5, TOS: inner[1], Id: svc.Port(), Flags: layers.IPv4DontFragment,
			TTL: 64, Protocol: layers.IPProtocolIPv4, SrcIP: svc.Addr().Unmap().AsSlice(), DstIP: dst.Unmap().AsSlice()},
			gopacket.Payload(inner))
	}
	tc := uint8(binary.BigEndian.Uint32(inner) >> 20)
	return serialize(&layers.IPv6{Version: 6, TrafficClass: tc, FlowLabel: uint32(svc.Port()), NextHeader: layers.IPProtocolIPv6,
		HopLimit: 64, SrcIP: svc.Addr().AsSlice(), DstIP: dst.AsSlice()}, gopacket.Payload(inner))
}

// WithEthernet prefixes an IP packet with the fixture Ethernet header.
func WithEthernet(l3 []byte, fromHost bool) []byte {
	v6 := l3[0]>>4 == 6
	return append(ethHeader(v6, fromHost), l3...)
}

// TCP builds an Ethernet frame with a TCP segment.
func TCP(src, dst netip.AddrPort, f TCPFlags, payload []byte, o Opts) []byte {
	return WithEthernet(L3(layers.IPProtocolTCP, src, dst, f, payload, o), o.FromHost)
}

// UDP builds an Ethernet frame with a UDP datagram.
func UDP(src, dst netip.AddrPort, payload []byte, o Opts) []byte {
	return WithEthernet(L3(layers.IPProtocolUDP, src, dst, TCPFlags{}, payload, o), o.FromHost)
}

// ICMP kinds fixtures send.
type ICMPKind int

const (
	PortUnreachable ICMPKind = iota
	FragNeeded               // IPv4 fragmentation needed / ICMPv6 packet too big
	TimeExceeded             // TTL / hop limit exceeded in transit
)

func (o Opts) mtu() uint16 {
	if o.MTU == 0 {
		return 1400
	}
	return o.MTU
}

// ICMPError builds an ICMP (IPv4) or ICMPv6 error from src to dst quoting
// the IP packet quote (which the caller may truncate).
func ICMPError(kind ICMPKind, src, dst netip.Addr, quote []byte, o Opts) []byte {
	if src.Unmap().Is4() {
		ip := IP(src, dst, layers.IPProtocolICMPv4, o)
		ic := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeDestinationUnreachable, layers.ICMPv4CodePort)}
		if kind == FragNeeded {
			ic.TypeCode = layers.CreateICMPv4TypeCode(layers.ICMPv4TypeDestinationUnreachable, layers.ICMPv4CodeFragmentationNeeded)
			ic.Seq = o.mtu() // next-hop MTU sits in the low 16 bits of the rest
		}
		if kind == TimeExceeded {
			ic.TypeCode = layers.CreateICMPv4TypeCode(layers.ICMPv4TypeTimeExceeded, layers.ICMPv4CodeTTLExceeded)
		}
		return append(ethHeader(false, o.FromHost), serialize(ip, ic, gopacket.Payload(quote))...)
	}
	ip := IP(src, dst, layers.IPProtocolICMPv6, o)
	ic := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeDestinationUnreachable, layers.ICMPv6CodePortUnreachable)}
	rest := make([]byte, 4)
	if kind == FragNeeded {
		ic.TypeCode = layers.CreateICMPv6TypeCode(layers.ICMPv6TypePacketTooBig, 0)
		binary.BigEndian.PutUint32(rest, uint32(o.mtu()))
	}
	if kind == TimeExceeded {
		ic.TypeCode = layers.CreateICMPv6TypeCode(layers.ICMPv6TypeTimeExceeded, layers.ICMPv6CodeHopLimitExceeded)
	}
	withChecksumNet(ic, ip)
	return append(ethHeader(true, o.FromHost), serialize(ip, ic, gopacket.Payload(append(rest, quote...)))...)
}

// Fragment splits an IP packet (no Ethernet) into Ethernet frames, the
// first carrying firstPayload bytes of the IP payload (a multiple of 8).
func Fragment(l3 []byte, firstPayload int, id uint32, fromHost bool) [][]byte {
	if firstPayload%8 != 0 {
		panic("fragment size must be a multiple of 8")
	}
	if l3[0]>>4 == 4 {
		hl := int(l3[0]&0x0f) * 4
		payload := l3[hl:]
		var out [][]byte
		for off := 0; off < len(payload); off += firstPayload {
			end := min(off+firstPayload, len(payload))
			h := append([]byte(nil), l3[:hl]...)
			binary.BigEndian.PutUint16(h[2:], uint16(hl+end-off))
			binary.BigEndian.PutUint16(h[4:], uint16(id))
			fo := uint16(off / 8)
			if end < len(payload) {
				fo |= 0x2000
			}
			binary.BigEndian.PutUint16(h[6:], fo)
			h[10], h[11] = 0, 0
			binary.BigEndian.PutUint16(h[10:], checksum(h, 0))
			out = append(out, WithEthernet(append(h, payload[off:end]...), fromHost))
		}
		return out
	}
	nh := l3[6]
	payload := l3[40:]
	var out [][]byte
	for off := 0; off < len(payload); off += firstPayload {
		end := min(off+firstPayload, len(payload))
		h := append([]byte(nil), l3[:40]...)
		h[6] = 44
		binary.BigEndian.PutUint16(h[4:], uint16(8+end-off))
		fh := make([]byte, 8)
		fh[0] = nh
		fo := uint16(off/8) << 3
		if end < len(payload) {
			fo |= 1
		}
		binary.BigEndian.PutUint16(fh[2:], fo)
		binary.BigEndian.PutUint32(fh[4:], id)
		frame := append(append(h, fh...), payload[off:end]...)
		out = append(out, WithEthernet(frame, fromHost))
	}
	return out
}

// Describe renders a frame layer by layer, for failure messages.
func Describe(b []byte) string {
	p := gopacket.NewPacket(b, layers.LayerTypeEthernet, gopacket.Default)
	var sb strings.Builder
	for _, l := range p.Layers() {
		fmt.Fprintf(&sb, "%s\n", gopacket.LayerString(l))
	}
	if el := p.ErrorLayer(); el != nil {
		fmt.Fprintf(&sb, "decode error: %v\n", el.Error())
	}
	return sb.String()
}

// Diff explains how got differs from want: the first differing offset and
// both frames decoded. Empty when equal.
func Diff(want, got []byte) string {
	if string(want) == string(got) {
		return ""
	}
	off := 0
	for off < len(want) && off < len(got) && want[off] == got[off] {
		off++
	}
	return fmt.Sprintf("first difference at byte %d (want len %d, got len %d)\n--- want\n%s--- got\n%s",
		off, len(want), len(got), Describe(want), Describe(got))
}

// HeaderQuote is what an ICMP error quotes of frame: its IP header and the
// 8 bytes after it (no IPv4 options, no IPv6 extension headers).
func HeaderQuote(frame []byte) []byte {
	l3 := frame[14:]
	if l3[0]>>4 == 4 {
		return l3[:20+8]
	}
	return l3[:40+8]
}

// BigTCP gives frame's IP packet the length field of a BIG TCP packet,
// which the kernel sets to 0 once a GSO packet's length no longer fits it
// (IPv4 tot_len, IPv6 payload_len without a jumbo option): the packet's
// length is then the skb's. The IPv4 header checksum is fixed to match.
func BigTCP(frame []byte) []byte {
	out := append([]byte(nil), frame...)
	l3 := out[14:]
	if l3[0]>>4 == 6 {
		binary.BigEndian.PutUint16(l3[4:], 0)
		return out
	}
	binary.BigEndian.PutUint16(l3[2:], 0)
	binary.BigEndian.PutUint16(l3[10:], 0)
	hl := int(l3[0]&0x0f) * 4
	binary.BigEndian.PutUint16(l3[10:], checksum(l3[:hl], 0))
	return out
}
