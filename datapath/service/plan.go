package service

// Planning a change and checking that it fits, before any map is touched.

import (
	"fmt"
	"math"
	"net/netip"
	"slices"
	"sort"
	"time"

	"github.com/servicepath/servicepath/datapath/maps"
)

// plan is a frontend's next layout, computed before any map is touched.
type plan struct {
	key      maps.ServiceKey
	affinity uint32
	flags    uint16
	meta     maps.ServiceMeta
	ids      []uint32
	count    int
	backends map[uint32]maps.Backend
	svcID    uint32
	ranges   []netip.Prefix
	// tableKey is "" when the frontend has no table; table is nil when
	// the one in the map is already right.
	tableKey string
	table    []byte
}

func (p *plan) hasTable() bool { return p.tableKey != "" }

func (mgr *Manager) allocSvcID(reserved map[uint32]bool) uint32 {
	for {
		// Ids run 1..MaxUint32-1, so the cursor never wraps to 0; with at
		// most ServiceMapSize frontends a free one is always near.
		if mgr.nextSvcID == 0 || mgr.nextSvcID == math.MaxUint32 {
			mgr.nextSvcID = 1
		}
		id := mgr.nextSvcID
		mgr.nextSvcID++
		if _, used := mgr.svcIDs[id]; !used && !reserved[id] {
			return id
		}
	}
}

func (mgr *Manager) allocID(reserved map[uint32]bool) (uint32, error) {
	for range mgr.maxIDs {
		// Ids run 1..maxIDs; a restart may leave the cursor just past the end.
		if mgr.nextID == 0 || mgr.nextID > mgr.maxIDs {
			mgr.nextID = 1
		}
		id := mgr.nextID
		mgr.nextID++
		if !mgr.usedIDs[id] && !reserved[id] {
			return id, nil
		}
	}
	return 0, fmt.Errorf("backend map full (%d entries)", mgr.maxIDs)
}

func (mgr *Manager) plan(s Service, reserved, reservedSvc map[uint32]bool) (*plan, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	if len(s.Backends) > 0xffff {
		return nil, fmt.Errorf("service %s: %d backends, at most 65535", s.Name, len(s.Backends))
	}
	meta, err := maps.NewServiceMeta(s.Name, s.PortName)
	if err != nil {
		return nil, fmt.Errorf("service %s: %w", s.Name, err)
	}
	p := &plan{key: frontendKey(s.Frontend), meta: meta, affinity: uint32(s.Affinity / time.Second),
		flags: kindFlags[s.Frontend.Kind] | behaviourFlags(s), backends: make(map[uint32]maps.Backend, len(s.Backends))}
	old := mgr.frontends[p.key]
	if old != nil && old.svcID != 0 {
		p.svcID = old.svcID
	} else {
		p.svcID = mgr.allocSvcID(reservedSvc)
		reservedSvc[p.svcID] = true
	}
	for _, r := range s.SourceRanges {
		p.ranges = append(p.ranges, r.Masked())
	}
	slices.SortFunc(p.ranges, comparePrefix)

	ordered := slices.Clone(s.Backends)
	sort.SliceStable(ordered, func(i, j int) bool { return ordered[i].State < ordered[j].State })
	for _, b := range ordered {
		v := backendValue(b, s.Frontend.Protocol)
		var id uint32
		if old != nil {
			for oid, ob := range old.backends {
				if sameEndpoint(ob, v) {
					id = oid
					break
				}
			}
		}
		if id == 0 {
			if id, err = mgr.allocID(reserved); err != nil {
				return nil, fmt.Errorf("service %s: %w", s.Name, err)
			}
			reserved[id] = true
		}
		p.ids = append(p.ids, id)
		p.backends[id] = v
		if b.State == Active {
			p.count++
		}
	}
	// Kubernetes' fallback (kube-proxy since 1.26): with no backend
	// ready, the serving terminating ones take new flows rather than
	// none getting them.
	if p.count == 0 {
		p.count = len(p.ids)
	}
	// The table is built here, so one that cannot be is refused before
	// any write.
	if s.Maglev && p.count > 0 {
		key, table, err := mgr.maglevTable(p.ids[:p.count], p.backends)
		if err != nil {
			return nil, fmt.Errorf("service %s: Maglev: %w", s.Name, err)
		}
		p.tableKey = key
		if old == nil || !old.hasTable || old.tableKey != key || old.svcID != p.svcID {
			p.table = table
		}
	}
	return p, nil
}

// Apply makes the frontends owned by each of owners exactly those in
// services (whose Names must be among owners): new and changed frontends
// are written, frontends no longer listed are removed. Everything is
// validated, and checked to fit, before the first map write.
func (mgr *Manager) Apply(owners []string, services []Service) error {
	owned := map[string]bool{}
	for _, o := range owners {
		owned[o] = true
	}
	for _, s := range services {
		if !owned[s.Name] {
			return fmt.Errorf("service %s (%s) is not among the owners being applied", s.Name, s.Frontend)
		}
	}
	plans, err := mgr.planAll(services)
	if err != nil {
		return err
	}
	want := map[maps.ServiceKey]bool{}
	for _, p := range plans {
		want[p.key] = true
	}
	var stale []maps.ServiceKey
	for k, f := range mgr.frontends {
		if owned[f.name] && !want[k] {
			stale = append(stale, k)
		}
	}
	return mgr.commit(plans, stale)
}

// Upsert programs one frontend.
func (mgr *Manager) Upsert(s Service) error {
	plans, err := mgr.planAll([]Service{s})
	if err != nil {
		return err
	}
	return mgr.commit(plans, nil)
}

func (mgr *Manager) planAll(services []Service) ([]*plan, error) {
	reserved, reservedSvc := make(map[uint32]bool, 4*len(services)), make(map[uint32]bool, len(services))
	seen := make(map[maps.ServiceKey]bool, len(services))
	plans := make([]*plan, 0, len(services))
	for _, s := range services {
		p, err := mgr.plan(s, reserved, reservedSvc)
		if err != nil {
			return nil, err
		}
		if seen[p.key] {
			return nil, fmt.Errorf("frontend %s listed twice (service %s)", s.Frontend, s.Name)
		}
		seen[p.key] = true
		if old, ok := mgr.frontends[p.key]; ok && old.name != s.Name {
			return nil, fmt.Errorf("frontend %s of service %s already belongs to service %s", s.Frontend, s.Name, old.name)
		}
		plans = append(plans, p)
	}
	return plans, nil
}

// usage is what a change needs of the bounded maps.
type usage struct{ slots, ids, tables, ranges int }

func (u usage) sum() int { return u.slots + u.ids + u.tables + u.ranges }

// commit removes stale frontends, then writes plans, shrinking ones first.
// Each write briefly holds old and new entries together, so the peak of
// every step is checked, not only the end state, before a map is touched:
// a change that cannot complete is refused whole.
func (mgr *Manager) commit(plans []*plan, stale []maps.ServiceKey) error {
	running := usage{slots: mgr.slots, ids: len(mgr.usedIDs), tables: mgr.tables, ranges: mgr.ranges}
	for _, k := range stale {
		f := mgr.frontends[k]
		running.slots -= f.slots() + 1
		running.ids -= len(f.backends)
		running.ranges -= len(f.ranges)
		if f.hasTable {
			running.tables--
		}
	}
	type step struct {
		p           *plan
		grow, delta usage
	}
	steps := make([]step, 0, len(plans))
	b2i := func(b bool) int {
		if b {
			return 1
		}
		return 0
	}
	for _, p := range plans {
		st := step{p: p, grow: usage{slots: len(p.ids) + 1, ids: len(p.ids), tables: b2i(p.hasTable()), ranges: len(p.ranges)}}
		st.delta = st.grow
		if old := mgr.frontends[p.key]; old != nil {
			newIDs := 0
			for _, id := range p.ids {
				if _, ok := old.backends[id]; !ok {
					newIDs++
				}
			}
			newRanges := len(p.ranges)
			if old.svcID == p.svcID {
				newRanges = len(slices.DeleteFunc(slices.Clone(p.ranges), func(r netip.Prefix) bool {
					return slices.Contains(old.ranges, r)
				}))
			}
			st.grow = usage{slots: max(0, len(p.ids)-old.slots()), ids: newIDs,
				tables: b2i(p.hasTable() && !old.hasTable), ranges: newRanges}
			st.delta = usage{slots: len(p.ids) - old.slots(), ids: len(p.ids) - len(old.backends),
				tables: b2i(p.hasTable()) - b2i(old.hasTable), ranges: len(p.ranges) - len(old.ranges)}
		}
		steps = append(steps, st)
	}
	sort.SliceStable(steps, func(i, j int) bool { return steps[i].delta.sum() < steps[j].delta.sum() })
	// Batched, every step's new entries are written before any old one
	// goes: that peak must fit too.
	peak := running
	for _, st := range steps {
		peak.slots += st.grow.slots
		peak.ids += st.grow.ids
		peak.tables += st.grow.tables
		peak.ranges += st.grow.ranges
	}
	for _, st := range steps {
		if n := running.slots + st.grow.slots; n > int(mgr.maxSlots) {
			return fmt.Errorf("service map full: %s needs %d entries, %d available", keyString(st.p.key), n, mgr.maxSlots)
		}
		if n := running.ids + st.grow.ids; n > int(mgr.maxIDs) {
			return fmt.Errorf("backend map full: %s needs %d entries, %d available", keyString(st.p.key), n, mgr.maxIDs)
		}
		if n := running.tables + st.grow.tables; n > int(mgr.maxTables) {
			return fmt.Errorf("Maglev map full: %s needs %d tables, %d available", keyString(st.p.key), n, mgr.maxTables)
		}
		if n := running.ranges + st.grow.ranges; n > int(mgr.maxRanges) {
			return fmt.Errorf("source range map full: %s needs %d entries, %d available", keyString(st.p.key), n, mgr.maxRanges)
		}
		running.slots += st.delta.slots
		running.ids += st.delta.ids
		running.tables += st.delta.tables
		running.ranges += st.delta.ranges
	}

	for _, k := range stale {
		owner := mgr.frontends[k].name
		if err := mgr.remove(k); err != nil {
			return fmt.Errorf("remove %s: %w", keyString(k), err)
		}
		mgr.changed(owner)
	}
	var todo []*plan
	for _, st := range steps {
		if !mgr.unchanged(st.p) {
			todo = append(todo, st.p)
		}
	}
	if len(todo) >= batchMin && peak.slots <= int(mgr.maxSlots) && peak.ids <= int(mgr.maxIDs) &&
		peak.tables <= int(mgr.maxTables) && peak.ranges <= int(mgr.maxRanges) {
		// A failed batch leaves entries the plans rewrite one by one
		// below, keeping the books of what they complete.
		if mgr.writeAll(todo) == nil {
			return nil
		}
		todo = slices.DeleteFunc(todo, mgr.unchanged)
	}
	for _, p := range todo {
		if err := mgr.write(p); err != nil {
			return fmt.Errorf("program %s: %w", keyString(p.key), err)
		}
	}
	return nil
}

// batchMin is the fewest frontends written batched: a sync or a big
// change, where one update call per map instead of nine per frontend is
// what makes 100k services fit in seconds.
const batchMin = 64

// Changes counts the frontends this manager wrote or removed.
func (mgr *Manager) Changes() uint64 { return mgr.changes }

func (mgr *Manager) changed(owner string) {
	mgr.changes++
	mgr.changedOwners[owner] = true
}

// TakeChanged returns the owners, sorted, of the frontends written or
// removed since the last call: one Apply of many owners tells which of
// them it actually changed.
func (mgr *Manager) TakeChanged() []string {
	owners := make([]string, 0, len(mgr.changedOwners))
	for o := range mgr.changedOwners {
		owners = append(owners, o)
	}
	clear(mgr.changedOwners)
	slices.Sort(owners)
	return owners
}

// unchanged says the maps hold p already: the same names, flags, backends
// and ranges, the same backends taking new flows (in whatever slot order),
// and the table, if any, up to date.
func (mgr *Manager) unchanged(p *plan) bool {
	old := mgr.frontends[p.key]
	if old == nil {
		return false
	}
	name, portName := p.meta.Names()
	return old.name == name && old.portName == portName && old.svcID == p.svcID && old.affinity == p.affinity &&
		old.flags == p.flags && old.count == p.count && len(old.ids) == len(p.ids) &&
		sameIDs(old.ids[:old.count], p.ids[:p.count]) && sameIDs(old.ids[old.count:], p.ids[p.count:]) &&
		sameBackends(old.backends, p.backends) && slices.Equal(old.ranges, p.ranges) &&
		old.hasTable == p.hasTable() && p.table == nil
}

// sameIDs compares two lists of a frontend's (distinct) backend ids as sets.
func sameIDs(a, b []uint32) bool {
	if len(a) != len(b) {
		return false
	}
	set := make(map[uint32]bool, len(a))
	for _, id := range a {
		set[id] = true
	}
	for _, id := range b {
		if !set[id] {
			return false
		}
	}
	return true
}

func sameBackends(a, b map[uint32]maps.Backend) bool {
	if len(a) != len(b) {
		return false
	}
	for id, v := range b {
		if w, ok := a[id]; !ok || w != v {
			return false
		}
	}
	return true
}

// Delete removes one frontend; absent is not an error.
func (mgr *Manager) Delete(f Frontend) error {
	return mgr.remove(frontendKey(f))
}

// DeleteOwned removes every frontend owned by the named services.
func (mgr *Manager) DeleteOwned(owners []string) error {
	return mgr.Apply(owners, nil)
}
