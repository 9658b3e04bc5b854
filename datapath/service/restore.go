package service

// Reading back what the maps hold when a manager starts, and finishing
// updates an earlier process left half done.

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/servicepath/servicepath/datapath/maps"
)

func (mgr *Manager) load() error {
	backends := map[uint32]maps.Backend{}
	var id uint32
	var be maps.Backend
	it := mgr.m.Backends.Iterate()
	for it.Next(&id, &be) {
		backends[id] = be
	}
	if err := it.Err(); err != nil {
		return err
	}

	masters := map[maps.ServiceKey]maps.ServiceValue{}
	slotIDs := map[maps.ServiceKey]uint32{}
	var k maps.ServiceKey
	var v maps.ServiceValue
	sit := mgr.m.Services.Iterate()
	for sit.Next(&k, &v) {
		if k.Slot == 0 {
			masters[k] = v
		} else {
			slotIDs[k] = v.BackendID
		}
	}
	if err := sit.Err(); err != nil {
		return err
	}

	var stale []maps.ServiceKey
	for mk, mv := range masters {
		var meta maps.ServiceMeta
		if err := mgr.m.SvcMeta.Lookup(&mk, &meta); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return err
		}
		name, portName := meta.Names()
		f := &frontend{name: name, portName: portName, count: int(mv.Count), affinity: mv.AffinityTimeout,
			flags: mv.Flags, backends: map[uint32]maps.Backend{}}
		for s := uint16(1); s <= mv.Total; s++ {
			sk := mk
			sk.Slot = s
			id, ok := slotIDs[sk]
			if !ok {
				return fmt.Errorf("frontend %s: slot %d missing", keyString(mk), s)
			}
			f.ids = append(f.ids, id)
			f.backends[id] = backends[id]
			mgr.usedIDs[id] = true
		}
		// Two masters with one id (or none) cannot both keep it: the later
		// is given a new one at its next write.
		if _, dup := mgr.svcIDs[mv.SvcID]; mv.SvcID != 0 && !dup {
			f.svcID = mv.SvcID
			mgr.svcIDs[mv.SvcID] = mk
			if mv.SvcID >= mgr.nextSvcID && mv.SvcID < math.MaxUint32 {
				mgr.nextSvcID = mv.SvcID + 1
			}
		}
		mgr.frontends[mk] = f
		mgr.slots += f.slots() + 1
	}
	// Slots past a master's total, metadata without a master and backends no
	// slot names are left from an interrupted update: finish it.
	for sk := range slotIDs {
		f, ok := mgr.frontends[masterKey(sk)]
		if !ok || int(sk.Slot) > f.slots() {
			stale = append(stale, sk)
		}
	}
	for _, sk := range stale {
		if err := deleteIfPresent(mgr.m.Services, &sk); err != nil {
			return err
		}
	}
	for id := range backends {
		if !mgr.usedIDs[id] {
			if err := deleteIfPresent(mgr.m.Backends, &id); err != nil {
				return err
			}
		}
		if id >= mgr.nextID {
			mgr.nextID = id + 1
		}
	}
	var metaKeys []maps.ServiceKey
	var meta maps.ServiceMeta
	mit := mgr.m.SvcMeta.Iterate()
	for mit.Next(&k, &meta) {
		if _, ok := mgr.frontends[k]; !ok {
			metaKeys = append(metaKeys, k)
		}
	}
	if err := mit.Err(); err != nil {
		return err
	}
	for _, mk := range metaKeys {
		if err := deleteIfPresent(mgr.m.SvcMeta, &mk); err != nil {
			return err
		}
	}
	if err := mgr.loadRanges(); err != nil {
		return fmt.Errorf("read source ranges: %w", err)
	}
	if err := mgr.loadTables(backends); err != nil {
		return fmt.Errorf("read Maglev tables: %w", err)
	}
	if err := mgr.syncFrontendAddrs(); err != nil {
		return fmt.Errorf("frontend addresses: %w", err)
	}
	return nil
}

// addrKey is k's address in sp_frontend_addrs; ok is false for NodePort
// and HostPort frontends, whose all-zero address is every node address.
func addrKey(k maps.ServiceKey) (key maps.NodeAddrKey, ok bool) {
	return maps.NodeAddrKey{Addr: k.Addr, Family: k.Family}, k.Addr != maps.Addr{}
}

// syncFrontendAddrs makes sp_frontend_addrs the frontends' addresses: what
// maps written before it existed, or an interrupted removal, left out of
// step.
func (mgr *Manager) syncFrontendAddrs() error {
	for k := range mgr.frontends {
		if ak, ok := addrKey(k); ok {
			mgr.addrRefs[ak]++
		}
	}
	if mgr.m.FrontendAddrs == nil {
		return nil
	}
	want := map[maps.NodeAddrKey]bool{}
	for k := range mgr.addrRefs {
		want[k] = true
	}
	var k maps.NodeAddrKey
	var v uint8
	var stale []maps.NodeAddrKey
	it := mgr.m.FrontendAddrs.Iterate()
	for it.Next(&k, &v) {
		if !want[k] {
			stale = append(stale, k)
		}
		delete(want, k)
	}
	if err := it.Err(); err != nil {
		return err
	}
	for k := range want {
		if err := mgr.m.FrontendAddrs.Put(k, uint8(1)); err != nil {
			return err
		}
	}
	for _, k := range stale {
		if err := deleteIfPresent(mgr.m.FrontendAddrs, &k); err != nil {
			return err
		}
	}
	return nil
}

// owner is the frontend whose master carries id and the flag, or nil.
func (mgr *Manager) owner(id uint32, flag uint16) *frontend {
	k, ok := mgr.svcIDs[id]
	if !ok {
		return nil
	}
	if f := mgr.frontends[k]; f.flags&flag != 0 {
		return f
	}
	return nil
}

// loadRanges reads sp_src_ranges into the frontends; ranges of no
// frontend that has SVC_F_SOURCE_RANGES are left from an interrupted
// update and deleted.
func (mgr *Manager) loadRanges() error {
	if mgr.m.SrcRanges == nil {
		return nil
	}
	var k maps.SrcRangeKey
	var v uint8
	var stale []maps.SrcRangeKey
	it := mgr.m.SrcRanges.Iterate()
	for it.Next(&k, &v) {
		f := mgr.owner(k.SvcID, maps.SvcFlagSourceRanges)
		if f == nil || k.PrefixLen < rangeKeyBits {
			stale = append(stale, k)
			continue
		}
		f.ranges = append(f.ranges, netip.PrefixFrom(k.Addr.Netip(k.Family), int(k.PrefixLen-rangeKeyBits)))
	}
	if err := it.Err(); err != nil {
		return err
	}
	for _, f := range mgr.frontends {
		slices.SortFunc(f.ranges, comparePrefix)
		mgr.ranges += len(f.ranges)
	}
	for _, k := range stale {
		if err := deleteIfPresent(mgr.m.SrcRanges, &k); err != nil {
			return err
		}
	}
	return nil
}

// loadTables notes which frontends have a Maglev table, and whether it is
// the table their backends give (else the next write rewrites it). Tables
// of no Maglev frontend with active backends are deleted.
func (mgr *Manager) loadTables(backends map[uint32]maps.Backend) error {
	if mgr.m.Maglev == nil {
		return nil
	}
	var id uint32
	value := make([]byte, mgr.m.Maglev.ValueSize())
	var stale []uint32
	it := mgr.m.Maglev.Iterate()
	for it.Next(&id, &value) {
		f := mgr.owner(id, maps.SvcFlagMaglev)
		if f == nil || f.count == 0 {
			stale = append(stale, id)
			continue
		}
		f.hasTable = true
		key, table, err := mgr.maglevTable(f.ids[:f.count], f.backends)
		if err == nil && bytes.Equal(table, value) {
			f.tableKey = key
		}
	}
	if err := it.Err(); err != nil {
		return err
	}
	for _, f := range mgr.frontends {
		if f.hasTable {
			mgr.tables++
		}
	}
	for _, id := range stale {
		if err := deleteIfPresent(mgr.m.Maglev, &id); err != nil {
			return err
		}
	}
	return nil
}
