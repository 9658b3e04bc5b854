package service

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"time"

	"github.com/cilium/ebpf"

	"github.com/servicepath/servicepath/datapath/maps"
)

// Manager programs services into the datapath maps. All of its state is
// read back from the (pinned) maps, so a new process continues where the
// last one stopped. Not safe for concurrent use.
type Manager struct {
	m         *maps.Maps
	removed   []Removed
	frontends map[maps.ServiceKey]*frontend
	usedIDs   map[uint32]bool
	// slots counts service map entries in use (masters and slots), kept
	// as frontends change so no update walks every frontend.
	slots    int
	nextID   uint32
	maxIDs   uint32
	maxSlots uint32
}

type frontend struct {
	name, portName string
	affinity       uint32 // seconds
	flags          uint16
	// ids in slot order: active first, then terminating.
	ids   []uint32
	count int
	// backends by id, as written to sp_backends.
	backends map[uint32]maps.Backend
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
	return nil
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
	return maps.ServiceKey{Addr: addr, Port: maps.NewBE16(f.Port), Proto: uint8(f.Protocol), Family: fam}
}

func keyString(k maps.ServiceKey) string {
	return Frontend{Addr: k.Addr.Netip(k.Family), Port: k.Port.Uint16(), Protocol: Protocol(k.Proto)}.String()
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

func (mgr *Manager) plan(s Service, reserved map[uint32]bool) (*plan, error) {
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
		flags: kindFlags[s.Frontend.Kind], backends: map[uint32]maps.Backend{}}
	old := mgr.frontends[p.key]

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
	reserved := map[uint32]bool{}
	seen := map[maps.ServiceKey]bool{}
	var plans []*plan
	for _, s := range services {
		p, err := mgr.plan(s, reserved)
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

// usage is what a change needs of the two bounded maps.
type usage struct{ slots, ids int }

// commit removes stale frontends, then writes plans, shrinking ones first.
// Each write briefly holds old and new entries together, so the peak of
// every step is checked, not only the end state, before a map is touched:
// a change that cannot complete is refused whole.
func (mgr *Manager) commit(plans []*plan, stale []maps.ServiceKey) error {
	running := usage{slots: mgr.slots, ids: len(mgr.usedIDs)}
	for _, k := range stale {
		f := mgr.frontends[k]
		running.slots -= f.slots() + 1
		running.ids -= len(f.backends)
	}
	type step struct {
		p           *plan
		grow, delta usage
	}
	steps := make([]step, 0, len(plans))
	for _, p := range plans {
		st := step{p: p, grow: usage{slots: len(p.ids) + 1, ids: len(p.ids)}}
		st.delta = st.grow
		if old := mgr.frontends[p.key]; old != nil {
			newIDs := 0
			for _, id := range p.ids {
				if _, ok := old.backends[id]; !ok {
					newIDs++
				}
			}
			st.grow = usage{slots: max(0, len(p.ids)-old.slots()), ids: newIDs}
			st.delta = usage{slots: len(p.ids) - old.slots(), ids: len(p.ids) - len(old.backends)}
		}
		steps = append(steps, st)
	}
	sort.SliceStable(steps, func(i, j int) bool {
		return steps[i].delta.slots+steps[i].delta.ids < steps[j].delta.slots+steps[j].delta.ids
	})
	for _, st := range steps {
		if n := running.slots + st.grow.slots; n > int(mgr.maxSlots) {
			return fmt.Errorf("service map full: %s needs %d entries, %d available", keyString(st.p.key), n, mgr.maxSlots)
		}
		if n := running.ids + st.grow.ids; n > int(mgr.maxIDs) {
			return fmt.Errorf("backend map full: %s needs %d entries, %d available", keyString(st.p.key), n, mgr.maxIDs)
		}
		running.slots += st.delta.slots
		running.ids += st.delta.ids
	}

	for _, k := range stale {
		if err := mgr.remove(k); err != nil {
			return fmt.Errorf("remove %s: %w", keyString(k), err)
		}
	}
	for _, st := range steps {
		if err := mgr.write(st.p); err != nil {
			return fmt.Errorf("program %s: %w", keyString(st.p.key), err)
		}
	}
	return nil
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
// sees a slot naming an unwritten or deleted backend, or a count covering
// an unwritten slot: backends, slots, master, then removals.
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
	master := maps.ServiceValue{Count: uint16(p.count), Total: uint16(len(p.ids)), AffinityTimeout: p.affinity, Flags: p.flags}
	if err := mgr.m.Services.Put(p.key, master); err != nil {
		return fmt.Errorf("write service: %w", err)
	}
	name, portName := p.meta.Names()
	next := &frontend{name: name, portName: portName, affinity: p.affinity, flags: p.flags, ids: p.ids, count: p.count,
		backends: p.backends}
	mgr.frontends[p.key] = next
	mgr.slots += next.slots() + 1
	if old != nil {
		mgr.slots -= old.slots() + 1
	}
	if old == nil {
		return nil
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
	fe := Frontend{Addr: k.Addr.Netip(k.Family), Port: k.Port.Uint16(), Protocol: Protocol(k.Proto)}
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
	if err := deleteIfPresent(mgr.m.SvcMeta, &k); err != nil {
		return err
	}
	delete(mgr.frontends, k)
	mgr.slots -= f.slots() + 1
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
			Name:     f.name,
			PortName: f.portName,
			Frontend: Frontend{Addr: k.Addr.Netip(k.Family), Port: k.Port.Uint16(), Protocol: Protocol(k.Proto),
				Kind: kindOf(f.flags)},
			Affinity: time.Duration(f.affinity) * time.Second,
		}}
		for i, id := range f.ids {
			b := f.backends[id]
			state := Active
			if i >= f.count {
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
