package loader_test

import (
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/ct"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/packet"
	"github.com/servicepath/servicepath/harness/testenv"
)

var mapNames = []string{maps.ServicesName, maps.BackendsName, maps.SvcMetaName, maps.CTName, maps.FragsName, maps.MetricsName}

func smallConfig() loader.Config {
	cfg := loader.DefaultConfig()
	cfg.CTMapSize = 4096
	return cfg
}

func load(t *testing.T, cfg loader.Config) *loader.Datapath {
	t.Helper()
	dp, err := loader.Load(cfg)
	require.NoError(t, err, "load datapath")
	t.Cleanup(func() { dp.Close() })
	return dp
}

func mapID(t *testing.T, m *ebpf.Map) ebpf.MapID {
	t.Helper()
	info, err := m.Info()
	require.NoError(t, err, "map info")
	id, ok := info.ID()
	require.True(t, ok, "kernel reports map ids")
	return id
}

func TestLoadPinsAndReusesMaps(t *testing.T) {
	dir := testenv.BPFFS(t)
	cfg := smallConfig()
	cfg.PinPath = dir
	dp1 := load(t, cfg)
	assert.Equal(t, dir, dp1.PinnedAt, "PinnedAt reports the pin directory")

	m1 := map[string]*ebpf.Map{
		maps.ServicesName: dp1.Maps.Services, maps.BackendsName: dp1.Maps.Backends, maps.SvcMetaName: dp1.Maps.SvcMeta,
		maps.CTName: dp1.Maps.CT, maps.FragsName: dp1.Maps.Frags, maps.MetricsName: dp1.Maps.Metrics,
	}
	for _, name := range mapNames {
		path := filepath.Join(dir, name)
		pinned, err := ebpf.LoadPinnedMap(path, nil)
		if !assert.NoError(t, err, "map %s is pinned at %s", name, path) {
			continue
		}
		assert.Equal(t, mapID(t, m1[name]), mapID(t, pinned), "the pin %s is the loaded map", path)
		pinned.Close()
	}
	opened, err := maps.OpenPinned(dir)
	require.NoError(t, err, "OpenPinned finds every map")
	opened.Close()

	dp2 := load(t, cfg)
	assert.Equal(t, mapID(t, dp1.Maps.Services), mapID(t, dp2.Maps.Services), "a second load re-uses the pinned service map")
	assert.Equal(t, mapID(t, dp1.Maps.CT), mapID(t, dp2.Maps.CT), "a second load re-uses the pinned conntrack map")

	k := maps.ServiceKey{Addr: maps.Addr{198, 19, 0, 10}, Port: maps.NewBE16(80), Proto: 6, Family: maps.IPv4}
	v := maps.ServiceValue{Count: 1, Total: 2}
	require.NoError(t, dp1.Maps.Services.Put(&k, &v), "write through the first load")
	var got maps.ServiceValue
	require.NoError(t, dp2.Maps.Services.Lookup(&k, &got), "read through the second load")
	assert.Equal(t, v, got, "the second load sees the first's service entry")

	// The pinned maps outlive the loads' handles.
	require.NoError(t, dp1.Close(), "close first load")
	require.NoError(t, dp2.Close(), "close second load")
	dp3 := load(t, cfg)
	require.NoError(t, dp3.Maps.Services.Lookup(&k, &got), "read through a third load after the others closed")
	assert.Equal(t, v, got, "pinned state survives closing every handle")
}

func TestLoadRefusesIncompatiblePinnedMaps(t *testing.T) {
	dir := testenv.BPFFS(t)
	cfg := smallConfig()
	cfg.PinPath = dir
	load(t, cfg)

	for _, c := range []struct {
		name   string
		adjust func(*loader.Config)
	}{
		{"conntrack size", func(c *loader.Config) { c.CTMapSize *= 2 }},
		{"service map size", func(c *loader.Config) { c.ServiceMapSize /= 2 }},
		{"backend map size", func(c *loader.Config) { c.BackendMapSize /= 2 }},
		{"Maglev table size", func(c *loader.Config) { c.MaglevTableSize = 65521 }},
	} {
		other := cfg
		c.adjust(&other)
		_, err := loader.Load(other)
		assert.ErrorContains(t, err, "unload", "a load with another %s than the pinned maps tells to unload", c.name)
		assert.ErrorIs(t, err, ebpf.ErrMapIncompatible, "the %s mismatch keeps the cause", c.name)
	}
}

// Bad settings are refused before anything is mounted, pinned or loaded:
// the pin directory is never created.
func TestLoadValidatesConfig(t *testing.T) {
	for _, c := range []struct {
		name   string
		adjust func(*loader.Config)
	}{
		{"zero service map size", func(c *loader.Config) { c.ServiceMapSize = 0 }},
		{"zero backend map size", func(c *loader.Config) { c.BackendMapSize = 0 }},
		{"zero conntrack map size", func(c *loader.Config) { c.CTMapSize = 0 }},
		{"unknown no-backend action", func(c *loader.Config) { c.NoBackend = 2 }},
		{"zero SYN lifetime", func(c *loader.Config) { c.CTTCPSyn = 0 }},
		{"sub-second SYN lifetime", func(c *loader.Config) { c.CTTCPSyn = 999 * time.Millisecond }},
		{"sub-second established lifetime", func(c *loader.Config) { c.CTTCPEstablished = 500 * time.Millisecond }},
		{"negative close lifetime", func(c *loader.Config) { c.CTTCPClose = -time.Second }},
		{"sub-second non-TCP lifetime", func(c *loader.Config) { c.CTNonTCP = time.Millisecond }},
		{"lifetime past 2^32-1 s", func(c *loader.Config) { c.CTNonTCP = time.Duration(1<<32) * time.Second }},
		{"Maglev table size not a prime", func(c *loader.Config) { c.MaglevTableSize = 16384 }},
		{"Maglev table size below 251", func(c *loader.Config) { c.MaglevTableSize = 241 }},
		{"Maglev table size above 131071", func(c *loader.Config) { c.MaglevTableSize = 131101 }},
		{"zero Maglev table size", func(c *loader.Config) { c.MaglevTableSize = 0 }},
		{"no hairpin IPv4 address", func(c *loader.Config) { c.HairpinIPv4 = netip.Addr{} }},
		{"IPv6 hairpin IPv4 address", func(c *loader.Config) { c.HairpinIPv4 = netip.MustParseAddr("100::1") }},
		{"IPv4-mapped hairpin IPv6 address", func(c *loader.Config) { c.HairpinIPv6 = netip.MustParseAddr("::ffff:169.254.42.1") }},
		{"loopback hairpin IPv6 address", func(c *loader.Config) { c.HairpinIPv6 = netip.IPv6Loopback() }},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := loader.DefaultConfig()
			c.adjust(&cfg)
			cfg.PinPath = filepath.Join(t.TempDir(), "pins")
			dp, err := loader.Load(cfg)
			if dp != nil {
				dp.Close()
			}
			assert.ErrorContains(t, err, "load config", "%s is refused as a config error", c.name)
			_, serr := os.Stat(cfg.PinPath)
			assert.ErrorIs(t, serr, os.ErrNotExist, "%s is refused before the pin directory is created", c.name)
		})
	}
}

// The table size makes sp_maglev's values (cfg_maglev_size, which reads
// them, is proved by the Maglev fixtures in datapath/clusterip).
func TestLoadSizesMaglevTables(t *testing.T) {
	testenv.RequireRoot(t)
	for _, n := range []uint32{251, 65521} {
		cfg := smallConfig()
		cfg.MaglevTableSize = n
		dp := load(t, cfg)
		assert.Equal(t, 4*n, dp.Maps.Maglev.ValueSize(), "a table of %d slots holds %d backend ids", n, n)
	}
}

func TestParseNoBackendAction(t *testing.T) {
	for in, want := range map[string]loader.NoBackendAction{"reject": loader.Reject, "drop": loader.Drop} {
		got, err := loader.ParseNoBackendAction(in)
		assert.NoError(t, err, "%q parses", in)
		assert.Equal(t, want, got, "%q parses to its action", in)
	}
	for _, in := range []string{"", "Drop", "accept"} {
		_, err := loader.ParseNoBackendAction(in)
		assert.Error(t, err, "%q is refused", in)
	}
}

// The lifetimes reach the program's volatile consts: a 5 s SYN lifetime
// gives a new flow at most 5 s, where the default would give 60 s.
func TestLoadAppliesLifetimes(t *testing.T) {
	testenv.RequireRoot(t)
	for _, c := range []struct {
		name  string
		proto service.Protocol
		cfg   func(*loader.Config)
		max   time.Duration
	}{
		{"tcp syn", service.TCP, func(c *loader.Config) { c.CTTCPSyn = 5 * time.Second }, 5 * time.Second},
		{"udp", service.UDP, func(c *loader.Config) { c.CTNonTCP = 7 * time.Second }, 7 * time.Second},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := smallConfig()
			c.cfg(&cfg)
			env, err := inject.NewEnv(cfg)
			require.NoError(t, err, "load datapath")
			t.Cleanup(func() { env.Close() })

			client := netip.MustParseAddrPort("198.18.0.10:40000")
			vip := netip.MustParseAddrPort("198.19.0.10:80")
			be := service.Backend{Addr: netip.MustParseAddr("198.18.0.11"), Port: 8080}
			require.NoError(t, env.Services.Upsert(service.Service{
				Name: "default/x", Frontend: service.Frontend{Addr: vip.Addr(), Port: vip.Port(), Protocol: c.proto}, Backends: []service.Backend{be},
			}), "program service")
			pkt := packet.UDP(client, vip, []byte("hello"), packet.Opts{})
			if c.proto == service.TCP {
				pkt = packet.TCP(client, vip, packet.SYN, nil, packet.Opts{})
			}
			v, _, err := env.Inject(inject.FromPod, pkt)
			require.NoError(t, err, "inject")
			require.Equal(t, inject.OK, v, "packet load-balanced")

			entries, err := ct.Dump(env.DP.Maps.CT)
			require.NoError(t, err, "dump conntrack")
			require.Len(t, entries, 2, "new flow has two entries")
			for _, e := range entries {
				assert.Positive(t, e.ExpiresIn, "entry (service=%v) not yet expired", e.Service)
				assert.LessOrEqual(t, e.ExpiresIn, c.max, "entry (service=%v) has the configured %s lifetime", e.Service, c.max)
			}
		})
	}
}

// NoBackend reaches the program: Drop turns a backend-less service's
// reject into a drop.
func TestLoadAppliesNoBackendAction(t *testing.T) {
	testenv.RequireRoot(t)
	for action, want := range map[loader.NoBackendAction]inject.Verdict{loader.Reject: inject.Redirect, loader.Drop: inject.Shot} {
		cfg := smallConfig()
		cfg.NoBackend = action
		env, err := inject.NewEnv(cfg)
		require.NoError(t, err, "load datapath")
		vip := netip.MustParseAddrPort("198.19.0.10:80")
		require.NoError(t, env.Services.Upsert(service.Service{
			Name: "default/x", Frontend: service.Frontend{Addr: vip.Addr(), Port: vip.Port(), Protocol: service.TCP},
		}), "program a service without backends")
		v, _, err := env.Inject(inject.FromPod, packet.TCP(netip.MustParseAddrPort("198.18.0.10:40000"), vip, packet.SYN, nil, packet.Opts{}))
		require.NoError(t, err, "inject")
		assert.Equal(t, want, v, "no-backend action %d gives verdict %s", action, want)
		env.Close()
	}
}

// uses says whether prog's object was given m.
func uses(t *testing.T, prog *ebpf.Program, m *ebpf.Map) bool {
	t.Helper()
	info, err := prog.Info()
	require.NoError(t, err, "program info")
	ids, ok := info.MapIDs()
	require.True(t, ok, "kernel reports a program's maps")
	for _, id := range ids {
		if id == mapID(t, m) {
			return true
		}
	}
	return false
}

// The north-south zone is a map of its own, pinned under its name and
// re-used, sized apart and in sp_ct's LRU mode, and the node-device
// programs (tc, and XDP where loaded) have it in place of sp_ct; with
// zones off there is none, every program has sp_ct, and OpenPinned does
// without it.
func TestLoadCTZones(t *testing.T) {
	for _, c := range []struct {
		name        string
		nsSize      uint32
		noCommonLRU bool
		xdp         bool
	}{
		{"zones", 1024, false, false},
		{"zones with per-CPU LRU", 1024, true, false},
		{"zones with XDP", 1024, false, true},
		{"shared", 0, false, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := smallConfig()
			cfg.PinPath = testenv.BPFFS(t)
			cfg.CTNorthSouthMapSize, cfg.CTNoCommonLRU, cfg.XDP = c.nsSize, c.noCommonLRU, c.xdp
			dp1 := load(t, cfg)
			nodeDevice := []*ebpf.Program{dp1.FromNetdev, dp1.ToNetdev}
			if c.xdp {
				if dp1.XDPFromNetdev == nil {
					t.Skipf("XDP not loaded: %v", dp1.XDPMissing)
				}
				nodeDevice = append(nodeDevice, dp1.XDPFromNetdev)
			}
			for _, p := range []*ebpf.Program{dp1.FromPod, dp1.ToPod} {
				assert.True(t, uses(t, p, dp1.Maps.CT), "pod-device program %s has sp_ct", p)
			}
			for _, p := range nodeDevice {
				assert.True(t, uses(t, p, dp1.Maps.NorthSouthCT()), "node-device program %s has the north-south map", p)
				if dp1.Maps.CTNS != nil {
					assert.False(t, uses(t, p, dp1.Maps.CT), "node-device program %s has no sp_ct with zones", p)
					assert.False(t, uses(t, dp1.FromPod, dp1.Maps.CTNS), "from-pod has no sp_ct_ns")
				}
			}
			opened, err := maps.OpenPinned(cfg.PinPath)
			require.NoError(t, err, "OpenPinned finds every map")
			t.Cleanup(func() { opened.Close() })
			if c.nsSize == 0 {
				assert.Nil(t, dp1.Maps.CTNS, "zones off: no north-south zone")
				assert.Nil(t, opened.CTNS, "OpenPinned does without a zone never made")
				assert.Equal(t, dp1.Maps.CT, dp1.Maps.NorthSouthCT(), "north-south flows are in sp_ct")
				return
			}
			require.NotNil(t, dp1.Maps.CTNS, "zones on: a north-south zone")
			assert.Equal(t, c.nsSize, dp1.Maps.CTNS.MaxEntries(), "the zone has its own size")
			assert.Equal(t, cfg.CTMapSize, dp1.Maps.CT.MaxEntries(), "sp_ct keeps its size")
			assert.Equal(t, dp1.Maps.CT.Flags(), dp1.Maps.CTNS.Flags(), "the zone's LRU mode is sp_ct's")
			assert.Equal(t, c.noCommonLRU, dp1.Maps.CTNS.Flags()&unix.BPF_F_NO_COMMON_LRU != 0, "per-CPU LRU as configured")
			assert.Equal(t, mapID(t, dp1.Maps.CTNS), mapID(t, opened.CTNS), "the zone is pinned as %s", maps.CTNSName)
			assert.NotEqual(t, mapID(t, dp1.Maps.CT), mapID(t, dp1.Maps.CTNS), "two maps")
			dp2 := load(t, cfg)
			assert.Equal(t, mapID(t, dp1.Maps.CTNS), mapID(t, dp2.Maps.CTNS), "a second load re-uses the pinned zone")
		})
	}
}

// Turning zones on or off over pinned maps is refused, like a size
// change: the node-device programs would look for established north-south
// flows in the other map.
func TestLoadRefusesSwitchingZones(t *testing.T) {
	for _, c := range []struct {
		name     string
		from, to uint32
	}{
		{"zones on over a shared map", 0, 4096},
		{"zones off over a zone", 4096, 0},
		{"another zone size", 4096, 8192},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := smallConfig()
			cfg.PinPath = testenv.BPFFS(t)
			cfg.CTNorthSouthMapSize = c.from
			load(t, cfg)
			cfg.CTNorthSouthMapSize = c.to
			_, err := loader.Load(cfg)
			assert.ErrorContains(t, err, "unload", "%s: the error tells to unload", c.name)
			assert.ErrorIs(t, err, ebpf.ErrMapIncompatible, "%s: the cause is kept", c.name)
		})
	}
}
