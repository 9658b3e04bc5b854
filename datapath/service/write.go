package service

// Writing a planned frontend, and removing one, in an order no packet
// can see half done.

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/servicepath/servicepath/datapath/maps"
)

// entries are the map writes of one plan or, batched, of many, grouped in
// the order they are made: every backend, name, slot, Maglev table, source
// range and frontend address, then every master. So no packet sees a slot
// or Maglev table naming an unwritten backend, a count covering an
// unwritten slot, or a flag whose table or ranges are not written yet.
type entries struct {
	backendIDs []uint32
	backends   []maps.Backend
	metaKeys   []maps.ServiceKey
	metas      []maps.ServiceMeta
	slotKeys   []maps.ServiceKey
	slots      []maps.ServiceValue
	// tables are written one by one: each value is a whole table.
	tables     []*plan
	rangeKeys  []maps.SrcRangeKey
	addrKeys   []maps.NodeAddrKey
	masterKeys []maps.ServiceKey
	masters    []maps.ServiceValue
}

// add appends what p writes that the maps do not hold already.
func (e *entries) add(mgr *Manager, p *plan) {
	old := mgr.frontends[p.key]
	for id, b := range p.backends {
		if old != nil {
			if ob, ok := old.backends[id]; ok && ob == b {
				continue
			}
		}
		e.backendIDs = append(e.backendIDs, id)
		e.backends = append(e.backends, b)
	}
	e.metaKeys = append(e.metaKeys, p.key)
	e.metas = append(e.metas, p.meta)
	for i, id := range p.ids {
		if old != nil && i < len(old.ids) && old.ids[i] == id {
			continue
		}
		sk := p.key
		sk.Slot = uint16(i + 1)
		e.slotKeys = append(e.slotKeys, sk)
		e.slots = append(e.slots, maps.ServiceValue{BackendID: id})
	}
	if p.table != nil {
		e.tables = append(e.tables, p)
	}
	var oldRanges []netip.Prefix
	if old != nil && old.svcID == p.svcID {
		oldRanges = old.ranges
	}
	for _, r := range p.ranges {
		if !slices.Contains(oldRanges, r) {
			e.rangeKeys = append(e.rangeKeys, rangeKey(p.svcID, r))
		}
	}
	// Before the master: a later fragment to the address is then dropped
	// as soon as the service could have DNATed its first. Frontends of one
	// address in one batch each write it: the value is the same.
	if ak, ok := addrKey(p.key); ok && old == nil && mgr.addrRefs[ak] == 0 && mgr.m.FrontendAddrs != nil {
		e.addrKeys = append(e.addrKeys, ak)
	}
	e.masterKeys = append(e.masterKeys, p.key)
	e.masters = append(e.masters, maps.ServiceValue{Count: uint16(p.count), Total: uint16(len(p.ids)),
		AffinityTimeout: p.affinity, Flags: p.flags, SvcID: p.svcID})
}

// put makes e's writes in order; batched, one call per map and step.
func (e *entries) put(m *maps.Maps, batched bool) error {
	if err := putAll(m.Backends, e.backendIDs, e.backends, batched); err != nil {
		return fmt.Errorf("write backends: %w", err)
	}
	if err := putAll(m.SvcMeta, e.metaKeys, e.metas, batched); err != nil {
		return fmt.Errorf("write service names: %w", err)
	}
	if err := putAll(m.Services, e.slotKeys, e.slots, batched); err != nil {
		return fmt.Errorf("write slots: %w", err)
	}
	for _, p := range e.tables {
		if err := m.Maglev.Put(p.svcID, p.table); err != nil {
			return fmt.Errorf("write Maglev table of %s: %w", keyString(p.key), err)
		}
	}
	if err := putAll(m.SrcRanges, e.rangeKeys, ones(len(e.rangeKeys)), batched); err != nil {
		return fmt.Errorf("write source ranges: %w", err)
	}
	if err := putAll(m.FrontendAddrs, e.addrKeys, ones(len(e.addrKeys)), batched); err != nil {
		return fmt.Errorf("write frontend addresses: %w", err)
	}
	if err := putAll(m.Services, e.masterKeys, e.masters, batched); err != nil {
		return fmt.Errorf("write services: %w", err)
	}
	return nil
}

// putAll writes keys[i] = values[i]: one BPF_MAP_UPDATE_BATCH when
// batched, else one update each, as for a map whose type the kernel has
// no batch updates for (on 5.10, one of these maps; before 5.6, any).
func putAll[K, V any](m *ebpf.Map, keys []K, values []V, batched bool) error {
	if len(keys) == 0 {
		return nil
	}
	if batched {
		_, err := m.BatchUpdate(keys, values, nil)
		if !errors.Is(err, ebpf.ErrNotSupported) {
			return err
		}
	}
	for i := range keys {
		if err := m.Put(keys[i], values[i]); err != nil {
			return err
		}
	}
	return nil
}

// ones are the values of set-membership maps.
func ones(n int) []uint8 { return bytes.Repeat([]byte{1}, n) }

// write moves a frontend to its planned layout: its entries, then the
// removal of what the master no longer names.
func (mgr *Manager) write(p *plan) error {
	var e entries
	e.add(mgr, p)
	if err := e.put(mgr.m, false); err != nil {
		return err
	}
	return mgr.written(p)
}

// writeAll writes many frontends' entries batched, step by step across all
// of them, then removes what their masters no longer name. The caller has
// checked that every new entry fits beside every old one.
func (mgr *Manager) writeAll(plans []*plan) error {
	var backends, ranges int
	for _, p := range plans {
		backends += len(p.ids)
		ranges += len(p.ranges)
	}
	e := entries{
		backendIDs: make([]uint32, 0, backends), backends: make([]maps.Backend, 0, backends),
		metaKeys: make([]maps.ServiceKey, 0, len(plans)), metas: make([]maps.ServiceMeta, 0, len(plans)),
		slotKeys: make([]maps.ServiceKey, 0, backends), slots: make([]maps.ServiceValue, 0, backends),
		rangeKeys: make([]maps.SrcRangeKey, 0, ranges), addrKeys: make([]maps.NodeAddrKey, 0, len(plans)),
		masterKeys: make([]maps.ServiceKey, 0, len(plans)), masters: make([]maps.ServiceValue, 0, len(plans)),
	}
	for _, p := range plans {
		e.add(mgr, p)
	}
	if err := e.put(mgr.m, true); err != nil {
		return err
	}
	mgr.batches++
	for _, p := range plans {
		if err := mgr.written(p); err != nil {
			return fmt.Errorf("program %s: %w", keyString(p.key), err)
		}
	}
	return nil
}

// written records p as the frontend the maps hold and removes what the old
// one had and p no longer names: ranges, a table no longer used, slots and
// backends. The old entries stay counted until they are gone, erring on
// the safe side should a delete fail.
func (mgr *Manager) written(p *plan) error {
	old := mgr.frontends[p.key]
	for id := range p.backends {
		mgr.usedIDs[id] = true
	}
	if ak, ok := addrKey(p.key); ok && old == nil {
		mgr.addrRefs[ak]++
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
	mgr.changed(name)
	if old == nil {
		return nil
	}
	mgr.slots -= old.slots() + 1
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
