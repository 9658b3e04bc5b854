package ct

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/servicepath/servicepath/datapath/maps"
)

// GCNAT deletes the SNAT mappings (sp_nat) of flows whose conntrack flow
// entry is gone, both halves together, so a port returns to the pool with
// its flow. Run it after a pass over the map holding north-south flows
// (the north-south zone, or the shared map), which is where it looks. A
// mapping's out key is the flow entry's key; its reply key is derived from
// the out entry, or, for a reply half whose out half was evicted, checked
// through the client it names.
func GCNAT(m *maps.Maps) (int, error) {
	nat, ctm := m.NAT, m.NorthSouthCT()
	if nat == nil {
		return 0, nil
	}
	var (
		k     maps.CTKey
		v     maps.NATEntry
		stale []maps.CTKey
		flow  maps.CTEntry
	)
	alive := func(fk maps.CTKey) bool {
		fk.Flags = 0
		return ctm.Lookup(&fk, &flow) == nil
	}
	it := nat.Iterate()
	for it.Next(&k, &v) {
		switch k.Flags {
		case maps.NATFlagOut:
			if !alive(k) {
				in := maps.CTKey{SAddr: k.DAddr, DAddr: v.Addr, SPort: k.DPort, DPort: v.Port, Proto: k.Proto, Family: k.Family, Flags: maps.NATFlagIn}
				stale = append(stale, k, in)
			}
		case maps.NATFlagIn:
			fk := maps.CTKey{SAddr: v.Addr, DAddr: k.SAddr, SPort: v.Port, DPort: k.SPort, Proto: k.Proto, Family: k.Family}
			if !alive(fk) {
				stale = append(stale, k)
			}
		}
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("walk %s: %w", maps.NATName, err)
	}
	n := 0
	for _, sk := range stale {
		switch err := nat.Delete(&sk); {
		case err == nil:
			n++
		case !errors.Is(err, ebpf.ErrKeyNotExist):
			return n, fmt.Errorf("delete from %s: %w", maps.NATName, err)
		}
	}
	return n, nil
}
