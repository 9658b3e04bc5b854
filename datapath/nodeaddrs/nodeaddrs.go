// Package nodeaddrs keeps the datapath's list of the node's own addresses,
// which decide what NodePort answers on and which ExternalIPs are local.
package nodeaddrs

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"

	"github.com/servicepath/servicepath/datapath/maps"
)

// Local lists the addresses of the calling thread's netns that NodePort
// answers on: every address but loopback and link-local ones.
func Local() ([]netip.Addr, error) {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list node addresses: %w", err)
	}
	var out []netip.Addr
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.IsLoopback() || ip.IsLinkLocalUnicast() {
			continue
		}
		out = append(out, ip)
	}
	return out, nil
}

// Sync makes the map hold exactly addrs: new ones are added before stale
// ones go, so an address present in both lists is never missing.
func Sync(m *ebpf.Map, addrs []netip.Addr) error {
	want := map[maps.NodeAddrKey]bool{}
	for _, a := range addrs {
		addr, fam := maps.AddrFrom(a)
		k := maps.NodeAddrKey{Addr: addr, Family: fam}
		want[k] = true
		if err := m.Put(k, uint8(1)); err != nil {
			return fmt.Errorf("add node address %s: %w", a, err)
		}
	}
	var k maps.NodeAddrKey
	var v uint8
	var stale []maps.NodeAddrKey
	it := m.Iterate()
	for it.Next(&k, &v) {
		if !want[k] {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return err
	}
	for _, k := range stale {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return err
		}
	}
	return nil
}

// SyncLocal syncs the map with the calling thread's netns addresses.
func SyncLocal(m *ebpf.Map) error {
	addrs, err := Local()
	if err != nil {
		return err
	}
	return Sync(m, addrs)
}
