// Package endpoints fills the datapath's table of the node's local pods
// (sp_endpoints, bpf/lib/endpoint_maps.h), which BPF host routing reads to
// deliver straight into a pod and to know a packet came from one.
package endpoints

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"
)

// MapName is the map's name in the pod-device object.
const MapName = "sp_endpoints"

// Flags of an endpoint.
const (
	// TCIngress: the pod's from-pod program runs at tc ingress of its host
	// device (veth), where bpf_redirect_peer is allowed.
	TCIngress uint32 = 0x01
)

// Key mirrors struct endpoint_key.
type Key struct {
	Addr   [16]byte
	Family uint8
	Pad    [7]uint8
}

// Info mirrors struct endpoint_info.
type Info struct {
	Ifindex uint32
	Flags   uint32
	MAC     [6]byte
	NodeMAC [6]byte
}

// Endpoint is one local pod, as the datapath sees it.
type Endpoint struct {
	// Addrs are the pod's addresses (one per family).
	Addrs []netip.Addr
	// Ifindex is the pod's device on the node (veth host side, netkit
	// primary).
	Ifindex int
	// MAC is the pod's own device's, NodeMAC its host-side device's; both
	// empty for L3 devices.
	MAC, NodeMAC net.HardwareAddr
	Flags        uint32
}

// KeyOf is the map key of addr.
func KeyOf(addr netip.Addr) Key {
	k := Key{Family: 6}
	if addr.Unmap().Is4() {
		k.Family = 4
		a := addr.Unmap().As4()
		copy(k.Addr[:], a[:])
	} else {
		k.Addr = addr.As16()
	}
	return k
}

func (e Endpoint) info() (Info, error) {
	i := Info{Ifindex: uint32(e.Ifindex), Flags: e.Flags}
	for _, m := range []struct {
		dst *[6]byte
		src net.HardwareAddr
	}{{&i.MAC, e.MAC}, {&i.NodeMAC, e.NodeMAC}} {
		switch len(m.src) {
		case 0:
		case 6:
			copy(m.dst[:], m.src)
		default:
			return i, fmt.Errorf("MAC %s: want 6 bytes", m.src)
		}
	}
	return i, nil
}

// Upsert adds or replaces e under each of its addresses.
func Upsert(m *ebpf.Map, e Endpoint) error {
	info, err := e.info()
	if err != nil {
		return err
	}
	for _, a := range e.Addrs {
		if err := m.Put(KeyOf(a), info); err != nil {
			return fmt.Errorf("endpoint %s: %w", a, err)
		}
	}
	return nil
}

// Delete removes the endpoints at addrs; absent ones are not an error.
func Delete(m *ebpf.Map, addrs ...netip.Addr) error {
	for _, a := range addrs {
		if err := m.Delete(KeyOf(a)); err != nil && err != ebpf.ErrKeyNotExist {
			return fmt.Errorf("endpoint %s: %w", a, err)
		}
	}
	return nil
}
