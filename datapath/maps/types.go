// Package maps holds Go mirrors of the datapath's BPF map keys and values
// (bpf/lib/*_maps.h) and opens the pinned maps by name.
package maps

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// Family is the datapath's address family tag (SP_AF_INET/SP_AF_INET6).
type Family uint8

const (
	IPv4 Family = 4
	IPv6 Family = 6
)

// Addr is union v6addr: an IPv4 address sits in the first 4 bytes.
type Addr [16]byte

// AddrFrom converts a netip.Addr; IPv4-mapped IPv6 counts as IPv4.
func AddrFrom(a netip.Addr) (Addr, Family) {
	var out Addr
	a = a.Unmap()
	if a.Is4() {
		v4 := a.As4()
		copy(out[:], v4[:])
		return out, IPv4
	}
	return Addr(a.As16()), IPv6
}

// Netip converts back for the given family.
func (a Addr) Netip(f Family) netip.Addr {
	if f == IPv4 {
		return netip.AddrFrom4([4]byte(a[:4]))
	}
	return netip.AddrFrom16(a)
}

// BE16 is a 16-bit value in network byte order, as __be16 in C.
type BE16 [2]byte

func NewBE16(v uint16) BE16 {
	var b BE16
	binary.BigEndian.PutUint16(b[:], v)
	return b
}

func (b BE16) Uint16() uint16 { return binary.BigEndian.Uint16(b[:]) }

// ServiceKey is struct lb_svc_key.
type ServiceKey struct {
	Addr   Addr
	Port   BE16
	Proto  uint8
	Family Family
	Slot   uint16
	Scope  uint8
	Pad    uint8
}

// Scopes of a frontend's entries, LB_SCOPE_*.
const (
	ScopeExternal uint8 = 0
	ScopeInternal uint8 = 1
)

// ServiceValue is struct lb_svc_value.
type ServiceValue struct {
	BackendID       uint32
	Count           uint16
	Total           uint16
	AffinityTimeout uint32
	Flags           uint16
	Pad             uint16
	SvcID           uint32
}

// Frontend flags, SVC_F_*.
const (
	SvcFlagNodePort     uint16 = 0x01
	SvcFlagExternalIP   uint16 = 0x02
	SvcFlagLoadBalancer uint16 = 0x04
	SvcFlagHostPort     uint16 = 0x08
	SvcFlagETPLocal     uint16 = 0x10
	SvcFlagSourceRanges uint16 = 0x20
	SvcFlagMaglev       uint16 = 0x40
	SvcFlagDSR          uint16 = 0x80
	SvcFlagDSRHybrid    uint16 = 0x100
	SvcFlagDSRIPIP      uint16 = 0x200
	SvcFlagITPLocal     uint16 = 0x400
)

// SrcRangeKey is struct src_range_key (an LPM trie key).
type SrcRangeKey struct {
	PrefixLen uint32
	SvcID     uint32
	Family    Family
	Pad       [3]uint8
	Addr      Addr
}

// Backend state values, enum backend_state.
const (
	BackendActive      uint8 = 0
	BackendTerminating uint8 = 1
)

// Backend is struct lb_backend.
type Backend struct {
	Addr   Addr
	Port   BE16
	Proto  uint8
	Family Family
	State  uint8
	Pad    [3]uint8
}

// ServiceMeta is struct lb_svc_meta: who owns a frontend.
type ServiceMeta struct {
	Name     [128]byte
	PortName [64]byte
}

// NewServiceMeta fails when a name does not fit, rather than truncating
// it into a different name.
func NewServiceMeta(name, portName string) (ServiceMeta, error) {
	var m ServiceMeta
	if len(name) >= len(m.Name) {
		return m, fmt.Errorf("service name %q longer than %d bytes", name, len(m.Name)-1)
	}
	if len(portName) >= len(m.PortName) {
		return m, fmt.Errorf("port name %q longer than %d bytes", portName, len(m.PortName)-1)
	}
	copy(m.Name[:], name)
	copy(m.PortName[:], portName)
	return m, nil
}

func cString(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

func (m ServiceMeta) Names() (name, portName string) {
	return cString(m.Name[:]), cString(m.PortName[:])
}

// CT key flags, CT_F_*.
const CTFlagService uint8 = 0x01

// CTKey is struct ct_key.
type CTKey struct {
	SAddr  Addr
	DAddr  Addr
	SPort  BE16
	DPort  BE16
	Proto  uint8
	Family Family
	Flags  uint8
	Pad    uint8
}

// CT state bits, enum ct_state_bits.
const (
	CTEstablished uint16 = 0x01
	CTReplied     uint16 = 0x02
	CTFwdFin      uint16 = 0x04
	CTRevFin      uint16 = 0x08
	CTRst         uint16 = 0x10
	CTFwdSeq      uint16 = 0x20
	CTRevSeq      uint16 = 0x40
	CTNSSNAT      uint16 = 0x100
	CTNSDSR       uint16 = 0x200
	CTNSDSRIPIP   uint16 = 0x400
	CTNSLearned   uint16 = 0x800
)

// NAT key flags, NAT_F_*: sp_nat is keyed by CTKey.
const (
	NATFlagOut uint8 = 0x02
	NATFlagIn  uint8 = 0x04
)

// NATEntry is struct nat_entry.
type NATEntry struct {
	Addr Addr
	Port BE16
	Pad  [6]uint8
}

// NetdevInfo is struct netdev_info: a node device's SNAT addresses.
type NetdevInfo struct {
	V4 Addr
	V6 Addr
}

// CTEntry is struct ct_entry.
type CTEntry struct {
	Expires    uint64
	FwdPackets uint64
	FwdBytes   uint64
	RevPackets uint64
	RevBytes   uint64
	NATAddr    Addr
	NATPort    BE16
	State      uint16
	BackendID  uint32
	FwdSeq     uint32
	RevSeq     uint32
}

// AffinityKey is struct lb_affinity_key.
type AffinityKey struct {
	Client   Addr
	VIP      Addr
	Port     BE16
	Proto    uint8
	Family   Family
	ByCookie uint8
	Pad      [3]uint8
}

// AffinityValue is struct lb_affinity_value.
type AffinityValue struct {
	LastUsed  uint64
	BackendID uint32
	Pad       uint32
}

// SockRevNATKey is struct sock_revnat_key: a socket (by cookie) and the
// backend it was sent to.
type SockRevNATKey struct {
	Cookie uint64
	Addr   Addr
	Port   BE16
	Family Family
	Pad    [5]uint8
}

// SockRevNATValue is struct sock_revnat_value: the VIP that backend
// stands for.
type SockRevNATValue struct {
	Addr Addr
	Port BE16
	Pad  [6]uint8
}

// SockFlow is struct sock_flow: one translation a socket made.
type SockFlow struct {
	VIP         Addr
	Backend     Addr
	BackendID   uint32
	VIPPort     BE16
	BackendPort BE16
	Family      Family
	Proto       uint8
	Pad         [6]uint8
}

// SockCtx is struct sock_ctx, a socket's storage: Flow[0] is connect()'s
// while Conn is set; the others are unconnected sends.
type SockCtx struct {
	Flow [3]SockFlow
	Conn uint8
	Next uint8
	Pad  [6]uint8
}

// SockDestroyKey is struct sock_destroy_key: a backend that left a frontend.
type SockDestroyKey struct {
	Backend     Addr
	VIP         Addr
	BackendPort BE16
	VIPPort     BE16
	Proto       uint8
	Family      Family
	Pad         [2]uint8
}

// NodeAddrKey is struct node_addr_key.
type NodeAddrKey struct {
	Addr   Addr
	Family Family
	Pad    [7]uint8
}

// EDTPod is struct edt_pod: a rated pod's aggregate, keyed by the
// ifindex of its host-side device.
type EDTPod struct {
	Aggregate uint32
}

// EDTAggregateBit is EDT_AGGREGATE_BIT, set in every aggregate.
const EDTAggregateBit = 0x8000

// EDTRate is struct edt_rate: an aggregate's rate and the departure time
// (CLOCK_MONOTONIC ns) of its last packet.
type EDTRate struct {
	BytesPerSec uint64
	TLast       uint64
}
