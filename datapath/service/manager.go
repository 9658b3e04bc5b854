package service

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/cilium/ebpf"

	"github.com/servicepath/servicepath/datapath/maglev"
	"github.com/servicepath/servicepath/datapath/maps"
)

// Manager programs services into the datapath maps. All of its state is
// read back from the (pinned) maps, so a new process continues where the
// last one stopped. Not safe for concurrent use.
type Manager struct {
	m       *maps.Maps
	removed []Removed
	// changes counts frontends written or removed: an Apply of what the
	// maps already hold writes nothing and counts nothing.
	changes   uint64
	frontends map[maps.ServiceKey]*frontend
	usedIDs   map[uint32]bool
	// slots counts service map entries in use (masters and slots), kept
	// as frontends change so no update walks every frontend.
	slots    int
	nextID   uint32
	maxIDs   uint32
	maxSlots uint32
	// svcIDs are the frontends' svc ids (sp_maglev and sp_src_ranges keys),
	// handed out from a cursor like backend ids, so an id is not reused
	// while a packet may still hold it.
	svcIDs    map[uint32]maps.ServiceKey
	nextSvcID uint32
	// tables and ranges count sp_maglev and sp_src_ranges entries in use.
	tables, ranges       int
	maxTables, maxRanges uint32
	// addrRefs counts the frontends of each address in sp_frontend_addrs.
	addrRefs map[maps.NodeAddrKey]int
	// maglevSize is the table size the loader gave sp_maglev (its value
	// size / 4), which is what the datapath reads with: no separate
	// setting can disagree with it.
	maglevSize int
}

type frontend struct {
	name, portName string
	affinity       uint32 // seconds
	flags          uint16
	// ids in slot order: active first, then terminating; count of them
	// take new flows (all when none is active).
	ids   []uint32
	count int
	// backends by id, as written to sp_backends.
	backends map[uint32]maps.Backend
	// svcID is 0 only for a frontend read from maps written before svc
	// ids existed; its next write gives it one.
	svcID uint32
	// ranges are the source ranges in sp_src_ranges, masked and sorted.
	ranges []netip.Prefix
	// hasTable says sp_maglev holds a table for svcID; tableKey names the
	// backends it was built from ("" when unknown: rewritten next time).
	hasTable bool
	tableKey string
}

func (f *frontend) slots() int { return len(f.ids) }

// NewManager reads the current state from m and finishes any update an
// earlier process left half done.
func NewManager(m *maps.Maps) (*Manager, error) {
	mgr := &Manager{
		m:         m,
		frontends: map[maps.ServiceKey]*frontend{},
		usedIDs:   map[uint32]bool{},
		nextID:    1,
		maxIDs:    m.Backends.MaxEntries(),
		maxSlots:  m.Services.MaxEntries(),
		svcIDs:    map[uint32]maps.ServiceKey{},
		nextSvcID: 1,
		addrRefs:  map[maps.NodeAddrKey]int{},
	}
	if m.Maglev != nil {
		mgr.maglevSize = int(m.Maglev.ValueSize() / 4)
		mgr.maxTables = m.Maglev.MaxEntries()
	}
	if m.SrcRanges != nil {
		mgr.maxRanges = m.SrcRanges.MaxEntries()
	}
	if err := mgr.load(); err != nil {
		return nil, fmt.Errorf("read service maps: %w", err)
	}
	return mgr, nil
}

func masterKey(k maps.ServiceKey) maps.ServiceKey {
	k.Slot = 0
	return k
}

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
		flags: kindFlags[s.Frontend.Kind] | behaviourFlags(s), backends: map[uint32]maps.Backend{}}
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
	reserved, reservedSvc := map[uint32]bool{}, map[uint32]bool{}
	seen := map[maps.ServiceKey]bool{}
	var plans []*plan
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
		if err := mgr.remove(k); err != nil {
			return fmt.Errorf("remove %s: %w", keyString(k), err)
		}
		mgr.changes++
	}
	for _, st := range steps {
		if mgr.unchanged(st.p) {
			continue
		}
		if err := mgr.write(st.p); err != nil {
			return fmt.Errorf("program %s: %w", keyString(st.p.key), err)
		}
		mgr.changes++
	}
	return nil
}

// Changes counts the frontends this manager wrote or removed.
func (mgr *Manager) Changes() uint64 { return mgr.changes }

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

// Programmed is a frontend as the maps hold it.
type Programmed struct {
	Service
	// BackendIDs parallels Service.Backends.
	BackendIDs []uint32
}

// List returns every programmed frontend, sorted by name then frontend.
func (mgr *Manager) List() []Programmed {
	var out []Programmed
	for k, f := range mgr.frontends {
		s := Programmed{Service: Service{
			Name:         f.name,
			PortName:     f.portName,
			Frontend:     frontendOf(k, f.flags),
			Affinity:     time.Duration(f.affinity) * time.Second,
			SourceRanges: slices.Clone(f.ranges),
		}}
		fromFlags(&s.Service, f.flags)
		for _, id := range f.ids {
			b := f.backends[id]
			// The state as given, not the slot: with the fallback a
			// terminating backend can be counted for new flows.
			state := Active
			if b.State == maps.BackendTerminating {
				state = Terminating
			}
			s.Backends = append(s.Backends, Backend{Addr: b.Addr.Netip(b.Family), Port: b.Port.Uint16(), State: state})
			s.BackendIDs = append(s.BackendIDs, id)
		}
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.Name != b.Name {
			return a.Name < b.Name
		}
		if c := a.Frontend.Addr.Compare(b.Frontend.Addr); c != 0 {
			return c < 0
		}
		if a.Frontend.Port != b.Frontend.Port {
			return a.Frontend.Port < b.Frontend.Port
		}
		return a.Frontend.Protocol < b.Frontend.Protocol
	})
	return out
}
