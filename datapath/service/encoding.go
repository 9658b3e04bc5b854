package service

// How frontends, backends, source ranges and Maglev tables are laid out
// in the maps.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/cilium/ebpf"

	"github.com/servicepath/servicepath/datapath/maglev"
	"github.com/servicepath/servicepath/datapath/maps"
)

// rangeKeyBits is what a source range's prefix length counts before the
// address: svc_id, family and padding.
const rangeKeyBits = 64

func rangeKey(svcID uint32, r netip.Prefix) maps.SrcRangeKey {
	addr, fam := maps.AddrFrom(r.Addr())
	return maps.SrcRangeKey{PrefixLen: uint32(rangeKeyBits + r.Bits()), SvcID: svcID, Family: fam, Addr: addr}
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

// maglevName names a backend in a Maglev table. It depends on the
// backend alone, so every node builds the same table from the same
// backends, whatever ids they have there.
func maglevName(b maps.Backend) string {
	return netip.AddrPortFrom(b.Addr.Netip(b.Family), b.Port.Uint16()).String()
}

// maglevTable builds the table of the given active backends: backend ids
// as the datapath reads them, and a key naming the input, so an unchanged
// table is not rewritten. Backends are sorted by name first: the table
// must not depend on slot order, which differs from node to node.
func (mgr *Manager) maglevTable(active []uint32, backends map[uint32]maps.Backend) (string, []byte, error) {
	if mgr.maglevSize == 0 {
		return "", nil, errors.New("the datapath has no Maglev map")
	}
	type named struct {
		name string
		id   uint32
	}
	in := make([]named, 0, len(active))
	for _, id := range active {
		in = append(in, named{maglevName(backends[id]), id})
	}
	slices.SortFunc(in, func(a, b named) int { return strings.Compare(a.name, b.name) })
	names := make([]string, len(in))
	var key strings.Builder
	fmt.Fprintf(&key, "%d", mgr.maglevSize)
	for i, n := range in {
		names[i] = n.name
		fmt.Fprintf(&key, " %s=%d", n.name, n.id)
	}
	slots, err := maglev.Build(names, mgr.maglevSize)
	if err != nil {
		return "", nil, err
	}
	table := make([]byte, 4*len(slots))
	for i, b := range slots {
		binary.NativeEndian.PutUint32(table[4*i:], in[b].id)
	}
	return key.String(), table, nil
}

func deleteIfPresent(m *ebpf.Map, key any) error {
	if err := m.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return err
	}
	return nil
}

var kindFlags = map[Kind]uint16{
	NodePort:     maps.SvcFlagNodePort,
	ExternalIP:   maps.SvcFlagExternalIP,
	LoadBalancer: maps.SvcFlagLoadBalancer,
	HostPort:     maps.SvcFlagHostPort,
}

// behaviourFlags are the master's flags for what a service asks beyond
// its kind.
func behaviourFlags(s Service) uint16 {
	var f uint16
	if s.ExternalLocal {
		f |= maps.SvcFlagETPLocal
	}
	if s.InternalLocal {
		f |= maps.SvcFlagITPLocal
	}
	if len(s.SourceRanges) > 0 {
		f |= maps.SvcFlagSourceRanges
	}
	if s.Maglev {
		f |= maps.SvcFlagMaglev
	}
	switch s.Mode {
	case DSR:
		f |= maps.SvcFlagDSR
	case Hybrid:
		f |= maps.SvcFlagDSR | maps.SvcFlagDSRHybrid
	}
	if s.Dispatch == IPIP {
		f |= maps.SvcFlagDSRIPIP
	}
	return f
}

// fromFlags fills in what behaviourFlags wrote.
func fromFlags(s *Service, f uint16) {
	s.ExternalLocal = f&maps.SvcFlagETPLocal != 0
	s.InternalLocal = f&maps.SvcFlagITPLocal != 0
	s.Maglev = f&maps.SvcFlagMaglev != 0
	switch {
	case f&maps.SvcFlagDSRHybrid != 0:
		s.Mode = Hybrid
	case f&maps.SvcFlagDSR != 0:
		s.Mode = DSR
	}
	if f&maps.SvcFlagDSRIPIP != 0 {
		s.Dispatch = IPIP
	}
}

func kindOf(flags uint16) Kind {
	for k, f := range kindFlags {
		if flags&f != 0 {
			return k
		}
	}
	return ClusterIP
}

func frontendKey(f Frontend) maps.ServiceKey {
	addr, fam := maps.AddrFrom(f.Addr)
	k := maps.ServiceKey{Addr: addr, Port: maps.NewBE16(f.Port), Proto: uint8(f.Protocol), Family: fam}
	if f.InCluster {
		k.Scope = maps.ScopeInternal
	}
	return k
}

// frontendOf is the frontend k keys, of the kind its master's flags say.
func frontendOf(k maps.ServiceKey, flags uint16) Frontend {
	return Frontend{Addr: k.Addr.Netip(k.Family), Port: k.Port.Uint16(), Protocol: Protocol(k.Proto),
		Kind: kindOf(flags), InCluster: k.Scope == maps.ScopeInternal}
}

func keyString(k maps.ServiceKey) string {
	return frontendOf(k, 0).String()
}

func backendValue(b Backend, p Protocol) maps.Backend {
	addr, fam := maps.AddrFrom(b.Addr)
	state := maps.BackendActive
	if b.State == Terminating {
		state = maps.BackendTerminating
	}
	return maps.Backend{Addr: addr, Port: maps.NewBE16(b.Port), Proto: uint8(p), Family: fam, State: state}
}

func sameEndpoint(a, b maps.Backend) bool {
	return a.Addr == b.Addr && a.Port == b.Port && a.Family == b.Family
}
