package ct

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/servicepath/servicepath/datapath/maps"
)

// GCNAT deletes the SNAT mappings (sp_nat) of flows whose conntrack flow
// entry is gone or expired at now, both halves together, so a port returns
// to the pool with its flow (the datapath frees a closed TCP flow's at its
// last packet; this frees the rest: UDP, and flows that ended unseen). Run
// it after a pass over the map holding north-south flows (the north-south
// zone, or the shared map), which is where it looks.
//   - A mapping's out key is the flow entry's key; its reply key is derived
//     from the out entry and deleted only while it names the flow's client:
//     a reply half evicted and claimed since is another flow's.
//   - A reply half whose out half was evicted is checked through the
//     client it names.
//   - A mapping is deleted as it was read: one the datapath rewrote since
//     (the tuple reopened) is put back.
func GCNAT(m *maps.Maps, now uint64) (int, error) {
	if m.NAT == nil {
		return 0, nil
	}
	found, err := staleNAT(m, now)
	if err != nil {
		return 0, err
	}
	return deleteNAT(m.NAT, found)
}

// staleMapping is a NAT entry as GCNAT read it.
type staleMapping struct {
	k maps.CTKey
	v maps.NATEntry
}

// staleNAT walks the NAT map for the mappings of flows gone at now.
func staleNAT(m *maps.Maps, now uint64) ([]staleMapping, error) {
	nat, ctm := m.NAT, m.NorthSouthCT()
	var (
		k     maps.CTKey
		v     maps.NATEntry
		found []staleMapping
		rev   maps.NATEntry
		flow  maps.CTEntry
	)
	alive := func(fk maps.CTKey) bool {
		fk.Flags = 0
		return ctm.Lookup(&fk, &flow) == nil && flow.Expires > now
	}
	it := nat.Iterate()
	for it.Next(&k, &v) {
		switch k.Flags {
		case maps.NATFlagOut:
			if !alive(k) {
				found = append(found, staleMapping{k, v})
				in := maps.CTKey{SAddr: k.DAddr, DAddr: v.Addr, SPort: k.DPort, DPort: v.Port, Proto: k.Proto, Family: k.Family, Flags: maps.NATFlagIn}
				if nat.Lookup(&in, &rev) == nil && rev.Addr == k.SAddr && rev.Port == k.SPort {
					found = append(found, staleMapping{in, rev})
				}
			}
		case maps.NATFlagIn:
			fk := maps.CTKey{SAddr: v.Addr, DAddr: k.SAddr, SPort: v.Port, DPort: k.SPort, Proto: k.Proto, Family: k.Family}
			if !alive(fk) {
				found = append(found, staleMapping{k, v})
			}
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("walk %s: %w", maps.NATName, err)
	}
	return found, nil
}

// deleteNAT deletes the mappings found unless the datapath rewrote them
// since, and returns how many went.
func deleteNAT(nat *ebpf.Map, found []staleMapping) (int, error) {
	n := 0
	for _, s := range found {
		var cur maps.NATEntry
		ok, err := take(nat, &s.k, &cur)
		if err != nil {
			return n, fmt.Errorf("delete from %s: %w", maps.NATName, err)
		}
		switch {
		case !ok:
		case cur.Addr != s.v.Addr || cur.Port != s.v.Port:
			if err := putBack(nat, &s.k, &cur); err != nil {
				return n, fmt.Errorf("put back into %s: %w", maps.NATName, err)
			}
		default:
			n++
		}
	}
	return n, nil
}
