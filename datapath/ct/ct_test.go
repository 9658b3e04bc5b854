package ct_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/ct"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/packet"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/suites/clusterip"
)

func newEnv(t *testing.T) *inject.Env {
	t.Helper()
	testenv.RequireRoot(t)
	cfg := loader.DefaultConfig()
	cfg.CTMapSize = 4096
	env, err := inject.NewEnv(cfg)
	require.NoError(t, err, "load datapath")
	t.Cleanup(func() { env.Close() })
	return env
}

func vip(f clusterip.Family) netip.AddrPort { return netip.AddrPortFrom(f.VIP, clusterip.VIPPort) }
func backend(f clusterip.Family) netip.AddrPort {
	return netip.AddrPortFrom(f.Backends[0], clusterip.BackendPort)
}

// openFlow programs the family's service with one backend and sends a
// client SYN to the VIP through from-pod, leaving the flow's two entries.
func openFlow(t *testing.T, env *inject.Env, f clusterip.Family) {
	t.Helper()
	require.NoError(t, env.Reset(), "reset maps")
	require.NoError(t, env.Services.Upsert(f.Service(service.TCP, service.Backend{Addr: f.Backends[0], Port: clusterip.BackendPort})), "program service")
	send(t, env, inject.FromPod, packet.TCP(f.Client, vip(f), packet.SYN, nil, packet.Opts{}))
}

func send(t *testing.T, env *inject.Env, h inject.Hook, pkt []byte) {
	t.Helper()
	v, _, err := env.Inject(h, pkt)
	require.NoError(t, err, "inject into %s", h)
	require.Equal(t, inject.OK, v, "packet into %s passes", h)
}

// keys returns the flow's service entry key (client -> VIP) and flow
// entry key (client -> backend).
func keys(f clusterip.Family) (svcKey, flowKey maps.CTKey) {
	c, fam := maps.AddrFrom(f.Client.Addr())
	v, _ := maps.AddrFrom(f.VIP)
	b, _ := maps.AddrFrom(f.Backends[0])
	svcKey = maps.CTKey{SAddr: c, DAddr: v, SPort: maps.NewBE16(f.Client.Port()), DPort: maps.NewBE16(clusterip.VIPPort),
		Proto: uint8(service.TCP), Family: fam, Flags: maps.CTFlagService}
	flowKey = maps.CTKey{SAddr: c, DAddr: b, SPort: maps.NewBE16(f.Client.Port()), DPort: maps.NewBE16(clusterip.BackendPort),
		Proto: uint8(service.TCP), Family: fam}
	return svcKey, flowKey
}

func lookup(t *testing.T, env *inject.Env, k maps.CTKey) (maps.CTEntry, bool) {
	t.Helper()
	var v maps.CTEntry
	err := env.DP.Maps.CT.Lookup(&k, &v)
	return v, err == nil
}

func count(t *testing.T, env *inject.Env) int {
	t.Helper()
	n, err := env.CTEntries()
	require.NoError(t, err, "count CT entries")
	return n
}

func now(t *testing.T) uint64 {
	t.Helper()
	n, err := ct.Now()
	require.NoError(t, err, "read the monotonic clock")
	return n
}

func TestGCExpiresFlowPairs(t *testing.T) {
	env := newEnv(t)
	for _, f := range clusterip.Families {
		t.Run(f.Name, func(t *testing.T) {
			svcKey, flowKey := keys(f)

			t.Run("live pair survives", func(t *testing.T) {
				openFlow(t, env, f)
				require.Equal(t, 2, count(t, env), "a SYN leaves a service entry and a flow entry")
				_, ok := lookup(t, env, svcKey)
				require.True(t, ok, "service entry is keyed client -> VIP with the service flag")
				_, ok = lookup(t, env, flowKey)
				require.True(t, ok, "flow entry is keyed client -> backend")

				res, err := ct.GC(env.DP.Maps.CT, now(t))
				require.NoError(t, err, "GC now")
				assert.Equal(t, ct.GCResult{Scanned: 2, Deleted: 0}, res, "GC now scans both entries and deletes none")
				assert.Equal(t, 2, count(t, env), "both entries are still there")
			})

			t.Run("expired pair deleted", func(t *testing.T) {
				openFlow(t, env, f)
				// Past the 60 s SYN lifetime.
				res, err := ct.GC(env.DP.Maps.CT, now(t)+uint64(2*time.Minute))
				require.NoError(t, err, "GC in two minutes")
				assert.Equal(t, ct.GCResult{Scanned: 2, Deleted: 2}, res, "both entries of an expired SYN flow are deleted")
				assert.Zero(t, count(t, env), "the CT map is empty")
			})

			for _, c := range []struct {
				name         string
				live, stale  maps.CTKey
				liveS, stleS string
			}{
				{"flow refreshed, service entry expired", flowKey, svcKey, "flow", "service"},
				{"service entry refreshed, flow expired", svcKey, flowKey, "service", "flow"},
			} {
				t.Run(c.name, func(t *testing.T) {
					openFlow(t, env, f)
					n := now(t)
					set := func(k maps.CTKey, expires uint64, what string) {
						v, ok := lookup(t, env, k)
						require.True(t, ok, "%s entry exists", what)
						v.Expires = expires
						require.NoError(t, env.DP.Maps.CT.Put(&k, &v), "rewrite %s entry's expiry", what)
					}
					set(c.stale, n-uint64(time.Second), c.stleS)
					set(c.live, n+uint64(time.Hour), c.liveS)

					res, err := ct.GC(env.DP.Maps.CT, n)
					require.NoError(t, err, "GC")
					assert.Equal(t, ct.GCResult{Scanned: 2, Deleted: 0}, res, "an expired entry whose partner is alive is kept")
					_, ok := lookup(t, env, c.stale)
					assert.True(t, ok, "the expired %s entry survives with its live partner", c.stleS)
					_, ok = lookup(t, env, c.live)
					assert.True(t, ok, "the live %s entry survives", c.liveS)

					res, err = ct.GC(env.DP.Maps.CT, n+uint64(2*time.Hour))
					require.NoError(t, err, "GC after both expired")
					assert.Equal(t, 2, res.Deleted, "once the partner expires too, both go")
				})
			}

			t.Run("orphan entries", func(t *testing.T) {
				openFlow(t, env, f)
				n := now(t)
				// A flow entry whose service entry is gone (evicted by the LRU),
				// to another client port, one expired and one not.
				orphan := flowKey
				orphan.SPort = maps.NewBE16(f.Client.Port() + 1)
				vipAddr, _ := maps.AddrFrom(f.VIP)
				e := maps.CTEntry{Expires: n - uint64(time.Second), NATAddr: vipAddr, NATPort: maps.NewBE16(clusterip.VIPPort), BackendID: 1}
				require.NoError(t, env.DP.Maps.CT.Put(&orphan, &e), "write an expired orphan flow entry")
				alive := flowKey
				alive.SPort = maps.NewBE16(f.Client.Port() + 2)
				e.Expires = n + uint64(time.Hour)
				require.NoError(t, env.DP.Maps.CT.Put(&alive, &e), "write an unexpired orphan flow entry")

				res, err := ct.GC(env.DP.Maps.CT, n)
				require.NoError(t, err, "GC")
				assert.Equal(t, ct.GCResult{Scanned: 4, Deleted: 1}, res, "only the expired orphan is deleted")
				_, ok := lookup(t, env, orphan)
				assert.False(t, ok, "the expired orphan flow entry is gone")
				_, ok = lookup(t, env, alive)
				assert.True(t, ok, "the unexpired orphan stays")
				_, ok = lookup(t, env, svcKey)
				assert.True(t, ok, "the live pair's service entry stays")
				_, ok = lookup(t, env, flowKey)
				assert.True(t, ok, "the live pair's flow entry stays")
			})
		})
	}
}

func TestDumpRendersBothEntries(t *testing.T) {
	env := newEnv(t)
	for _, f := range clusterip.Families {
		t.Run(f.Name, func(t *testing.T) {
			openFlow(t, env, f)
			ids := env.Services.List()[0].BackendIDs
			require.Len(t, ids, 1, "one backend programmed")

			check := func(when string, state []string, fwd, rev uint64, maxLife time.Duration) {
				entries, err := ct.Dump(env.DP.Maps.CT)
				require.NoError(t, err, "dump")
				require.Len(t, entries, 2, "%s: two entries", when)
				var sawService, sawFlow bool
				for _, e := range entries {
					assert.Equal(t, uint8(service.TCP), e.Protocol, "%s: protocol TCP", when)
					assert.Equal(t, f.Client, e.Source, "%s: source is the client", when)
					assert.Equal(t, ids[0], e.BackendID, "%s: names the programmed backend's id", when)
					assert.Equal(t, state, e.State, "%s: state names", when)
					assert.Positive(t, e.ExpiresIn, "%s: not yet expired", when)
					assert.LessOrEqual(t, e.ExpiresIn, maxLife, "%s: lifetime of the state", when)
					if e.Service {
						sawService = true
						assert.Equal(t, vip(f), e.Dest, "%s: service entry is keyed by the VIP", when)
						assert.Equal(t, backend(f), e.NAT, "%s: service entry NATs to the backend", when)
					} else {
						sawFlow = true
						assert.Equal(t, backend(f), e.Dest, "%s: flow entry is keyed by the backend", when)
						assert.Equal(t, vip(f), e.NAT, "%s: flow entry reverse-NATs to the VIP", when)
						assert.Equal(t, fwd, e.FwdPackets, "%s: forward packets on the flow entry", when)
						assert.Equal(t, rev, e.RevPackets, "%s: reply packets on the flow entry", when)
						if fwd > 0 {
							assert.Positive(t, e.FwdBytes, "%s: forward bytes counted", when)
						}
						if rev > 0 {
							assert.Positive(t, e.RevBytes, "%s: reply bytes counted", when)
						}
					}
				}
				assert.True(t, sawService, "%s: one entry has the service flag", when)
				assert.True(t, sawFlow, "%s: one entry is the flow entry", when)
			}
			check("after SYN", nil, 1, 0, time.Minute)

			send(t, env, inject.ToPod, packet.TCP(backend(f), f.Client, packet.SYNACK, nil, packet.Opts{FromHost: true}))
			send(t, env, inject.FromPod, packet.TCP(f.Client, vip(f), packet.ACK, nil, packet.Opts{}))
			check("after handshake", []string{"established", "replied"}, 2, 1, 6*time.Hour)

			send(t, env, inject.FromPod, packet.TCP(f.Client, vip(f), packet.FINACK, nil, packet.Opts{}))
			send(t, env, inject.ToPod, packet.TCP(backend(f), f.Client, packet.FINACK, nil, packet.Opts{FromHost: true}))
			// The reply FIN refreshes only the flow entry; the service entry
			// copied the state at the client's FIN.
			entries, err := ct.Dump(env.DP.Maps.CT)
			require.NoError(t, err, "dump after FINs")
			for _, e := range entries {
				if e.Service {
					assert.Equal(t, []string{"established", "replied", "fwd-fin"}, e.State, "service entry has the state of the client's FIN")
				} else {
					assert.Equal(t, []string{"established", "replied", "fwd-fin", "rev-fin"}, e.State, "flow entry closed both ways")
					assert.LessOrEqual(t, e.ExpiresIn, 10*time.Second, "a closed flow gets the close lifetime")
				}
			}
		})
	}
}

func TestStateNames(t *testing.T) {
	assert.Empty(t, ct.StateNames(0), "no bits, no names")
	assert.Equal(t, []string{"established"}, ct.StateNames(maps.CTEstablished), "established bit")
	assert.Equal(t, []string{"replied", "rst"}, ct.StateNames(maps.CTReplied|maps.CTRst), "two bits in bit order")
	assert.Equal(t, []string{"established", "replied", "fwd-fin", "rev-fin", "rst"},
		ct.StateNames(maps.CTEstablished|maps.CTReplied|maps.CTFwdFin|maps.CTRevFin|maps.CTRst), "all bits")
	assert.Equal(t, []string{"fwd-fin"}, ct.StateNames(maps.CTFwdFin|0x8000), "unknown bits are not named")
}
