package service_test

import (
	"cmp"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/testenv"
)

// newEnv loads the real datapath, unpinned; conntrack is kept small since
// these tests only program services.
func newEnv(t testing.TB, adjust func(*loader.Config)) *inject.Env {
	t.Helper()
	testenv.RequireRoot(t)
	cfg := loader.DefaultConfig()
	cfg.CTMapSize = 1024
	if adjust != nil {
		adjust(&cfg)
	}
	env, err := inject.NewEnv(cfg)
	require.NoError(t, err, "load datapath")
	t.Cleanup(func() { env.Close() })
	return env
}

func key(f service.Frontend, slot uint16) maps.ServiceKey {
	addr, fam := maps.AddrFrom(f.Addr)
	k := maps.ServiceKey{Addr: addr, Port: maps.NewBE16(f.Port), Proto: uint8(f.Protocol), Family: fam, Slot: slot}
	if f.InCluster {
		k.Scope = maps.ScopeInternal
	}
	return k
}

func backendValue(b service.Backend, p service.Protocol) maps.Backend {
	addr, fam := maps.AddrFrom(b.Addr)
	st := maps.BackendActive
	if b.State == service.Terminating {
		st = maps.BackendTerminating
	}
	return maps.Backend{Addr: addr, Port: maps.NewBE16(b.Port), Proto: uint8(p), Family: fam, State: st}
}

func frontend(addr string, port uint16, p service.Protocol) service.Frontend {
	return service.Frontend{Addr: netip.MustParseAddr(addr), Port: port, Protocol: p}
}

func kindFrontend(addr string, port uint16, k service.Kind) service.Frontend {
	f := frontend(addr, port, service.TCP)
	f.Kind = k
	return f
}

// lb4 is a LoadBalancer frontend, where every option applies.
var lb4 = kindFrontend("192.0.2.10", 443, service.LoadBalancer)

func with(s service.Service, fn func(*service.Service)) service.Service {
	fn(&s)
	return s
}

func ranges(prefixes ...string) func(*service.Service) {
	return func(s *service.Service) {
		for _, p := range prefixes {
			s.SourceRanges = append(s.SourceRanges, netip.MustParsePrefix(p))
		}
	}
}

func active(addr string, port uint16) service.Backend {
	return service.Backend{Addr: netip.MustParseAddr(addr), Port: port}
}

func terminating(addr string, port uint16) service.Backend {
	b := active(addr, port)
	b.State = service.Terminating
	return b
}

func svc(name string, f service.Frontend, bs ...service.Backend) service.Service {
	return service.Service{Name: name, Frontend: f, Backends: bs}
}

// snapshot is every map's raw content, hex key to hex value, so "nothing
// changed" can be checked byte for byte.
type snapshot map[string]map[string]string

func takeSnapshot(t *testing.T, m *maps.Maps) snapshot {
	t.Helper()
	out := snapshot{}
	for name, mp := range map[string]*ebpf.Map{
		maps.ServicesName:     m.Services,
		maps.BackendsName:     m.Backends,
		maps.SvcMetaName:      m.SvcMeta,
		maps.CTName:           m.CT,
		maps.FragsName:        m.Frags,
		maps.MaglevName:       m.Maglev,
		maps.SrcRangeName:     m.SrcRanges,
		maps.FrontendAddrName: m.FrontendAddrs,
	} {
		entries := map[string]string{}
		var k, v []byte
		it := mp.Iterate()
		for it.Next(&k, &v) {
			entries[hex.EncodeToString(k)] = hex.EncodeToString(v)
		}
		require.NoError(t, it.Err(), "iterate %s", name)
		out[name] = entries
	}
	return out
}

// raw is the service maps decoded.
type raw struct {
	masters  map[maps.ServiceKey]maps.ServiceValue
	slots    map[maps.ServiceKey]maps.ServiceValue
	backends map[uint32]maps.Backend
	meta     map[maps.ServiceKey]maps.ServiceMeta
	// tables are Maglev tables by svc id; ranges source ranges by svc id,
	// sorted.
	tables map[uint32][]uint32
	ranges map[uint32][]netip.Prefix
}

// noID is a master without its svc id, which tests cannot know.
func noID(v maps.ServiceValue) maps.ServiceValue {
	v.SvcID = 0
	return v
}

func readRaw(t *testing.T, m *maps.Maps) raw {
	t.Helper()
	r := raw{
		masters:  map[maps.ServiceKey]maps.ServiceValue{},
		slots:    map[maps.ServiceKey]maps.ServiceValue{},
		backends: map[uint32]maps.Backend{},
		meta:     map[maps.ServiceKey]maps.ServiceMeta{},
		tables:   map[uint32][]uint32{},
		ranges:   map[uint32][]netip.Prefix{},
	}
	var k maps.ServiceKey
	var v maps.ServiceValue
	it := m.Services.Iterate()
	for it.Next(&k, &v) {
		if k.Slot == 0 {
			r.masters[k] = v
		} else {
			r.slots[k] = v
		}
	}
	require.NoError(t, it.Err(), "iterate sp_services")
	var id uint32
	var b maps.Backend
	bit := m.Backends.Iterate()
	for bit.Next(&id, &b) {
		r.backends[id] = b
	}
	require.NoError(t, bit.Err(), "iterate sp_backends")
	var meta maps.ServiceMeta
	mit := m.SvcMeta.Iterate()
	for mit.Next(&k, &meta) {
		r.meta[k] = meta
	}
	require.NoError(t, mit.Err(), "iterate sp_svc_meta")
	var svcID uint32
	value := make([]byte, m.Maglev.ValueSize())
	tit := m.Maglev.Iterate()
	for tit.Next(&svcID, &value) {
		table := make([]uint32, len(value)/4)
		for i := range table {
			table[i] = binary.NativeEndian.Uint32(value[4*i:])
		}
		r.tables[svcID] = table
	}
	require.NoError(t, tit.Err(), "iterate sp_maglev")
	var rk maps.SrcRangeKey
	var one uint8
	rit := m.SrcRanges.Iterate()
	for rit.Next(&rk, &one) {
		r.ranges[rk.SvcID] = append(r.ranges[rk.SvcID], netip.PrefixFrom(rk.Addr.Netip(rk.Family), int(rk.PrefixLen)-64))
	}
	require.NoError(t, rit.Err(), "iterate sp_src_ranges")
	for _, rs := range r.ranges {
		slices.SortFunc(rs, func(a, b netip.Prefix) int {
			return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
		})
	}
	return r
}

// slotIDs returns the backend ids in slots 1..total of f's master.
func (r raw) slotIDs(t *testing.T, f service.Frontend) []uint32 {
	t.Helper()
	mv, ok := r.masters[key(f, 0)]
	require.True(t, ok, "master of %s exists", f)
	var ids []uint32
	for s := uint16(1); s <= mv.Total; s++ {
		v, ok := r.slots[key(f, s)]
		require.True(t, ok, "slot %d of %s exists", s, f)
		ids = append(ids, v.BackendID)
	}
	return ids
}

// checkInvariants asserts what the datapath relies on between any two
// map writes of a finished operation: every master's slots 1..total exist
// and no others; every slot names a backend of the frontend's protocol and
// family, terminating after slot count (and all counted when all are); no backend is
// unnamed; every master has its owner's name and no name is orphaned.
// Every master has its own nonzero svc id; a Maglev master with active
// backends has a table naming only those, and no other table exists;
// source ranges exist only for masters that say they have them.
func checkInvariants(t *testing.T, r raw, when string) {
	t.Helper()
	named := map[uint32]int{}
	bySvcID := map[uint32]maps.ServiceKey{}
	for mk, mv := range r.masters {
		if assert.NotZero(t, mv.SvcID, "%s: master %v has a svc id", when, mk.Addr.Netip(mk.Family)) {
			_, dup := bySvcID[mv.SvcID]
			assert.False(t, dup, "%s: svc id %d is one master's", when, mv.SvcID)
			bySvcID[mv.SvcID] = mk
		}
		active := map[uint32]bool{}
		for s := uint16(1); s <= mv.Count; s++ {
			sk := mk
			sk.Slot = s
			active[r.slots[sk].BackendID] = true
		}
		table, hasTable := r.tables[mv.SvcID]
		wantTable := mv.Flags&maps.SvcFlagMaglev != 0 && mv.Count > 0
		assert.Equal(t, wantTable, hasTable, "%s: master %v (flags %#x, count %d) has a Maglev table exactly when it needs one",
			when, mk.Addr.Netip(mk.Family), mv.Flags, mv.Count)
		for i, id := range table {
			if !active[id] {
				assert.Fail(t, fmt.Sprintf("%s: Maglev slot %d names %d, not an active backend of %v", when, i, id, mk.Addr.Netip(mk.Family)))
				break
			}
		}
		assert.Equal(t, mv.Flags&maps.SvcFlagSourceRanges != 0, len(r.ranges[mv.SvcID]) > 0,
			"%s: master %v has source ranges exactly when its flags say so", when, mk.Addr.Netip(mk.Family))
	}
	for id := range r.tables {
		_, ok := bySvcID[id]
		assert.True(t, ok, "%s: Maglev table %d belongs to a master", when, id)
	}
	for id := range r.ranges {
		_, ok := bySvcID[id]
		assert.True(t, ok, "%s: source ranges of svc id %d belong to a master", when, id)
	}
	for mk, mv := range r.masters {
		assert.LessOrEqual(t, mv.Count, mv.Total, "%s: %s count <= total", when, mk.Addr.Netip(mk.Family))
		assert.Zero(t, mv.BackendID, "%s: master carries no backend id", when)
		terminating := 0
		for s := uint16(1); s <= mv.Total; s++ {
			sk := mk
			sk.Slot = s
			sv, ok := r.slots[sk]
			if !assert.True(t, ok, "%s: slot %d of master %v/%d exists", when, s, mk.Addr.Netip(mk.Family), mk.Port.Uint16()) {
				continue
			}
			assert.Zero(t, sv.Count, "%s: slot %d carries no count", when, s)
			assert.Zero(t, sv.Total, "%s: slot %d carries no total", when, s)
			named[sv.BackendID]++
			b, ok := r.backends[sv.BackendID]
			if !assert.True(t, ok, "%s: backend %d named by slot %d exists in sp_backends", when, sv.BackendID, s) {
				continue
			}
			assert.Equal(t, mk.Proto, b.Proto, "%s: backend %d has its frontend's protocol", when, sv.BackendID)
			assert.Equal(t, mk.Family, b.Family, "%s: backend %d has its frontend's family", when, sv.BackendID)
			// Slots past the count are terminating; when all are (the
			// fallback), the count covers them all.
			if s > mv.Count {
				assert.Equal(t, maps.BackendTerminating, b.State, "%s: backend %d in slot %d (count %d) is terminating", when, sv.BackendID, s, mv.Count)
			}
			if b.State == maps.BackendTerminating {
				terminating++
			}
		}
		if mv.Total > 0 && terminating == int(mv.Total) {
			assert.Equal(t, mv.Total, mv.Count, "%s: %v has only terminating backends, and all take new flows", when, mk.Addr.Netip(mk.Family))
		}
		_, ok := r.meta[mk]
		assert.True(t, ok, "%s: master %v has a name in sp_svc_meta", when, mk.Addr.Netip(mk.Family))
	}
	for sk := range r.slots {
		mk := sk
		mk.Slot = 0
		mv, ok := r.masters[mk]
		assert.True(t, ok && sk.Slot <= mv.Total, "%s: slot %d of %v is within a master's total", when, sk.Slot, sk.Addr.Netip(sk.Family))
	}
	for id := range r.backends {
		assert.NotZero(t, id, "%s: backend id 0 is never used (the datapath reads it as missing)", when)
		assert.Equal(t, 1, named[id], "%s: backend %d is named by exactly one slot", when, id)
	}
	for k := range r.meta {
		_, ok := r.masters[k]
		assert.True(t, ok, "%s: name entry for %v has a master", when, k.Addr.Netip(k.Family))
	}
}

func idsOf(t *testing.T, mgr *service.Manager, f service.Frontend) map[netip.AddrPort]uint32 {
	t.Helper()
	for _, p := range mgr.List() {
		if p.Frontend == f {
			out := map[netip.AddrPort]uint32{}
			for i, b := range p.Backends {
				out[netip.AddrPortFrom(b.Addr, b.Port)] = p.BackendIDs[i]
			}
			return out
		}
	}
	require.FailNow(t, fmt.Sprintf("frontend %s not listed", f), "List has the frontend")
	return nil
}
