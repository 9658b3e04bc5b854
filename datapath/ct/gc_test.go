package ct_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/ct"
	"github.com/servicepath/servicepath/datapath/maps"
)

// writePairs writes n synthetic flows (service + flow entry each) from
// distinct client ports into m; flows i with expired(i) are past their
// lifetime.
func writePairs(t *testing.T, m *ebpf.Map, n int, now uint64, expired func(i int) bool) {
	t.Helper()
	client, fam := maps.AddrFrom(netip.MustParseAddr("198.18.0.10"))
	vip, _ := maps.AddrFrom(netip.MustParseAddr("198.19.0.10"))
	be, _ := maps.AddrFrom(netip.MustParseAddr("198.18.0.11"))
	var keys []maps.CTKey
	var vals []maps.CTEntry
	for i := range n {
		exp := now + uint64(time.Hour)
		if expired(i) {
			exp = now - uint64(time.Second)
		}
		port := maps.NewBE16(uint16(1024 + i))
		svc := maps.CTKey{SAddr: client, DAddr: vip, SPort: port, DPort: maps.NewBE16(80), Proto: 6, Family: fam, Flags: maps.CTFlagService}
		flow := maps.CTKey{SAddr: client, DAddr: be, SPort: port, DPort: maps.NewBE16(8080), Proto: 6, Family: fam}
		keys = append(keys, svc, flow)
		vals = append(vals,
			maps.CTEntry{Expires: exp, NATAddr: be, NATPort: maps.NewBE16(8080), BackendID: 1},
			maps.CTEntry{Expires: exp, NATAddr: vip, NATPort: maps.NewBE16(80), BackendID: 1})
	}
	_, err := m.BatchUpdate(keys, vals, nil)
	require.NoError(t, err, "write %d synthetic flows", n)
}

func TestCollectorIncrementalPasses(t *testing.T) {
	env := newEnv(t) // 4096 entries
	require.NoError(t, env.Reset(), "reset maps")
	n := now(t)
	writePairs(t, env.DP.Maps.CT, 1500, n, func(i int) bool { return i%3 == 0 })

	c := ct.NewCollector(env.DP.Maps.CT)
	assert.Equal(t, -1, c.Estimate(0), "no estimate before a sweep")
	var scanned, deleted, passes int
	for {
		res, err := c.Pass(n, 1000)
		require.NoError(t, err, "pass %d", passes)
		passes++
		scanned += res.Scanned
		deleted += res.Deleted
		assert.Zero(t, res.Orphans, "no orphans among whole pairs (pass %d)", passes)
		if res.Wrapped {
			break
		}
		require.Less(t, passes, 10, "a 3000-entry map is swept in a few 1000-entry passes")
	}
	assert.Greater(t, passes, 1, "a budget below the map's fill splits the sweep")
	assert.Equal(t, 2*500, deleted, "every expired pair is deleted, both entries, across slices")
	assert.Equal(t, 2000, count(t, env), "the live pairs stay")
	assert.LessOrEqual(t, scanned, 3000, "no entry is read twice in one sweep")
	est := c.Estimate(0)
	assert.InDelta(t, 2000, est, 200, "after a sweep the estimate is about what is left")
	assert.Equal(t, est+10, c.Estimate(5), "five new flows add two entries each")

	res, err := c.Pass(n, 0)
	require.NoError(t, err, "whole-map pass")
	assert.Equal(t, ct.PassResult{Scanned: 2000, Wrapped: true, BatchCalls: res.BatchCalls}, res, "a whole-map pass pairs in memory: no single lookups, nothing to delete")
}

func TestCollectorCountsOrphans(t *testing.T) {
	env := newEnv(t)
	require.NoError(t, env.Reset(), "reset maps")
	n := now(t)
	writePairs(t, env.DP.Maps.CT, 10, n, func(int) bool { return false })
	// Drop the service entries of three flows, as the LRU would.
	var k maps.CTKey
	var v maps.CTEntry
	var svc []maps.CTKey
	it := env.DP.Maps.CT.Iterate()
	for it.Next(&k, &v) {
		if k.Flags&maps.CTFlagService != 0 && len(svc) < 3 {
			svc = append(svc, k)
		}
	}
	require.NoError(t, it.Err(), "iterate")
	for _, s := range svc {
		require.NoError(t, env.DP.Maps.CT.Delete(&s), "evict a service entry")
	}
	p, err := ct.ReadPressure(env.DP.Maps.CT, n)
	require.NoError(t, err, "read pressure")
	assert.Equal(t, ct.Pressure{Entries: 17, MaxEntries: 4096, Orphans: 3}, p, "three flow entries lost their service entry")

	res, err := ct.NewCollector(env.DP.Maps.CT).Pass(n, 0)
	require.NoError(t, err, "pass")
	assert.Equal(t, 3, res.Orphans, "the pass sees the same orphans")
	assert.Zero(t, res.Deleted, "unexpired orphans stay: replies still need them")
}

// A DSR flow learned on the backend's node is a flow entry whose service
// entry is on the entry node: no orphan, and it expires alone.
func TestCollectorLearnedDSRFlowsAreNoOrphans(t *testing.T) {
	env := newEnv(t)
	require.NoError(t, env.Reset(), "reset maps")
	n := now(t)
	client, fam := maps.AddrFrom(netip.MustParseAddr("198.18.254.100"))
	pod, _ := maps.AddrFrom(netip.MustParseAddr("198.18.0.11"))
	lb, _ := maps.AddrFrom(netip.MustParseAddr("198.19.1.10"))
	for i, exp := range []uint64{n + uint64(time.Hour), n - 1} {
		k := maps.CTKey{SAddr: client, DAddr: pod, SPort: maps.NewBE16(uint16(40000 + i)), DPort: maps.NewBE16(8080), Proto: 6, Family: fam}
		v := maps.CTEntry{Expires: exp, NATAddr: lb, NATPort: maps.NewBE16(80), State: maps.CTNSDSR | maps.CTNSLearned}
		require.NoError(t, env.DP.Maps.CT.Put(&k, &v), "write a learned flow")
	}
	p, err := ct.ReadPressure(env.DP.Maps.CT, n)
	require.NoError(t, err, "read pressure")
	assert.Equal(t, ct.Pressure{Entries: 2, MaxEntries: 4096, Expired: 1}, p, "a live learned flow is no orphan")

	c := ct.NewCollector(env.DP.Maps.CT)
	res, err := c.Pass(n, 0)
	require.NoError(t, err, "pass")
	assert.Zero(t, res.Orphans, "the pass counts no orphan")
	assert.Equal(t, 1, res.Deleted, "the expired learned flow goes alone")
	assert.Zero(t, res.Lookups, "no partner is looked for")
	d := ct.DefaultPacer(time.Minute).Next(ct.Signals{Fill: 0.01, MaxEntries: 4096, Last: res})
	assert.Empty(t, d.Pressure, "learned flows put the GC under no pressure")
}

func TestPacer(t *testing.T) {
	p := ct.DefaultPacer(32 * time.Second)
	calm := p.Next(ct.Signals{Fill: 0.1, MaxEntries: 100000})
	assert.Equal(t, ct.Decision{Interval: 32 * time.Second, Budget: 4096}, calm, "calm: base interval, a small slice")

	d := p.Next(ct.Signals{Fill: 0.8, MaxEntries: 100000})
	assert.Equal(t, 8*time.Second, d.Interval, "high fill quarters the interval")
	assert.Zero(t, d.Budget, "under pressure a pass covers the whole map")
	assert.Contains(t, d.Pressure, "fill 80%", "the reason is given")

	d = p.Next(ct.Signals{Fill: 0.1, MaxEntries: 100000, CreateFailed: 3})
	assert.Equal(t, 2*time.Second, d.Interval, "failed insertions quarter it again")
	d = p.Next(ct.Signals{Fill: 0.1, MaxEntries: 100000, NATExhausted: 2})
	assert.Equal(t, time.Second, d.Interval, "SNAT exhaustion quarters it down to the minimum")
	assert.Contains(t, d.Pressure, "no free SNAT port", "the reason is given")
	d = p.Next(ct.Signals{Fill: 0.1, MaxEntries: 100000, Last: ct.PassResult{Orphans: 1}})
	assert.Equal(t, time.Second, d.Interval, "orphans quarter it down to the minimum")
	d = p.Next(ct.Signals{Fill: 0.3, MaxEntries: 100000, NewFlows: 40000})
	assert.Equal(t, time.Second, d.Interval, "new flows that would fill the map keep it at the minimum")
	assert.NotEmpty(t, d.Pressure, "projected fill is pressure")

	d = p.Next(ct.Signals{Fill: 0.5, MaxEntries: 100000})
	assert.Equal(t, ct.Decision{Interval: 2 * time.Second, Budget: 12500}, d, "calm again: the interval doubles back, a quarter of the entries per pass")
}
