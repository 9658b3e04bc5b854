package service

// Writing a planned frontend, and removing one, in an order no packet
// can see half done.

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/servicepath/servicepath/datapath/maps"
)

// write moves a frontend to its planned layout in an order where no packet
// sees a slot or Maglev table naming an unwritten or deleted backend, a
// count covering an unwritten slot, or a flag whose table or ranges are
// not written yet: backends, slots, table, ranges, master, then removals.
func (mgr *Manager) write(p *plan) error {
	old := mgr.frontends[p.key]
	for id, b := range p.backends {
		if old != nil {
			if ob, ok := old.backends[id]; ok && ob == b {
				continue
			}
		}
		if err := mgr.m.Backends.Put(id, b); err != nil {
			return fmt.Errorf("write backend %d: %w", id, err)
		}
		mgr.usedIDs[id] = true
	}
	if err := mgr.m.SvcMeta.Put(p.key, p.meta); err != nil {
		return fmt.Errorf("write service name: %w", err)
	}
	for i, id := range p.ids {
		if old != nil && i < len(old.ids) && old.ids[i] == id {
			continue
		}
		sk := p.key
		sk.Slot = uint16(i + 1)
		if err := mgr.m.Services.Put(sk, maps.ServiceValue{BackendID: id}); err != nil {
			return fmt.Errorf("write slot %d: %w", i+1, err)
		}
	}
	if p.table != nil {
		if err := mgr.m.Maglev.Put(p.svcID, p.table); err != nil {
			return fmt.Errorf("write Maglev table: %w", err)
		}
	}
	var oldRanges []netip.Prefix
	if old != nil && old.svcID == p.svcID {
		oldRanges = old.ranges
	}
	for _, r := range p.ranges {
		if slices.Contains(oldRanges, r) {
			continue
		}
		if err := mgr.m.SrcRanges.Put(rangeKey(p.svcID, r), uint8(1)); err != nil {
			return fmt.Errorf("write source range %s: %w", r, err)
		}
	}
	// Before the master: a later fragment to the address is then dropped
	// as soon as the service could have DNATed its first.
	if ak, ok := addrKey(p.key); ok && old == nil {
		if mgr.addrRefs[ak] == 0 && mgr.m.FrontendAddrs != nil {
			if err := mgr.m.FrontendAddrs.Put(ak, uint8(1)); err != nil {
				return fmt.Errorf("write frontend address: %w", err)
			}
		}
		mgr.addrRefs[ak]++
	}
	master := maps.ServiceValue{Count: uint16(p.count), Total: uint16(len(p.ids)), AffinityTimeout: p.affinity, Flags: p.flags,
		SvcID: p.svcID}
	if err := mgr.m.Services.Put(p.key, master); err != nil {
		return fmt.Errorf("write service: %w", err)
	}
	name, portName := p.meta.Names()
	next := &frontend{name: name, portName: portName, affinity: p.affinity, flags: p.flags, ids: p.ids, count: p.count,
		backends: p.backends, svcID: p.svcID, ranges: p.ranges, hasTable: p.hasTable(), tableKey: p.tableKey}
	mgr.frontends[p.key] = next
	mgr.svcIDs[p.svcID] = p.key
	mgr.slots += next.slots() + 1
	mgr.ranges += len(next.ranges)
	if next.hasTable {
		mgr.tables++
	}
	if old != nil {
		mgr.slots -= old.slots() + 1
	}
	if old == nil {
		return nil
	}
	// What the master no longer names: ranges, a table no longer used. The
	// old ones stay counted until they are gone, erring on the safe side
	// should a delete fail.
	for _, r := range old.ranges {
		if old.svcID == p.svcID && slices.Contains(p.ranges, r) {
			continue
		}
		k := rangeKey(old.svcID, r)
		if err := deleteIfPresent(mgr.m.SrcRanges, &k); err != nil {
			return fmt.Errorf("delete source range %s: %w", r, err)
		}
	}
	mgr.ranges -= len(old.ranges)
	if old.hasTable {
		if !next.hasTable || old.svcID != p.svcID {
			if err := deleteIfPresent(mgr.m.Maglev, &old.svcID); err != nil {
				return fmt.Errorf("delete Maglev table: %w", err)
			}
		}
		mgr.tables--
	}
	for s := len(p.ids) + 1; s <= old.slots(); s++ {
		sk := p.key
		sk.Slot = uint16(s)
		if err := deleteIfPresent(mgr.m.Services, &sk); err != nil {
			return fmt.Errorf("delete slot %d: %w", s, err)
		}
	}
	for id, b := range old.backends {
		if _, ok := p.backends[id]; !ok {
			if err := deleteIfPresent(mgr.m.Backends, &id); err != nil {
				return fmt.Errorf("delete backend %d: %w", id, err)
			}
			delete(mgr.usedIDs, id)
			mgr.noteRemoved(p.key, b)
		}
	}
	return nil
}

// Removed is a backend that left a frontend: sockets the socket hooks
// connected from that frontend to it are now stale.
type Removed struct {
	Frontend Frontend
	Backend  netip.AddrPort
}

func (mgr *Manager) noteRemoved(k maps.ServiceKey, b maps.Backend) {
	fe := frontendOf(k, 0)
	mgr.removed = append(mgr.removed, Removed{Frontend: fe, Backend: netip.AddrPortFrom(b.Addr.Netip(b.Family), b.Port.Uint16())})
}

// TakeRemoved returns the backends removed since the last call.
func (mgr *Manager) TakeRemoved() []Removed {
	r := mgr.removed
	mgr.removed = nil
	return r
}

// remove deletes the master first so no new flow starts, then the rest.
func (mgr *Manager) remove(k maps.ServiceKey) error {
	f, ok := mgr.frontends[k]
	if !ok {
		return nil
	}
	if err := deleteIfPresent(mgr.m.Services, &k); err != nil {
		return err
	}
	if f.hasTable {
		if err := deleteIfPresent(mgr.m.Maglev, &f.svcID); err != nil {
			return err
		}
	}
	for _, r := range f.ranges {
		rk := rangeKey(f.svcID, r)
		if err := deleteIfPresent(mgr.m.SrcRanges, &rk); err != nil {
			return err
		}
	}
	for s := 1; s <= f.slots(); s++ {
		sk := k
		sk.Slot = uint16(s)
		if err := deleteIfPresent(mgr.m.Services, &sk); err != nil {
			return err
		}
	}
	for id, b := range f.backends {
		if err := deleteIfPresent(mgr.m.Backends, &id); err != nil {
			return err
		}
		delete(mgr.usedIDs, id)
		mgr.noteRemoved(k, b)
	}
	if ak, ok := addrKey(k); ok {
		if mgr.addrRefs[ak] <= 1 && mgr.m.FrontendAddrs != nil {
			if err := deleteIfPresent(mgr.m.FrontendAddrs, &ak); err != nil {
				return err
			}
		}
		if mgr.addrRefs[ak]--; mgr.addrRefs[ak] <= 0 {
			delete(mgr.addrRefs, ak)
		}
	}
	if err := deleteIfPresent(mgr.m.SvcMeta, &k); err != nil {
		return err
	}
	delete(mgr.frontends, k)
	delete(mgr.svcIDs, f.svcID)
	mgr.slots -= f.slots() + 1
	mgr.ranges -= len(f.ranges)
	if f.hasTable {
		mgr.tables--
	}
	return nil
}
