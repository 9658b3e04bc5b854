package clusterip

import (
	"encoding/binary"
	"math/bits"
	"net/netip"

	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/service"
)

// flowHashSeed is LB_FLOW_HASH_SEED in bpf/lib/hash.h.
const flowHashSeed = 0x5e4f1a9b

// flowHash mirrors lb_flow_hash (bpf/lib/hash.h): the kernel's jhash2
// over ten words as a little-endian BPF program loads them from struct
// pkt. The Maglev fixtures predict backends with it, so a fixture fails
// the moment the two disagree.
func flowHash(src, dst netip.AddrPort, proto service.Protocol) uint32 {
	var k [10]uint32
	saddr, fam := maps.AddrFrom(src.Addr())
	daddr, _ := maps.AddrFrom(dst.Addr())
	for i := range 4 {
		k[i] = binary.LittleEndian.Uint32(saddr[4*i:])
		k[4+i] = binary.LittleEndian.Uint32(daddr[4*i:])
	}
	var ports [4]byte // as in the L4 header: source, then destination
	binary.BigEndian.PutUint16(ports[0:], src.Port())
	binary.BigEndian.PutUint16(ports[2:], dst.Port())
	k[8] = binary.LittleEndian.Uint32(ports[:])
	k[9] = uint32(fam)<<8 | uint32(proto)
	return jhash2(k[:], flowHashSeed)
}

func jhash2(k []uint32, initval uint32) uint32 {
	rol := bits.RotateLeft32
	a := 0xdeadbeef + uint32(len(k))<<2 + initval
	b, c := a, a
	for ; len(k) > 3; k = k[3:] {
		a += k[0]
		b += k[1]
		c += k[2]
		a -= c
		a ^= rol(c, 4)
		c += b
		b -= a
		b ^= rol(a, 6)
		a += c
		c -= b
		c ^= rol(b, 8)
		b += a
		a -= c
		a ^= rol(c, 16)
		c += b
		b -= a
		b ^= rol(a, 19)
		a += c
		c -= b
		c ^= rol(b, 4)
		b += a
	}
	switch len(k) {
	case 3:
		c += k[2]
		fallthrough
	case 2:
		b += k[1]
		fallthrough
	case 1:
		a += k[0]
		c ^= b
		c -= rol(b, 14)
		a ^= c
		a -= rol(c, 11)
		b ^= a
		b -= rol(a, 25)
		c ^= b
		c -= rol(b, 16)
		a ^= c
		a -= rol(c, 4)
		b ^= a
		b -= rol(a, 14)
		c ^= b
		c -= rol(b, 24)
	}
	return c
}
