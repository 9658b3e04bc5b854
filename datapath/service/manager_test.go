package service_test

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/service"
)

var (
	fe4    = frontend("198.19.0.10", 80, service.TCP)
	fe4udp = frontend("198.19.0.10", 53, service.UDP)
	fe6    = frontend("fd00:5f::10", 443, service.TCP)
)

func TestUpsertWritesMasterSlotsAndBackends(t *testing.T) {
	env := newEnv(t, nil)
	for _, c := range []struct {
		f        service.Frontend
		backends []service.Backend
	}{
		{fe4, []service.Backend{active("198.18.0.11", 8080), terminating("198.18.0.12", 8080), active("198.18.0.13", 8081)}},
		{fe6, []service.Backend{terminating("fd00:5e::11", 8443), active("fd00:5e::12", 8443), active("fd00:5e::13", 8443)}},
	} {
		t.Run(c.f.String(), func(t *testing.T) {
			s := svc("default/web", c.f, c.backends...)
			s.PortName = "http"
			require.NoError(t, env.Services.Upsert(s), "upsert %s", c.f)

			r := readRaw(t, env.DP.Maps)
			checkInvariants(t, r, "after upsert")
			assert.Equal(t, maps.ServiceValue{Count: 2, Total: 3}, noID(r.masters[key(c.f, 0)]), "master holds count=2 active, total=3")

			// Slot order: active backends in given order, then terminating.
			var want []service.Backend
			for _, b := range c.backends {
				if b.State == service.Active {
					want = append(want, b)
				}
			}
			for _, b := range c.backends {
				if b.State == service.Terminating {
					want = append(want, b)
				}
			}
			ids := r.slotIDs(t, c.f)
			require.Len(t, ids, 3, "slots 1..3 exist")
			for i, id := range ids {
				assert.NotZero(t, id, "slot %d names a nonzero id", i+1)
				assert.Equal(t, backendValue(want[i], c.f.Protocol), r.backends[id], "slot %d names backend %s in sp_backends", i+1, want[i])
			}
			_, ok := r.slots[key(c.f, 4)]
			assert.False(t, ok, "no slot past total")
			name, port := r.meta[key(c.f, 0)].Names()
			assert.Equal(t, "default/web", name, "owner name recorded in sp_svc_meta")
			assert.Equal(t, "http", port, "port name recorded in sp_svc_meta")

			listed := idsOf(t, env.Services, c.f)
			for i, b := range want {
				assert.Equal(t, ids[i], listed[netip.AddrPortFrom(b.Addr, b.Port)], "List reports the id slot %d names", i+1)
			}
		})
	}
	assert.Len(t, readRaw(t, env.DP.Maps).backends, 6, "each frontend's backends have their own ids")
}

func TestChangingBackendsReusesAndFreesIDs(t *testing.T) {
	env := newEnv(t, nil)
	b := []service.Backend{active("198.18.0.11", 8080), active("198.18.0.12", 8080), active("198.18.0.13", 8080), active("198.18.0.14", 8080)}
	require.NoError(t, env.Services.Upsert(svc("default/web", fe4, b...)), "upsert 4 backends")
	before := idsOf(t, env.Services, fe4)

	// Keep .12 (now terminating) and .14, drop .11 and .13, add .15.
	next := []service.Backend{terminating("198.18.0.12", 8080), b[3], active("198.18.0.15", 8080)}
	require.NoError(t, env.Services.Upsert(svc("default/web", fe4, next...)), "upsert changed backends")

	r := readRaw(t, env.DP.Maps)
	checkInvariants(t, r, "after change")
	assert.Equal(t, maps.ServiceValue{Count: 2, Total: 3}, noID(r.masters[key(fe4, 0)]), "master shrank to count 2, total 3")
	_, ok := r.slots[key(fe4, 4)]
	assert.False(t, ok, "slot 4, past the new total, is deleted")

	after := idsOf(t, env.Services, fe4)
	ap := func(b service.Backend) netip.AddrPort { return netip.AddrPortFrom(b.Addr, b.Port) }
	assert.Equal(t, before[ap(b[1])], after[ap(b[1])], "a backend that stays (now terminating) keeps its id")
	assert.Equal(t, before[ap(b[3])], after[ap(b[3])], "a backend that stays keeps its id")
	for _, gone := range []service.Backend{b[0], b[2]} {
		_, ok := r.backends[before[ap(gone)]]
		assert.False(t, ok, "id %d of removed backend %s is gone from sp_backends", before[ap(gone)], gone)
	}
	assert.Len(t, r.backends, 3, "sp_backends holds exactly the three current backends")
	assert.Equal(t, []uint32{after[ap(b[3])], after[ap(next[2])], after[ap(b[1])]}, r.slotIDs(t, fe4),
		"slots: actives in order, then the terminating one")
	assert.Equal(t, maps.BackendTerminating, r.backends[after[ap(b[1])]].State, "the kept backend's state changed in place")
}

func TestInvalidInputLeavesMapsUnchanged(t *testing.T) {
	env := newEnv(t, nil)
	good := svc("default/web", fe4, active("198.18.0.11", 8080), terminating("198.18.0.12", 8080))
	require.NoError(t, env.Services.Upsert(good), "upsert a valid service first")
	require.NoError(t, env.Services.Upsert(svc("default/dns", fe4udp, active("198.18.0.21", 53))), "upsert a second valid service")

	withPortName := func(s service.Service, p string) service.Service { s.PortName = p; return s }
	bad := []struct {
		name string
		s    service.Service
		msg  string
	}{
		{"zero frontend port", svc("default/web", frontend("198.19.0.11", 0, service.TCP), active("198.18.0.11", 8080)), "port 0"},
		{"zero backend port", svc("default/web", fe4, active("198.18.0.11", 0)), "port 0"},
		{"invalid frontend address", svc("default/web", service.Frontend{Port: 80, Protocol: service.TCP}, active("198.18.0.11", 8080)), "invalid frontend address"},
		{"frontend address with zone", svc("default/web", frontend("fe80::1%eth0", 80, service.TCP), active("fe80::2", 8080)), "invalid frontend address"},
		{"invalid backend address", svc("default/web", fe4, active("198.18.0.11", 8080), service.Backend{Port: 8080}), "invalid address"},
		{"family mismatch", svc("default/web", fe4, active("198.18.0.11", 8080), active("fd00:5e::11", 8080)), "address family"},
		{"duplicate backend", svc("default/web", fe4, active("198.18.0.11", 8080), terminating("198.18.0.11", 8080)), "twice"},
		{"duplicate backend, IPv4-mapped", svc("default/web", fe4, active("198.18.0.11", 8080), active("::ffff:198.18.0.11", 8080)), "twice"},
		{"SCTP", svc("default/web", frontend("198.19.0.10", 80, service.Protocol(132)), active("198.18.0.11", 8080)), "protocol"},
		{"unknown backend state", svc("default/web", fe4, service.Backend{Addr: netip.MustParseAddr("198.18.0.11"), Port: 8080, State: 7}), "state"},
		{"empty name", svc("", fe4, active("198.18.0.11", 8080)), "empty name"},
		{"name too long", svc(strings.Repeat("n", 128), frontend("198.19.0.12", 80, service.TCP), active("198.18.0.11", 8080)), "longer than"},
		{"port name too long", withPortName(svc("default/web", fe4, active("198.18.0.11", 8080)), strings.Repeat("p", 64)), "longer than"},
		{"frontend owned by another service", svc("default/other", fe4, active("198.18.0.11", 8080)), "already belongs"},
		{"ClusterIP on the unspecified address", svc("default/web", frontend("0.0.0.0", 80, service.TCP)), "only a NodePort or HostPort"},
		{"NodePort on an address", svc("default/web", kindFrontend("198.19.0.11", 80, service.NodePort)), "a NodePort has the unspecified address"},
		{"ExternalLocal on a ClusterIP", with(svc("default/web", fe4), func(s *service.Service) { s.ExternalLocal = true }),
			"ExternalLocal: only for NodePort, ExternalIP and LoadBalancer frontends"},
		{"ExternalLocal on a HostPort", with(svc("default/web", kindFrontend("0.0.0.0", 8080, service.HostPort)), func(s *service.Service) { s.ExternalLocal = true }),
			"ExternalLocal"},
		{"source ranges on a NodePort", with(svc("default/web", kindFrontend("0.0.0.0", 30080, service.NodePort)), ranges("10.0.0.0/8")),
			"SourceRanges: only for LoadBalancer frontends"},
		{"source range of the other family", with(svc("default/web", lb4), ranges("10.0.0.0/8", "fd00::/8")),
			"SourceRanges[1]: fd00::/8 is not of the frontend's address family"},
		{"IPv4-mapped source range", with(svc("default/web", lb4), ranges("::ffff:10.0.0.0/104")), "SourceRanges[0]"},
		{"source range listed twice", with(svc("default/web", lb4), ranges("10.0.0.0/8", "10.1.0.0/8")), "SourceRanges[1]: 10.0.0.0/8 listed twice"},
		{"invalid source range", with(svc("default/web", lb4), func(s *service.Service) { s.SourceRanges = []netip.Prefix{{}} }),
			"SourceRanges[0]: invalid prefix"},
		{"DSR on a ClusterIP", with(svc("default/web", fe4), func(s *service.Service) { s.Mode = service.DSR }), "Mode dsr: only for"},
		{"IPIP dispatch with SNAT", with(svc("default/web", lb4), func(s *service.Service) { s.Dispatch = service.IPIP }),
			"Dispatch ipip: only with Mode dsr or hybrid"},
		{"unknown mode", with(svc("default/web", lb4), func(s *service.Service) { s.Mode = 9 }), "Mode: unknown mode 9"},
		{"unknown dispatch", with(svc("default/web", lb4), func(s *service.Service) { s.Mode, s.Dispatch = service.DSR, 9 }), "Dispatch: unknown"},
		{"unknown kind", svc("default/web", kindFrontend("198.19.0.11", 80, 9)), "unknown frontend kind"},
	}
	for _, c := range bad {
		t.Run(c.name, func(t *testing.T) {
			before := takeSnapshot(t, env.DP.Maps)
			listBefore := env.Services.List()

			err := env.Services.Upsert(c.s)
			assert.ErrorContains(t, err, c.msg, "Upsert refuses %s", c.name)
			assert.Equal(t, before, takeSnapshot(t, env.DP.Maps), "Upsert of %s leaves every map unchanged", c.name)

			// In Apply, the bad service comes after a valid change: nothing of
			// either may be written.
			owners := []string{"default/web", c.s.Name}
			valid := svc("default/web", frontend("198.19.0.99", 80, service.TCP), active("198.18.0.31", 8080))
			err = env.Services.Apply(owners, []service.Service{valid, c.s})
			assert.ErrorContains(t, err, c.msg, "Apply refuses %s", c.name)
			assert.Equal(t, before, takeSnapshot(t, env.DP.Maps), "Apply with %s leaves every map unchanged", c.name)
			assert.Equal(t, listBefore, env.Services.List(), "the manager's view is unchanged after refusing %s", c.name)
		})
	}

	t.Run("frontend listed twice in Apply", func(t *testing.T) {
		before := takeSnapshot(t, env.DP.Maps)
		err := env.Services.Apply([]string{"default/web"}, []service.Service{good, good})
		assert.ErrorContains(t, err, "listed twice", "Apply refuses a frontend listed twice")
		assert.Equal(t, before, takeSnapshot(t, env.DP.Maps), "refused Apply leaves every map unchanged")
	})
	t.Run("service not among owners", func(t *testing.T) {
		before := takeSnapshot(t, env.DP.Maps)
		err := env.Services.Apply([]string{"default/dns"}, []service.Service{good})
		assert.ErrorContains(t, err, "not among the owners", "Apply refuses a service whose name is not an owner")
		assert.Equal(t, before, takeSnapshot(t, env.DP.Maps), "refused Apply leaves every map unchanged")
	})
	checkInvariants(t, readRaw(t, env.DP.Maps), "after all refusals")
}

func TestApplyOwners(t *testing.T) {
	env := newEnv(t, nil)
	a1 := svc("ns/a", frontend("198.19.0.1", 80, service.TCP), active("198.18.0.1", 80), active("198.18.0.2", 80))
	a2 := svc("ns/a", frontend("198.19.0.1", 443, service.TCP), active("198.18.0.1", 443))
	a3 := svc("ns/a", frontend("fd00:5f::1", 80, service.TCP), active("fd00:5e::1", 80))
	b1 := svc("ns/b", frontend("198.19.0.2", 80, service.TCP), active("198.18.0.3", 80), terminating("198.18.0.4", 80))
	require.NoError(t, env.Services.Apply([]string{"ns/a", "ns/b"}, []service.Service{a1, a2, a3, b1}), "apply two owners")
	checkInvariants(t, readRaw(t, env.DP.Maps), "after first apply")
	require.Len(t, env.Services.List(), 4, "four frontends programmed")

	bOnly := func() snapshot {
		// The part of the maps that belongs to b1.
		r := readRaw(t, env.DP.Maps)
		s := snapshot{"slots": {}, "backends": {}}
		s["slots"]["master"] = fmt.Sprint(r.masters[key(b1.Frontend, 0)])
		for i, id := range r.slotIDs(t, b1.Frontend) {
			s["slots"][fmt.Sprint(i+1)] = fmt.Sprint(id)
			s["backends"][fmt.Sprint(id)] = fmt.Sprint(r.backends[id])
		}
		n, p := r.meta[key(b1.Frontend, 0)].Names()
		s["meta"] = map[string]string{"name": n, "port": p}
		return s
	}
	bBefore := bOnly()

	// a keeps a1 with a changed backend; a2 and a3 are stale.
	a1b := svc("ns/a", a1.Frontend, active("198.18.0.1", 80), active("198.18.0.9", 80))
	require.NoError(t, env.Services.Apply([]string{"ns/a"}, []service.Service{a1b}), "re-apply owner a")
	r := readRaw(t, env.DP.Maps)
	checkInvariants(t, r, "after re-apply of a")
	for _, stale := range []service.Service{a2, a3} {
		_, ok := r.masters[key(stale.Frontend, 0)]
		assert.False(t, ok, "stale frontend %s of owner a is removed", stale.Frontend)
		_, ok = r.slots[key(stale.Frontend, 1)]
		assert.False(t, ok, "stale frontend %s's slots are removed", stale.Frontend)
		_, ok = r.meta[key(stale.Frontend, 0)]
		assert.False(t, ok, "stale frontend %s's name is removed", stale.Frontend)
	}
	assert.Len(t, r.backends, 4, "only a1's two and b1's two backends remain")
	assert.Equal(t, bBefore, bOnly(), "owner b's frontend is untouched by applying owner a")
	var names []string
	for _, p := range env.Services.List() {
		names = append(names, p.Name+" "+p.Frontend.String())
	}
	assert.Equal(t, []string{"ns/a 198.19.0.1:80/TCP", "ns/b 198.19.0.2:80/TCP"}, names, "List shows a1 and b1")

	// a may not take b's frontend.
	before := takeSnapshot(t, env.DP.Maps)
	steal := svc("ns/a", b1.Frontend, active("198.18.0.1", 80))
	err := env.Services.Apply([]string{"ns/a"}, []service.Service{a1b, steal})
	assert.ErrorContains(t, err, "already belongs to service ns/b", "a frontend owned by another service is refused")
	assert.Equal(t, before, takeSnapshot(t, env.DP.Maps), "the refused Apply changed nothing")
	err = env.Services.Upsert(steal)
	assert.ErrorContains(t, err, "already belongs to service ns/b", "Upsert of a frontend owned by another service is refused")
	assert.Equal(t, before, takeSnapshot(t, env.DP.Maps), "the refused Upsert changed nothing")

	// An empty Apply of an owner that has nothing is a no-op.
	require.NoError(t, env.Services.Apply([]string{"ns/nobody"}, nil), "apply an owner with no frontends")
	assert.Equal(t, before, takeSnapshot(t, env.DP.Maps), "applying nothing for an unknown owner changed nothing")

	require.NoError(t, env.Services.DeleteOwned([]string{"ns/a"}), "delete owner a")
	r = readRaw(t, env.DP.Maps)
	checkInvariants(t, r, "after DeleteOwned")
	_, ok := r.masters[key(a1.Frontend, 0)]
	assert.False(t, ok, "owner a's last frontend is removed")
	assert.Len(t, r.masters, 1, "only b1's master remains")
	assert.Len(t, r.backends, 2, "only b1's backends remain")
	assert.Len(t, r.meta, 1, "only b1's name remains")
	assert.Equal(t, bBefore, bOnly(), "owner b's frontend is untouched by DeleteOwned(a)")

	require.NoError(t, env.Services.Delete(b1.Frontend), "delete b1")
	require.NoError(t, env.Services.Delete(b1.Frontend), "deleting an absent frontend is not an error")
	r = readRaw(t, env.DP.Maps)
	assert.Empty(t, r.masters, "no masters left")
	assert.Empty(t, r.slots, "no slots left")
	assert.Empty(t, r.backends, "no backends left")
	assert.Empty(t, r.meta, "no names left")
}

func backendsN(prefix string, n int) []service.Backend {
	var out []service.Backend
	sep := "."
	if strings.Contains(prefix, ":") {
		sep = ""
	}
	for i := range n {
		out = append(out, active(fmt.Sprintf("%s%s%d", prefix, sep, i+1), 8080))
	}
	return out
}

func TestCapacity(t *testing.T) {
	t.Run("service map", func(t *testing.T) {
		env := newEnv(t, func(c *loader.Config) { c.ServiceMapSize = 8 })
		require.NoError(t, env.Services.Upsert(svc("ns/a", fe4, backendsN("198.18.0", 3)...)), "4 of 8 service entries")
		before := takeSnapshot(t, env.DP.Maps)

		// 4 more entries fit exactly; 5 do not.
		tooBig := svc("ns/b", fe6, backendsN("fd00:5e::", 4)...)
		err := env.Services.Apply([]string{"ns/b"}, []service.Service{tooBig})
		assert.ErrorContains(t, err, "service map full", "Apply that needs 9 of 8 entries is refused")
		assert.Equal(t, before, takeSnapshot(t, env.DP.Maps), "refused Apply changed nothing")
		err = env.Services.Upsert(tooBig)
		assert.ErrorContains(t, err, "service map full", "Upsert that needs 9 of 8 entries is refused")
		assert.Equal(t, before, takeSnapshot(t, env.DP.Maps), "refused Upsert changed nothing")

		// Growing an existing frontend past the size is refused too.
		err = env.Services.Upsert(svc("ns/a", fe4, backendsN("198.18.0", 8)...))
		assert.ErrorContains(t, err, "service map full", "growing a frontend to 9 entries is refused")
		assert.Equal(t, before, takeSnapshot(t, env.DP.Maps), "refused growth changed nothing")

		require.NoError(t, env.Services.Upsert(svc("ns/b", fe6, backendsN("fd00:5e::", 3)...)), "exactly 8 entries fit")
		checkInvariants(t, readRaw(t, env.DP.Maps), "full map")
	})

	t.Run("backend map", func(t *testing.T) {
		env := newEnv(t, func(c *loader.Config) { c.BackendMapSize = 8 })
		require.NoError(t, env.Services.Upsert(svc("ns/a", fe4, backendsN("198.18.0", 5)...)), "5 of 8 backends")
		before := takeSnapshot(t, env.DP.Maps)

		tooMany := svc("ns/b", fe6, backendsN("fd00:5e::", 4)...)
		err := env.Services.Apply([]string{"ns/b"}, []service.Service{tooMany})
		assert.ErrorContains(t, err, "backend map full", "Apply that needs 9 of 8 backends is refused")
		assert.Equal(t, before, takeSnapshot(t, env.DP.Maps), "refused Apply changed nothing")

		// Two services that fit one by one but not together.
		err = env.Services.Apply([]string{"ns/b", "ns/c"}, []service.Service{
			svc("ns/b", fe6, backendsN("fd00:5e::", 2)...),
			svc("ns/c", fe4udp, backendsN("198.18.1", 2)...),
		})
		assert.ErrorContains(t, err, "backend map full", "Apply whose services together need 9 of 8 backends is refused")
		assert.Equal(t, before, takeSnapshot(t, env.DP.Maps), "refused Apply changed nothing")

		require.NoError(t, env.Services.Upsert(svc("ns/b", fe6, backendsN("fd00:5e::", 3)...)), "exactly 8 backends fit")
		checkInvariants(t, readRaw(t, env.DP.Maps), "full map")
	})

	// Replacing one owner's frontend by another of the same size fits at
	// the end, so the capacity check passes; the writes must then not run
	// out of room half way. Either outcome is acceptable: success with
	// the new layout, or an error with nothing changed.
	t.Run("replacing a frontend in a nearly full service map", func(t *testing.T) {
		env := newEnv(t, func(c *loader.Config) { c.ServiceMapSize = 8 })
		old := svc("ns/a", fe4, backendsN("198.18.0", 5)...)
		require.NoError(t, env.Services.Apply([]string{"ns/a"}, []service.Service{old}), "6 of 8 service entries")
		before := takeSnapshot(t, env.DP.Maps)

		repl := svc("ns/a", fe6, backendsN("fd00:5e::", 5)...)
		err := env.Services.Apply([]string{"ns/a"}, []service.Service{repl})
		r := readRaw(t, env.DP.Maps)
		checkInvariants(t, r, "after replacing apply")
		if err != nil {
			assert.Equal(t, before, takeSnapshot(t, env.DP.Maps), "an Apply that fails (%v) must leave the maps unchanged", err)
			return
		}
		_, ok := r.masters[key(fe6, 0)]
		assert.True(t, ok, "the new frontend is programmed")
		assert.Len(t, r.masters, 1, "the old frontend is gone")
	})
}

func TestRestartListsSameServices(t *testing.T) {
	env := newEnv(t, nil)
	s1 := svc("ns/a", fe4, active("198.18.0.1", 80), terminating("198.18.0.2", 80), active("198.18.0.3", 80))
	s1.PortName = "http"
	s2 := svc("ns/b", fe6, terminating("fd00:5e::1", 443))
	s2.PortName = "https"
	s3 := svc("ns/b", fe4udp, active("::ffff:198.18.0.4", 53))
	mgr := env.Services
	for _, s := range []service.Service{s1, s2, s3} {
		require.NoError(t, mgr.Upsert(s), "upsert %s", s.Frontend)
	}
	// Churn so that live ids are not simply 1..n.
	require.NoError(t, mgr.Upsert(svc("ns/a", fe4, active("198.18.0.9", 80))), "replace s1's backends")
	require.NoError(t, mgr.Upsert(s1), "restore s1")
	before := takeSnapshot(t, env.DP.Maps)
	want := mgr.List()

	mgr2, err := service.NewManager(env.DP.Maps)
	require.NoError(t, err, "second manager over the same maps")
	assert.Equal(t, want, mgr2.List(), "a restarted manager lists the same services, states, names and ids")
	assert.Equal(t, before, takeSnapshot(t, env.DP.Maps), "reading consistent maps changes nothing")
	for _, p := range mgr2.List() {
		if p.Frontend == fe4udp {
			assert.Equal(t, netip.MustParseAddr("198.18.0.4"), p.Backends[0].Addr, "an IPv4-mapped backend is listed as IPv4")
		}
	}

	live := map[uint32]bool{}
	for _, p := range want {
		for _, id := range p.BackendIDs {
			live[id] = true
		}
	}
	s4 := svc("ns/c", frontend("198.19.0.50", 80, service.TCP), backendsN("198.18.5", 10)...)
	require.NoError(t, mgr2.Upsert(s4), "restarted manager programs a new service")
	for _, id := range idsOf(t, mgr2, s4.Frontend) {
		assert.False(t, live[id], "new backend id %d does not reuse a live id", id)
	}
	r := readRaw(t, env.DP.Maps)
	checkInvariants(t, r, "after restart and upsert")
	assert.Len(t, r.backends, 15, "5 earlier backends and 10 new ones")

	// The restarted manager keeps existing ids when it changes a service.
	s1b := s1
	s1b.Backends = append(slices.Clone(s1.Backends), active("198.18.0.7", 80))
	require.NoError(t, mgr2.Upsert(s1b), "restarted manager changes s1")
	oldIDs := map[netip.AddrPort]uint32{}
	for _, p := range want {
		if p.Frontend == fe4 {
			for i, b := range p.Backends {
				oldIDs[netip.AddrPortFrom(b.Addr, b.Port)] = p.BackendIDs[i]
			}
		}
	}
	newIDs := idsOf(t, mgr2, fe4)
	for ap, id := range oldIDs {
		assert.Equal(t, id, newIDs[ap], "backend %s keeps id %d across the restart", ap, id)
	}
}

// After a restart whose highest live id is the last the backend map has
// room for, allocation must wrap to 1 rather than hand out an id past the
// map size, which defeats the "backend map full" check.
func TestRestartAllocatesWithinBackendMapSize(t *testing.T) {
	const size = 4
	env := newEnv(t, func(c *loader.Config) { c.BackendMapSize = size })
	require.NoError(t, env.Services.Upsert(svc("ns/a", fe4, backendsN("198.18.0", size)...)), "ids 1..4")
	last := backendsN("198.18.0", size)[size-1]
	require.NoError(t, env.Services.Upsert(svc("ns/a", fe4, last)), "keep only the backend with id 4")
	require.Equal(t, uint32(size), idsOf(t, env.Services, fe4)[netip.AddrPortFrom(last.Addr, last.Port)], "the kept backend has the highest id")

	mgr, err := service.NewManager(env.DP.Maps)
	require.NoError(t, err, "restart")
	require.NoError(t, mgr.Upsert(svc("ns/b", fe6, backendsN("fd00:5e::", size-1)...)), "fill the backend map exactly")
	for _, p := range mgr.List() {
		for _, id := range p.BackendIDs {
			assert.True(t, id >= 1 && id <= size, "backend id %d is within 1..%d (BackendMapSize)", id, size)
		}
	}
	before := takeSnapshot(t, env.DP.Maps)
	err = mgr.Upsert(svc("ns/c", fe4udp, active("198.18.9.1", 53)))
	assert.ErrorContains(t, err, "backend map full", "a fifth backend in a map of four is refused up front")
	assert.Equal(t, before, takeSnapshot(t, env.DP.Maps), "the refused upsert changed nothing")
	checkInvariants(t, readRaw(t, env.DP.Maps), "after refused upsert")
}

func TestNewManagerRemovesStrayEntries(t *testing.T) {
	env := newEnv(t, nil)
	m := env.DP.Maps
	s1 := svc("ns/a", fe4, active("198.18.0.1", 80), terminating("198.18.0.2", 80))
	s2 := svc("ns/b", fe6, active("fd00:5e::1", 443))
	s2.Maglev = true
	s3 := svc("ns/b", lb4, active("198.18.0.6", 443))
	s3.SourceRanges = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	for _, s := range []service.Service{s1, s2, s3} {
		require.NoError(t, env.Services.Upsert(s), "upsert %s", s.Frontend)
	}
	want := takeSnapshot(t, m)
	wantList := env.Services.List()
	r := readRaw(t, m)
	s1ID, s2ID, s3ID := r.masters[key(fe4, 0)].SvcID, r.masters[key(fe6, 0)].SvcID, r.masters[key(lb4, 0)].SvcID

	// What an interrupted update leaves behind.
	put := func(mp interface{ Put(k, v any) error }, k, v any, what string) {
		require.NoError(t, mp.Put(k, v), "write stray %s", what)
	}
	put(m.Backends, uint32(100), backendValue(active("198.18.0.3", 80), service.TCP), "backend named by a stray slot")
	put(m.Services, key(fe4, 3), maps.ServiceValue{BackendID: 100}, "slot past the master's total")
	put(m.Backends, uint32(200), backendValue(active("198.18.0.4", 80), service.TCP), "backend no slot names")
	gone := frontend("198.19.0.77", 80, service.TCP)
	meta, err := maps.NewServiceMeta("ns/gone", "")
	require.NoError(t, err, "build a name")
	put(m.SvcMeta, key(gone, 0), meta, "name without a master")
	put(m.Backends, uint32(300), backendValue(active("198.18.0.5", 80), service.TCP), "backend of a removed frontend")
	put(m.Services, key(gone, 1), maps.ServiceValue{BackendID: 300}, "slot of a frontend whose master was removed")
	table := make([]byte, m.Maglev.ValueSize())
	put(m.Maglev, s2ID+100, table, "table of a removed frontend")
	put(m.Maglev, s1ID, table, "table of a frontend without Maglev")
	rangeOf := func(id uint32, p string) maps.SrcRangeKey {
		pr := netip.MustParsePrefix(p)
		addr, fam := maps.AddrFrom(pr.Addr())
		return maps.SrcRangeKey{PrefixLen: uint32(64 + pr.Bits()), SvcID: id, Family: fam, Addr: addr}
	}
	put(m.SrcRanges, rangeOf(s3ID+100, "10.0.0.0/8"), uint8(1), "source range of a removed frontend")
	put(m.SrcRanges, rangeOf(s2ID, "fd00::/8"), uint8(1), "source range of a frontend without ranges")
	require.NotEqual(t, want, takeSnapshot(t, m), "the strays are in the maps")

	mgr, err := service.NewManager(m)
	require.NoError(t, err, "new manager over maps with strays")
	assert.Equal(t, want, takeSnapshot(t, m), "exactly the stray entries are removed, the rest is byte for byte as before")
	assert.Equal(t, wantList, mgr.List(), "the recovered manager lists the consistent services")
	checkInvariants(t, readRaw(t, m), "after recovery")

	// Ids past the strays are not handed out while in use, and the stray
	// ids are free again.
	require.NoError(t, mgr.Upsert(svc("ns/c", fe4udp, backendsN("198.18.1", 3)...)), "upsert after recovery")
	checkInvariants(t, readRaw(t, m), "after upsert following recovery")
}

// model is what the maps should hold after a sequence of operations.
type model map[service.Frontend]service.Service

func (m model) list() []service.Service {
	var out []service.Service
	for _, s := range m {
		ordered := slices.Clone(s.Backends)
		sort.SliceStable(ordered, func(i, j int) bool { return ordered[i].State < ordered[j].State })
		s.Backends = ordered
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Name != out[j].Name {
			return out[i].Name < out[j].Name
		}
		if c := out[i].Frontend.Addr.Compare(out[j].Frontend.Addr); c != 0 {
			return c < 0
		}
		if out[i].Frontend.Port != out[j].Frontend.Port {
			return out[i].Frontend.Port < out[j].Frontend.Port
		}
		return out[i].Frontend.Protocol < out[j].Frontend.Protocol
	})
	return out
}

// Random upserts, deletes and applies; after each, the raw maps satisfy
// the datapath's invariants, match a model, and backends that stay keep
// their ids.
func TestRandomOperationsKeepInvariants(t *testing.T) {
	env := newEnv(t, func(c *loader.Config) { c.ServiceMapSize = 256; c.BackendMapSize = 64 })
	rng := rand.New(rand.NewPCG(20260522, 1))
	frontends := []service.Frontend{
		frontend("198.19.0.1", 80, service.TCP),
		frontend("198.19.0.1", 80, service.UDP),
		frontend("198.19.0.2", 443, service.TCP),
		frontend("fd00:5f::1", 80, service.TCP),
		frontend("fd00:5f::2", 53, service.UDP),
		kindFrontend("192.0.2.10", 443, service.LoadBalancer),
	}
	owner := func(i int) string { return fmt.Sprintf("ns/svc%d", i%3) }
	rangePool := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("172.16.0.0/12"), netip.MustParsePrefix("192.168.0.0/16")}
	pool := func(f service.Frontend) []netip.Addr {
		var out []netip.Addr
		for i := range 8 {
			if f.Addr.Is4() {
				out = append(out, netip.AddrFrom4([4]byte{198, 18, 0, byte(i + 1)}))
			} else {
				out = append(out, netip.MustParseAddr(fmt.Sprintf("fd00:5e::%d", i+1)))
			}
		}
		return out
	}
	randomService := func(i int) service.Service {
		f := frontends[i]
		addrs := pool(f)
		rng.Shuffle(len(addrs), func(a, b int) { addrs[a], addrs[b] = addrs[b], addrs[a] })
		n := 1 + rng.IntN(5)
		s := svc(owner(i), f)
		for _, a := range addrs[:n] {
			b := service.Backend{Addr: a, Port: uint16(8080 + rng.IntN(2))}
			if rng.IntN(3) == 0 {
				b.State = service.Terminating
			}
			s.Backends = append(s.Backends, b)
		}
		s.Maglev = rng.IntN(2) == 0
		if f.Kind == service.LoadBalancer {
			s.ExternalLocal = rng.IntN(2) == 0
			s.Mode = service.Mode(rng.IntN(3))
			if s.Mode != service.SNAT && rng.IntN(2) == 0 {
				s.Dispatch = service.IPIP
			}
			for _, r := range rangePool {
				if rng.IntN(2) == 0 {
					s.SourceRanges = append(s.SourceRanges, r)
				}
			}
		}
		return s
	}

	want := model{}
	ids := map[service.Frontend]map[netip.AddrPort]uint32{}
	for step := range 200 {
		var what string
		switch op := rng.IntN(10); {
		case op < 6:
			i := rng.IntN(len(frontends))
			s := randomService(i)
			what = fmt.Sprintf("step %d: upsert %s with %v", step, s.Frontend, s.Backends)
			require.NoError(t, env.Services.Upsert(s), what)
			want[s.Frontend] = s
		case op < 8:
			i := rng.IntN(len(frontends))
			what = fmt.Sprintf("step %d: delete %s", step, frontends[i])
			require.NoError(t, env.Services.Delete(frontends[i]), what)
			delete(want, frontends[i])
		default:
			// Apply one owner: a random subset of its frontends.
			o := owner(rng.IntN(3))
			var services []service.Service
			for i, f := range frontends {
				if owner(i) == o {
					delete(want, f)
					if rng.IntN(2) == 0 {
						s := randomService(i)
						services = append(services, s)
						want[f] = s
					}
				}
			}
			what = fmt.Sprintf("step %d: apply %s with %d frontends", step, o, len(services))
			require.NoError(t, env.Services.Apply([]string{o}, services), what)
		}

		checkInvariants(t, readRaw(t, env.DP.Maps), what)
		got := env.Services.List()
		var gotServices []service.Service
		for _, p := range got {
			gotServices = append(gotServices, p.Service)
		}
		require.Equal(t, want.list(), gotServices, "%s: List matches the model", what)

		next := map[service.Frontend]map[netip.AddrPort]uint32{}
		for _, p := range got {
			next[p.Frontend] = map[netip.AddrPort]uint32{}
			for i, b := range p.Backends {
				ap := netip.AddrPortFrom(b.Addr, b.Port)
				next[p.Frontend][ap] = p.BackendIDs[i]
				if old, ok := ids[p.Frontend][ap]; ok {
					assert.Equal(t, old, p.BackendIDs[i], "%s: backend %s of %s keeps its id", what, ap, p.Frontend)
				}
			}
		}
		ids = next
		if t.Failed() {
			t.FailNow()
		}
	}
	mgr, err := service.NewManager(env.DP.Maps)
	require.NoError(t, err, "restart after the random sequence")
	assert.Equal(t, env.Services.List(), mgr.List(), "a restarted manager reads back the same state")
}

// sp_frontend_addrs holds each frontend address once while any frontend
// has it, never NodePort's all-zero one, and a new manager repairs it.
func TestFrontendAddressesFollowFrontends(t *testing.T) {
	env := newEnv(t, nil)
	m := env.DP.Maps
	addrs := func() []netip.Addr {
		var out []netip.Addr
		var k maps.NodeAddrKey
		var v uint8
		it := m.FrontendAddrs.Iterate()
		for it.Next(&k, &v) {
			out = append(out, k.Addr.Netip(k.Family))
		}
		require.NoError(t, it.Err(), "walk sp_frontend_addrs")
		slices.SortFunc(out, netip.Addr.Compare)
		return out
	}
	vip4, vip6 := fe4.Addr, fe6.Addr
	np := kindFrontend("0.0.0.0", 30080, service.NodePort)
	for _, f := range []service.Frontend{fe4, fe4udp, fe6, np} {
		b := active("198.18.0.11", 8080)
		if f.Addr.Is6() {
			b = active("fd00:5e::11", 8080)
		}
		require.NoError(t, env.Services.Upsert(svc("default/web", f, b)), "upsert %s", f)
	}
	assert.Equal(t, []netip.Addr{vip4, vip6}, addrs(), "one entry per frontend address; none for the NodePort")

	require.NoError(t, env.Services.Delete(fe4), "delete %s", fe4)
	assert.Equal(t, []netip.Addr{vip4, vip6}, addrs(), "the address stays while %s has it", fe4udp)
	require.NoError(t, env.Services.Delete(fe4udp), "delete %s", fe4udp)
	assert.Equal(t, []netip.Addr{vip6}, addrs(), "the address goes with its last frontend")

	stale, _ := maps.AddrFrom(netip.MustParseAddr("198.19.9.9"))
	require.NoError(t, m.FrontendAddrs.Put(maps.NodeAddrKey{Addr: stale, Family: maps.IPv4}, uint8(1)), "plant a stale address")
	fk, fam := maps.AddrFrom(vip6)
	require.NoError(t, m.FrontendAddrs.Delete(maps.NodeAddrKey{Addr: fk, Family: fam}), "lose a live one")
	mgr, err := service.NewManager(m)
	require.NoError(t, err, "a new manager over the same maps")
	assert.Equal(t, []netip.Addr{vip6}, addrs(), "the new manager repaired sp_frontend_addrs")
	require.NoError(t, mgr.Delete(fe6), "delete %s through it", fe6)
	assert.Empty(t, addrs(), "and it counts the addresses it found")
}

// Applying what the maps hold writes nothing, so an agent's full sync of
// unchanged Services costs no map write; any change of what a frontend
// programs is written.
func TestApplyUnchangedWritesNothing(t *testing.T) {
	env := newEnv(t, nil)
	mgr := env.Services
	base := with(svc("ns/a", lb4, active("198.18.0.1", 80), active("198.18.0.2", 80)),
		ranges("10.0.0.0/8", "192.168.0.0/16"))
	base.Maglev, base.Mode = true, service.DSR
	apply := func(s service.Service) uint64 {
		t.Helper()
		before := mgr.Changes()
		require.NoError(t, mgr.Apply([]string{"ns/a"}, []service.Service{s}), "apply %s", s.Frontend)
		return mgr.Changes() - before
	}
	require.Equal(t, uint64(1), apply(base), "the first apply writes the frontend")
	snap := takeSnapshot(t, env.DP.Maps)
	for _, c := range []struct {
		name string
		mod  func(*service.Service)
		same bool
	}{
		{"the same again", func(*service.Service) {}, true},
		{"backends in another order", func(s *service.Service) { slices.Reverse(s.Backends) }, true},
		{"ranges in another order, unmasked", func(s *service.Service) {
			s.SourceRanges = []netip.Prefix{netip.MustParsePrefix("192.168.1.1/16"), netip.MustParsePrefix("10.0.0.0/8")}
		}, true},
		{"a backend less", func(s *service.Service) { s.Backends = s.Backends[:1] }, false},
		{"a backend terminating", func(s *service.Service) { s.Backends[1].State = service.Terminating }, false},
		{"a port name", func(s *service.Service) { s.PortName = "x" }, false},
		{"affinity", func(s *service.Service) { s.Affinity = time.Minute }, false},
		{"a range less", func(s *service.Service) { s.SourceRanges = s.SourceRanges[:1] }, false},
		{"Maglev off", func(s *service.Service) { s.Maglev = false }, false},
		{"another mode", func(s *service.Service) { s.Mode = service.Hybrid }, false},
		{"another dispatch", func(s *service.Service) { s.Dispatch = service.IPIP }, false},
		{"externalTrafficPolicy Local", func(s *service.Service) { s.ExternalLocal = true }, false},
	} {
		s := base
		s.Backends, s.SourceRanges = slices.Clone(base.Backends), slices.Clone(base.SourceRanges)
		c.mod(&s)
		if c.same {
			assert.Zero(t, apply(s), "%s: nothing written", c.name)
			assert.Equal(t, snap, takeSnapshot(t, env.DP.Maps), "%s: maps untouched", c.name)
			continue
		}
		assert.Equal(t, uint64(1), apply(s), "%s: written", c.name)
		require.Equal(t, uint64(1), apply(base), "%s: and back", c.name)
	}
	before := mgr.Changes()
	require.NoError(t, mgr.Apply([]string{"ns/a"}, nil), "remove")
	assert.Equal(t, uint64(1), mgr.Changes()-before, "a removal counts")
}

// One Apply of many owners names the ones it changed, so the agent's
// batched sync counts the Services it wrote as its per-Service applies did.
func TestChangedOwnersAndTotals(t *testing.T) {
	env := newEnv(t, nil)
	mgr := env.Services
	a := svc("ns/a", frontend("10.96.0.1", 80, service.TCP), active("198.18.0.1", 80))
	b := svc("ns/b", frontend("10.96.0.2", 80, service.TCP), active("198.18.0.2", 80))
	require.NoError(t, mgr.Apply([]string{"ns/a", "ns/b"}, []service.Service{a, b}), "apply both")
	assert.Equal(t, []string{"ns/a", "ns/b"}, mgr.TakeChanged(), "both written")
	assert.Empty(t, mgr.TakeChanged(), "taken")
	assert.ElementsMatch(t, []string{"ns/a", "ns/b"}, mgr.Owners(), "the owners")
	owners, frontends, backends := mgr.Totals()
	assert.Equal(t, []int{2, 2, 2}, []int{owners, frontends, backends}, "owners, frontends, backends")

	b.Backends = []service.Backend{active("198.18.0.3", 80)}
	require.NoError(t, mgr.Apply([]string{"ns/a", "ns/b", "ns/c"}, []service.Service{a, b}), "change b only")
	assert.Equal(t, []string{"ns/b"}, mgr.TakeChanged(), "a unchanged, c owns nothing")

	require.NoError(t, mgr.Apply([]string{"ns/a"}, nil), "remove a")
	assert.Equal(t, []string{"ns/a"}, mgr.TakeChanged(), "a removal names its owner")
	assert.Equal(t, []string{"ns/b"}, mgr.Owners(), "a removed owner owns nothing")
}
