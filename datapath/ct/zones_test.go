package ct_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/ct"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/testenv"
)

func zonedEnv(t *testing.T, nsSize uint32) *inject.Env {
	t.Helper()
	testenv.RequireRoot(t)
	cfg := loader.DefaultConfig()
	cfg.CTMapSize, cfg.CTNorthSouthMapSize = 4096, nsSize
	env, err := inject.NewEnv(cfg)
	require.NoError(t, err, "load datapath")
	t.Cleanup(func() { env.Close() })
	return env
}

func TestZones(t *testing.T) {
	for _, c := range []struct {
		name   string
		nsSize uint32
		want   []string // zone, map name
	}{
		{"zones", 1024, []string{ct.ZoneEastWest, maps.CTName, ct.ZoneNorthSouth, maps.CTNSName}},
		{"shared", 0, []string{ct.ZoneShared, maps.CTName}},
	} {
		t.Run(c.name, func(t *testing.T) {
			env := zonedEnv(t, c.nsSize)
			var got []string
			for _, z := range ct.Zones(env.DP.Maps) {
				got = append(got, z.Name, z.MapName)
				assert.Equal(t, z.Map == env.DP.Maps.NorthSouthCT(), z.NorthSouth, "zone %s holds the north-south flows iff its map is NorthSouthCT", z.Name)
			}
			assert.Equal(t, c.want, got, "zones and their maps")

			n := now(t)
			writePairs(t, env.DP.Maps.CT, 2, n, func(int) bool { return false })
			if env.DP.Maps.CTNS != nil {
				writePairs(t, env.DP.Maps.CTNS, 3, n, func(int) bool { return false })
			}
			entries, err := ct.DumpZones(env.DP.Maps)
			require.NoError(t, err, "dump every zone")
			perZone := map[string]int{}
			for _, e := range entries {
				perZone[e.Zone]++
			}
			want := map[string]int{ct.ZoneShared: 4}
			if c.nsSize > 0 {
				want = map[string]int{ct.ZoneEastWest: 4, ct.ZoneNorthSouth: 6}
			}
			assert.Equal(t, want, perZone, "every entry names its zone")
		})
	}
}

// Each zone has its own pacer: orphans in the north-south zone (a flood's
// evictions) shorten its interval only, and each zone's expired pairs go.
func TestLoopPacesZonesApart(t *testing.T) {
	env := zonedEnv(t, 4096)
	n := now(t)
	writePairs(t, env.DP.Maps.CT, 10, n, func(i int) bool { return i < 4 })
	writePairs(t, env.DP.Maps.CTNS, 20, n, func(i int) bool { return i < 5 })
	// Evict three north-south service entries, as the LRU would.
	var k maps.CTKey
	var v maps.CTEntry
	var evict []maps.CTKey
	it := env.DP.Maps.CTNS.Iterate()
	for it.Next(&k, &v) {
		if k.Flags&maps.CTFlagService != 0 && v.Expires > n && len(evict) < 3 {
			evict = append(evict, k)
		}
	}
	require.NoError(t, it.Err(), "walk the north-south zone")
	for _, k := range evict {
		require.NoError(t, env.DP.Maps.CTNS.Delete(&k), "evict a north-south service entry")
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	passes := map[string]ct.LoopPass{}
	loop := &ct.Loop{Maps: env.DP.Maps, Base: time.Hour, Report: func(p ct.LoopPass) {
		passes[p.Zone] = p
		if len(passes) == 2 {
			cancel()
		}
	}}
	require.NoError(t, loop.Run(ctx), "run until both zones had a pass")

	ew, ns := passes[ct.ZoneEastWest], passes[ct.ZoneNorthSouth]
	assert.Equal(t, 8, ew.Result.Deleted, "east-west: four expired pairs deleted")
	assert.Equal(t, 10, ns.Result.Deleted, "north-south: five expired pairs deleted")
	assert.Equal(t, 3, ns.Result.Orphans, "north-south: the evictions are seen")
	assert.Equal(t, ct.Decision{Interval: time.Hour, Budget: 4096}, ew.Decision, "east-west stays calm")
	assert.Equal(t, 15*time.Minute, ns.Decision.Interval, "north-south orphans quarter its interval")
	assert.Contains(t, ns.Decision.Pressure, "orphaned", "and say why")
}
