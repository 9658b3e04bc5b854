package packet

import (
	"encoding/binary"
	"fmt"

	"github.com/gopacket/gopacket/layers"
)

// Checksums are recomputed here from the bytes, not with gopacket, so a
// fixture's expected packet and the verification cannot share a bug.

func sum16(b []byte, acc uint32) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		acc += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		acc += uint32(b[len(b)-1]) << 8
	}
	return acc
}

func fold(acc uint32) uint16 {
	for acc > 0xffff {
		acc = (acc & 0xffff) + (acc >> 16)
	}
	return ^uint16(acc)
}

func checksum(b []byte, acc uint32) uint16 { return fold(sum16(b, acc)) }

func pseudo(l3 []byte, proto uint8, length int) uint32 {
	if l3[0]>>4 == 4 {
		acc := sum16(l3[12:20], 0)
		return acc + uint32(proto) + uint32(length)
	}
	acc := sum16(l3[8:40], 0)
	return acc + uint32(length) + uint32(proto)
}

// VerifyChecksums checks the IPv4 header checksum and the TCP, UDP, ICMP
// or ICMPv6 checksum of an Ethernet frame, and inside ICMP errors the
// quoted IPv4 header's checksum. Fragments: only the L3 checksum, plus the
// L4 checksum when the frame is a complete datagram.
func VerifyChecksums(frame []byte) error {
	if len(frame) < 14 {
		return fmt.Errorf("frame of %d bytes", len(frame))
	}
	switch layers.EthernetType(binary.BigEndian.Uint16(frame[12:])) {
	case layers.EthernetTypeIPv4, layers.EthernetTypeIPv6:
	default:
		return nil // nothing of ours to verify
	}
	return verifyL3(frame[14:])
}

// verifyL3 checks an IP packet; tunnelled ones inside out.
func verifyL3(l3 []byte) error {
	var proto uint8
	var l4 []byte
	fragmented := false
	switch l3[0] >> 4 {
	case 4:
		hl := int(l3[0]&0x0f) * 4
		if c := checksum(l3[:hl], 0); c != 0 {
			return fmt.Errorf("IPv4 header checksum %#04x does not verify", binary.BigEndian.Uint16(l3[10:]))
		}
		fragmented = binary.BigEndian.Uint16(l3[6:])&0x3fff != 0
		proto = l3[9]
		end := ipEnd(l3, 2, 0)
		if end < hl || end > len(l3) {
			return fmt.Errorf("IPv4 length %d: header %d bytes, packet %d", end, hl, len(l3))
		}
		l4 = l3[hl:end]
	case 6:
		proto = l3[6]
		end := ipEnd(l3, 4, 40)
		if end > len(l3) {
			return fmt.Errorf("IPv6 length %d: packet %d", end, len(l3))
		}
		l4 = l3[40:end]
		if proto == 60 { // destination options: the DSR option
			proto, l4 = l4[0], l4[(int(l4[1])+1)*8:]
		}
		if proto == 44 {
			fragmented = true
			proto, l4 = l4[0], l4[8:]
		}
	default:
		return fmt.Errorf("not IP: version %d", l3[0]>>4)
	}
	if fragmented {
		return nil
	}
	if proto == 4 || proto == 41 {
		return verifyL3(l4)
	}
	return verifyL4(l3, proto, l4)
}

// ipEnd is where the IP packet l3 ends by its length field at off, which
// counts from base; a length of 0 is a BIG TCP packet's (BigTCP), which
// ends with the frame.
func ipEnd(l3 []byte, off, base int) int {
	n := int(binary.BigEndian.Uint16(l3[off:]))
	if n == 0 {
		return len(l3)
	}
	return base + n
}

// VerifyDatagram checks the L4 checksum of a reassembled datagram given as
// the first fragment's L3 header and the whole L4 payload.
func VerifyDatagram(l3 []byte, proto uint8, l4 []byte) error {
	return verifyL4(l3, proto, l4)
}

func verifyL4(l3 []byte, proto uint8, l4 []byte) error {
	v4 := l3[0]>>4 == 4
	switch proto {
	case 6, 17:
		if proto == 17 && v4 && binary.BigEndian.Uint16(l4[6:]) == 0 {
			return nil // IPv4 UDP without checksum
		}
		if c := checksum(l4, pseudo(l3, proto, len(l4))); c != 0 {
			return fmt.Errorf("protocol %d checksum does not verify", proto)
		}
	case 1:
		if c := checksum(l4, 0); c != 0 {
			return fmt.Errorf("ICMP checksum does not verify")
		}
		if len(l4) >= 8+20 {
			q := l4[8:]
			if c := checksum(q[:int(q[0]&0x0f)*4], 0); c != 0 {
				return fmt.Errorf("quoted IPv4 header checksum does not verify")
			}
		}
	case 58:
		if c := checksum(l4, pseudo(l3, proto, len(l4))); c != 0 {
			return fmt.Errorf("ICMPv6 checksum does not verify")
		}
	}
	return nil
}
