package service_test

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maglev"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/service"
)

// Every option reaches the master's flags, and List gives back what was
// programmed (source ranges masked and sorted).
func TestOptionsRoundTrip(t *testing.T) {
	env := newEnv(t, nil)
	be4, be6 := active("198.18.0.11", 8080), active("fd00:5e::11", 8080)
	for _, c := range []struct {
		name  string
		s     service.Service
		flags uint16
		// listed differs from s where the manager normalizes.
		listed func(*service.Service)
	}{
		{"ClusterIP, Maglev", with(svc("ns/a", fe4, be4), func(s *service.Service) { s.Maglev = true }), maps.SvcFlagMaglev, nil},
		{"ClusterIP, internalTrafficPolicy Local", with(svc("ns/a", fe4, be4), func(s *service.Service) { s.InternalLocal = true }),
			maps.SvcFlagITPLocal, nil},
		{"LoadBalancer, in-cluster entry (its own scope in the key)",
			svc("ns/a", service.Frontend{Addr: lb4.Addr, Port: lb4.Port, Protocol: lb4.Protocol, Kind: service.LoadBalancer, InCluster: true}, be4),
			maps.SvcFlagLoadBalancer, nil},
		{"NodePort, externalTrafficPolicy Local",
			with(svc("ns/a", kindFrontend("0.0.0.0", 30080, service.NodePort), be4), func(s *service.Service) { s.ExternalLocal = true }),
			maps.SvcFlagNodePort | maps.SvcFlagETPLocal, nil},
		{"LoadBalancer, source ranges unsorted and unmasked",
			with(svc("ns/a", lb4, be4), ranges("192.168.1.7/24", "10.0.0.0/8")),
			maps.SvcFlagLoadBalancer | maps.SvcFlagSourceRanges,
			ranges("10.0.0.0/8", "192.168.1.0/24")},
		{"LoadBalancer, IPv6 source range",
			with(svc("ns/a", kindFrontend("2001:db8::10", 443, service.LoadBalancer), be6), ranges("fd00::/8")),
			maps.SvcFlagLoadBalancer | maps.SvcFlagSourceRanges, nil},
		{"LoadBalancer, DSR with the option",
			with(svc("ns/a", lb4, be4), func(s *service.Service) { s.Mode = service.DSR }),
			maps.SvcFlagLoadBalancer | maps.SvcFlagDSR, nil},
		{"ExternalIP, hybrid over IPIP",
			with(svc("ns/a", kindFrontend("192.0.2.20", 80, service.ExternalIP), be4), func(s *service.Service) {
				s.Mode, s.Dispatch = service.Hybrid, service.IPIP
			}),
			maps.SvcFlagExternalIP | maps.SvcFlagDSR | maps.SvcFlagDSRHybrid | maps.SvcFlagDSRIPIP, nil},
		{"HostPort on every node address", svc("pod:ns/p", kindFrontend("0.0.0.0", 8080, service.HostPort), be4), maps.SvcFlagHostPort, nil},
		{"HostPort on a hostIP", svc("pod:ns/p", kindFrontend("fd00:5e::1", 8080, service.HostPort), be6), maps.SvcFlagHostPort, nil},
		{"NodePort, everything at once",
			with(svc("ns/a", kindFrontend("::", 30443, service.NodePort), be6), func(s *service.Service) {
				s.ExternalLocal, s.Maglev, s.Mode, s.Dispatch = true, true, service.DSR, service.IPIP
			}),
			maps.SvcFlagNodePort | maps.SvcFlagETPLocal | maps.SvcFlagMaglev | maps.SvcFlagDSR | maps.SvcFlagDSRIPIP, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			require.NoError(t, env.Reset(), "reset maps")
			require.NoError(t, env.Services.Upsert(c.s), "upsert")
			r := readRaw(t, env.DP.Maps)
			checkInvariants(t, r, "after upsert")
			assert.Equal(t, c.flags, r.masters[key(c.s.Frontend, 0)].Flags, "master flags %#x", c.flags)

			want := c.s
			if c.listed != nil {
				want.SourceRanges = nil
				c.listed(&want)
			}
			list := env.Services.List()
			require.Len(t, list, 1, "one frontend listed")
			assert.Equal(t, want, list[0].Service, "List gives back the options")

			mgr, err := service.NewManager(env.DP.Maps)
			require.NoError(t, err, "restart")
			assert.Equal(t, list, mgr.List(), "a restarted manager lists the same options")
		})
	}
}

// expectedTable is the contract with the datapath and other nodes: the
// table is maglev.Build over the active backends' "addr:port", sorted,
// holding their backend ids.
func expectedTable(t *testing.T, size int, ids map[netip.AddrPort]uint32, actives []service.Backend) []uint32 {
	t.Helper()
	var names []string
	byName := map[string]uint32{}
	for _, b := range actives {
		ap := netip.AddrPortFrom(b.Addr, b.Port)
		names = append(names, ap.String())
		byName[ap.String()] = ids[ap]
	}
	slices.Sort(names)
	slots, err := maglev.Build(names, size)
	require.NoError(t, err, "build the expected table")
	out := make([]uint32, len(slots))
	for i, b := range slots {
		out[i] = byName[names[b]]
	}
	return out
}

func svcID(t *testing.T, m *maps.Maps, f service.Frontend) uint32 {
	t.Helper()
	id := readRaw(t, m).masters[key(f, 0)].SvcID
	require.NotZero(t, id, "%s has a svc id", f)
	return id
}

// Each step reprograms one Maglev frontend; the table must be the one its
// active backends give, under the frontend's one svc id, or absent.
func TestMaglevTable(t *testing.T) {
	env := newEnv(t, func(c *loader.Config) { c.MaglevTableSize = 251 })
	b := backendsN("198.18.0", 5)
	maglevSvc := func(bs ...service.Backend) service.Service {
		return with(svc("ns/a", fe4, bs...), func(s *service.Service) { s.Maglev = true })
	}
	var id uint32
	for _, step := range []struct {
		name    string
		s       service.Service
		actives []service.Backend // nil: no table
	}{
		{"three active, one terminating", maglevSvc(b[0], b[1], b[2], terminating("198.18.0.4", 8080)), b[:3]},
		{"reordered, same backends", maglevSvc(b[2], terminating("198.18.0.4", 8080), b[0], b[1]), b[:3]},
		{"one more active", maglevSvc(b[0], b[1], b[2], b[4]), []service.Backend{b[0], b[1], b[2], b[4]}},
		{"one active left", maglevSvc(b[1]), b[1:2]},
		// The fallback: with none active, the terminating ones are the table.
		{"only terminating backends", maglevSvc(terminating("198.18.0.2", 8080)), []service.Backend{terminating("198.18.0.2", 8080)}},
		{"active again", maglevSvc(b[1], b[3]), []service.Backend{b[1], b[3]}},
		{"Maglev off", svc("ns/a", fe4, b[1], b[3]), nil},
		{"Maglev on", maglevSvc(b[1], b[3]), []service.Backend{b[1], b[3]}},
	} {
		require.NoError(t, env.Services.Upsert(step.s), "%s: upsert", step.name)
		r := readRaw(t, env.DP.Maps)
		checkInvariants(t, r, step.name)
		got := svcID(t, env.DP.Maps, fe4)
		if id == 0 {
			id = got
		}
		assert.Equal(t, id, got, "%s: the frontend keeps its svc id", step.name)
		if step.actives == nil {
			assert.Empty(t, r.tables, "%s: no table", step.name)
			continue
		}
		want := expectedTable(t, 251, idsOf(t, env.Services, fe4), step.actives)
		assert.Equal(t, map[uint32][]uint32{id: want}, r.tables, "%s: the table of the active backends, by name", step.name)
	}
	require.NoError(t, env.Services.Delete(fe4), "delete")
	assert.Empty(t, readRaw(t, env.DP.Maps).tables, "a deleted frontend's table is gone")

	// A table smaller than the active backends is refused before any write.
	before := takeSnapshot(t, env.DP.Maps)
	err := env.Services.Upsert(maglevSvc(backendsN("198.18.1", 252)...))
	assert.ErrorContains(t, err, "Maglev: 252 backends do not fit a maglev table of 251 slots", "too many backends for the table")
	assert.Equal(t, before, takeSnapshot(t, env.DP.Maps), "the refused upsert changed nothing")
}

// Two nodes (two managers over their own maps) whose backends got other
// ids build tables that pick the same backend for every slot.
func TestMaglevTableIsTheSameOnEveryNode(t *testing.T) {
	a := newEnv(t, nil)
	b := newEnv(t, nil)
	backends := backendsN("198.18.0", 4)
	require.NoError(t, b.Services.Upsert(svc("ns/other", fe6, backendsN("fd00:5e::", 7)...)), "node b uses ids first")
	s := with(svc("ns/a", fe4, backends...), func(s *service.Service) { s.Maglev = true })
	require.NoError(t, a.Services.Upsert(s), "upsert on node a")
	s.Backends = slices.Clone(backends)
	slices.Reverse(s.Backends)
	require.NoError(t, b.Services.Upsert(s), "upsert on node b, backends in another order")

	names := func(m *maps.Maps, mgr *service.Manager) []string {
		r := readRaw(t, m)
		table := r.tables[svcID(t, m, fe4)]
		byID := map[uint32]string{}
		for ap, id := range idsOf(t, mgr, fe4) {
			byID[id] = ap.String()
		}
		out := make([]string, len(table))
		for i, id := range table {
			out[i] = byID[id]
		}
		return out
	}
	ta, tb := names(a.DP.Maps, a.Services), names(b.DP.Maps, b.Services)
	require.Len(t, ta, maglev.Small, "a full table on node a")
	assert.NotEqual(t, idsOf(t, a.Services, fe4), idsOf(t, b.Services, fe4), "the nodes gave the backends other ids")
	assert.Equal(t, ta, tb, "every slot names the same backend on both nodes")
}

// Source ranges follow the service exactly: added before the master says
// so, stale ones deleted, all gone with the frontend.
func TestSourceRanges(t *testing.T) {
	env := newEnv(t, nil)
	lb6 := kindFrontend("2001:db8::10", 443, service.LoadBalancer)
	steps := []struct {
		name   string
		s      service.Service
		want   map[service.Frontend][]string
		remove service.Frontend
	}{
		{name: "two ranges", s: with(svc("ns/a", lb4, active("198.18.0.1", 443)), ranges("10.0.0.0/8", "192.168.1.0/24")),
			want: map[service.Frontend][]string{lb4: {"10.0.0.0/8", "192.168.1.0/24"}}},
		{name: "an IPv6 frontend with its own", s: with(svc("ns/a", lb6, active("fd00:5e::1", 443)), ranges("2001:db8:1::/48")),
			want: map[service.Frontend][]string{lb4: {"10.0.0.0/8", "192.168.1.0/24"}, lb6: {"2001:db8:1::/48"}}},
		{name: "one kept, one replaced, one host", s: with(svc("ns/a", lb4, active("198.18.0.1", 443)), ranges("172.16.0.0/12", "192.168.1.0/24", "203.0.113.9/32")),
			want: map[service.Frontend][]string{lb4: {"172.16.0.0/12", "192.168.1.0/24", "203.0.113.9/32"}, lb6: {"2001:db8:1::/48"}}},
		{name: "none: everyone may connect", s: svc("ns/a", lb4, active("198.18.0.1", 443)),
			want: map[service.Frontend][]string{lb6: {"2001:db8:1::/48"}}},
		{name: "frontend deleted", remove: lb6, want: map[service.Frontend][]string{}},
	}
	for _, st := range steps {
		if st.remove.Addr.IsValid() {
			require.NoError(t, env.Services.Delete(st.remove), "%s: delete", st.name)
		} else {
			require.NoError(t, env.Services.Upsert(st.s), "%s: upsert", st.name)
		}
		r := readRaw(t, env.DP.Maps)
		checkInvariants(t, r, st.name)
		got := map[service.Frontend][]string{}
		for _, f := range []service.Frontend{lb4, lb6} {
			mv, ok := r.masters[key(f, 0)]
			if !ok {
				continue
			}
			for _, p := range r.ranges[mv.SvcID] {
				got[f] = append(got[f], p.String())
			}
		}
		assert.Equal(t, st.want, got, "%s: sp_src_ranges holds exactly the ranges of each frontend", st.name)
	}
}

// Svc ids are unique, kept by a frontend for its life, read back by a
// restarted manager, and not handed out again right after a delete.
func TestSvcIDs(t *testing.T) {
	env := newEnv(t, nil)
	fronts := []service.Frontend{fe4, fe4udp, fe6, lb4}
	for _, f := range fronts {
		require.NoError(t, env.Services.Upsert(svc("ns/a", f, active(map[bool]string{true: "198.18.0.1", false: "fd00:5e::1"}[f.Addr.Is4()], 80))), "upsert %s", f)
	}
	ids := map[service.Frontend]uint32{}
	for _, f := range fronts {
		ids[f] = svcID(t, env.DP.Maps, f)
	}
	checkInvariants(t, readRaw(t, env.DP.Maps), "four frontends")

	require.NoError(t, env.Services.Upsert(svc("ns/a", fe4, backendsN("198.18.0", 3)...)), "change fe4's backends")
	assert.Equal(t, ids[fe4], svcID(t, env.DP.Maps, fe4), "an upsert keeps the svc id")

	mgr, err := service.NewManager(env.DP.Maps)
	require.NoError(t, err, "restart")
	require.NoError(t, mgr.Upsert(svc("ns/a", fe4, backendsN("198.18.0", 2)...)), "change fe4 after the restart")
	assert.Equal(t, ids[fe4], svcID(t, env.DP.Maps, fe4), "the restarted manager keeps the svc id")

	require.NoError(t, mgr.Delete(fe6), "delete fe6")
	fresh := frontend("198.19.0.99", 80, service.TCP)
	require.NoError(t, mgr.Upsert(svc("ns/b", fresh, active("198.18.0.9", 80))), "a new frontend")
	for f, id := range ids {
		assert.NotEqual(t, id, svcID(t, env.DP.Maps, fresh), "the new frontend does not take %s's id, live or just freed", f)
	}
	checkInvariants(t, readRaw(t, env.DP.Maps), "after restart, delete and upsert")
}

// A restarted manager over Maglev tables and source ranges lists the same
// services, changes nothing by reading, and reprograms them in place.
func TestRestartKeepsTablesAndRanges(t *testing.T) {
	env := newEnv(t, nil)
	s1 := with(svc("ns/a", lb4, backendsN("198.18.0", 3)...), func(s *service.Service) {
		s.Maglev = true
		s.SourceRanges = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	})
	s2 := with(svc("ns/a", fe6, backendsN("fd00:5e::", 2)...), func(s *service.Service) { s.Maglev = true })
	require.NoError(t, env.Services.Apply([]string{"ns/a"}, []service.Service{s1, s2}), "apply")
	before := takeSnapshot(t, env.DP.Maps)
	want := env.Services.List()

	mgr, err := service.NewManager(env.DP.Maps)
	require.NoError(t, err, "restart")
	assert.Equal(t, want, mgr.List(), "the same services, ranges and options")
	assert.Equal(t, before, takeSnapshot(t, env.DP.Maps), "reading consistent maps changes nothing")
	require.NoError(t, mgr.Apply([]string{"ns/a"}, []service.Service{s1, s2}), "re-apply the same services")
	assert.Equal(t, before, takeSnapshot(t, env.DP.Maps), "re-applying the same services changes nothing")

	s1.Backends = s1.Backends[1:]
	s1.SourceRanges = append(s1.SourceRanges, netip.MustParsePrefix("192.168.0.0/16"))
	require.NoError(t, mgr.Apply([]string{"ns/a"}, []service.Service{s1}), "change s1, drop s2")
	r := readRaw(t, env.DP.Maps)
	checkInvariants(t, r, "after the change")
	assert.Len(t, r.tables, 1, "s2's table is gone")
	assert.Equal(t, expectedTable(t, maglev.Small, idsOf(t, mgr, lb4), s1.Backends), r.tables[svcID(t, env.DP.Maps, lb4)],
		"s1's table is rebuilt from its two backends")
	assert.Len(t, r.ranges[svcID(t, env.DP.Maps, lb4)], 2, "s1 has its two ranges")
}

func TestParseModeAndDispatch(t *testing.T) {
	for _, m := range []service.Mode{service.SNAT, service.DSR, service.Hybrid} {
		got, err := service.ParseMode(m.String())
		assert.NoError(t, err, "mode %s parses", m)
		assert.Equal(t, m, got, "mode %s round-trips", m)
	}
	for _, d := range []service.Dispatch{service.Option, service.IPIP} {
		got, err := service.ParseDispatch(d.String())
		assert.NoError(t, err, "dispatch %s parses", d)
		assert.Equal(t, d, got, "dispatch %s round-trips", d)
	}
	for _, bad := range []string{"", "DSR", "nat", "ipip"} {
		_, err := service.ParseMode(bad)
		assert.ErrorContains(t, err, fmt.Sprintf("%q", bad), "mode %q is refused, named", bad)
	}
	for _, bad := range []string{"", "IPIP", "gre", "dsr"} {
		_, err := service.ParseDispatch(bad)
		assert.ErrorContains(t, err, fmt.Sprintf("%q", bad), "dispatch %q is refused, named", bad)
	}
}
