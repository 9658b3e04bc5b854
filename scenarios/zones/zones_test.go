package zones_test

import (
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/bench/plot"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/scenarios"
	"github.com/servicepath/servicepath/scenarios/zones"
)

// runs are both modes (zones, and one shared map of the same total size)
// for each talk period.
func runs(ew, ns uint32, fills, periods []float64, samples int) []zones.Options {
	var out []zones.Options
	for _, period := range periods {
		for _, z := range []bool{true, false} {
			out = append(out, zones.Options{EWSize: ew, NSSize: ns, Zones: z, Fills: fills, Established: 128,
				Period: period, Backends: 16, Samples: samples})
		}
	}
	return out
}

// sound asserts what holds for every run: with zones, the flood never
// touches sp_ct.
func sound(t *testing.T, o zones.Options, res *zones.Result) {
	for _, c := range res.Checkpoints {
		if !o.Zones {
			continue
		}
		assert.Zero(t, c.Evicted, "%s at %gx: no east-west entry evicted", o.Name(), c.Fill)
		assert.Zero(t, c.Lost, "%s at %gx: no east-west flow lost", o.Name(), c.Fill)
		assert.Zero(t, c.EWOrphans, "%s at %gx: no orphan in sp_ct", o.Name(), c.Fill)
		assert.Equal(t, 2*o.Established+2, c.EWEntries, "%s at %gx: sp_ct holds the east-west flows (and the timing one) only", o.Name(), c.Fill)
		assert.LessOrEqual(t, c.NSEntries, int(o.NSSize), "%s at %gx: the zone holds at most its size", o.Name(), c.Fill)
	}
}

// The small form: 4096-entry zones against one 8192-entry map, flooded to
// 10x the north-south zone, the east-west flows idle between checkpoints.
func TestZonesSmall(t *testing.T) {
	testenv.RequireRoot(t)
	for _, o := range runs(4096, 4096, []float64{1, 2, 10}, []float64{0}, 200) {
		res, err := zones.Run(o)
		require.NoError(t, err, "run %s", o.Name())
		t.Logf("%s: %+v", o.Name(), res.Checkpoints)
		sound(t, o, res)
		if last := res.Checkpoints[len(res.Checkpoints)-1]; !o.Zones {
			assert.Positive(t, last.Evicted, "shared map: the 10x flood evicts idle east-west entries")
			assert.Positive(t, last.Lost, "shared map: and east-west flows lose their state")
		}
	}
}

// The full form: the small sizes and the defaults (512Ki east-west, 128Ki
// north-south; 640Ki shared), idle east-west flows and flows that talk
// once per north-south zone's worth of new flows.
func TestZonesFull(t *testing.T) {
	scenarios.SkipUnlessFull(t)
	testenv.RequireRoot(t)
	start := time.Now()
	fills := []float64{0.5, 1, 2, 5, 10}
	var results []*zones.Result
	for _, size := range [][2]uint32{{4096, 4096}, {512 * 1024, 128 * 1024}} {
		for _, o := range runs(size[0], size[1], fills, []float64{0, 1}, 2000) {
			res, err := zones.Run(o)
			require.NoError(t, err, "run %s", o.Name())
			sound(t, o, res)
			results = append(results, res)
		}
	}

	var md strings.Builder
	md.WriteString("A NodePort SYN flood through the node-device program (`sp_from_netdev`, local backends) while 128 established ClusterIP flows " +
		"through the pod-device programs wait. *fill* = entries inserted by the flood / north-south zone size (two per flow). " +
		"*zones*: sp_ct (east-west) and sp_ct_ns (north-south) of the sizes shown; *shared*: one sp_ct of both sizes together, the same memory. " +
		"*idle* east-west flows say nothing during the flood; *talk-every-1x* ones talk in turn (a reply through to-pod, then a forward packet through from-pod), " +
		"each once per zone size of flood entries. After the last checkpoint every flow talks once more. " +
		"At each checkpoint the flows' entries are looked up from user space, which does not mark an LRU entry used: *evicted* counts their entries gone from sp_ct " +
		"(every eviction, since only a talk re-creates them), *lost* the flows that lost state (the next reply leaves untranslated or the next forward packet re-picks), " +
		"*moved* the re-picks to another backend when they talked (a TCP connection breaks). sp_ct entries include a timing flow's two. " +
		"ns/packet is kernel-timed (BPF_PROG_TEST_RUN, one run per copy) less an empty tc program timed at the same checkpoint, on CPU 0: " +
		"the flood's new flows and a recent flood flow's ACK through from-netdev, the timing flow's ACK through from-pod.\n\n")
	md.WriteString("| mode | talk | ew / ns size | fill | evicted | lost | moved | sp_ct entries | sp_ct orphans | sp_ct_ns entries | sp_ct_ns orphans | ns new-flow ns | ns established ns | ew established ns | flood flows/s |\n")
	md.WriteString("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	lost := plot.Line{Title: "East-west flows lost under a north-south flood", XLabel: "flood (x north-south zone size)", YLabel: "east-west flows lost (of 128)", LogX: true}
	cost := plot.Line{Title: "North-south new-flow cost vs flood", XLabel: "flood (x north-south zone size)", YLabel: "ns/packet", LogX: true}
	pass := true
	for _, r := range results {
		name := fmt.Sprintf("%s/%s %s", r.Mode, r.Talk, sizes(r))
		ls, cs := plot.Series{Name: name}, plot.Series{Name: name}
		for _, c := range r.Checkpoints {
			fmt.Fprintf(&md, "| %s | %s | %s | %gx | %d | %d | %d | %d | %d | %d | %d | %.0f | %.0f | %.0f | %.0f |\n", r.Mode, r.Talk, sizes(r), c.Fill,
				c.Evicted, c.Lost, c.Moved, c.EWEntries, c.EWOrphans, c.NSEntries, c.NSOrphans, c.NSNewFlowNs, c.NSEstablishedNs, c.EWEstablishedNs, c.FloodRate)
			ls.Points = append(ls.Points, plot.Point{X: c.Fill, Y: float64(c.Lost), Lo: float64(c.Lost), Hi: float64(c.Lost)})
			cs.Points = append(cs.Points, plot.Point{X: c.Fill, Y: c.NSNewFlowNs, Lo: c.NSNewFlowNs, Hi: c.NSNewFlowNs})
			if r.Mode == "zones" && (c.Evicted > 0 || c.Lost > 0 || c.EWOrphans > 0) {
				pass = false
			}
		}
		lost.Series = append(lost.Series, ls)
		cost.Series = append(cost.Series, cs)
	}
	md.WriteString("\n## Memory\n\nKernel memory of the conntrack maps (`memlock` as the kernel reports it): the price of zones is a second preallocated map.\n\n")
	md.WriteString("| mode | ew / ns size | map | MiB |\n|---|---|---|---|\n")
	seen := map[string]bool{}
	for _, r := range results {
		key := r.Mode + sizes(r)
		if seen[key] {
			continue
		}
		seen[key] = true
		var names []string
		for n := range r.Memlock {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			fmt.Fprintf(&md, "| %s | %s | %s | %.1f |\n", r.Mode, sizes(r), n, mib(r.Memlock[n]))
		}
	}
	verdict := verdictText(results)
	r := scenarios.Report{Name: "zones", Title: "Conntrack zones", Stamp: scenarios.Stamp(), Pass: pass, Verdict: verdict,
		WallSeconds: time.Since(start).Seconds(),
		Settings: map[string]any{"sizes": "4096/4096, 524288/131072 (shared: the sum)", "fills": fills, "established": 128,
			"talk": "idle, every 1x", "backends": 16},
		Data: map[string]any{"runs": results}}
	dir, err := scenarios.Write(r, md.String(), map[string]plot.Line{"ew-lost.svg": lost, "ns-new-flow-ns.svg": cost})
	require.NoError(t, err, "write results")
	t.Logf("wrote %s: %s", dir, verdict)
}

func sizes(r *zones.Result) string {
	if r.Mode == "zones" {
		return fmt.Sprintf("%d / %d", r.EWSize, r.NSSize)
	}
	return fmt.Sprintf("%d shared", r.EWSize+r.NSSize)
}

func verdictText(results []*zones.Result) string {
	var parts []string
	for _, r := range results {
		last := r.Checkpoints[len(r.Checkpoints)-1]
		parts = append(parts, fmt.Sprintf("%s/%s (%s): %d east-west entries evicted, %d of %d flows lost at 10x", r.Mode, r.Talk, sizes(r),
			last.Evicted, last.Lost, r.Established))
	}
	// Memory at the defaults: each mode's maps, from its first run.
	mem := map[string]map[string]uint64{}
	for _, r := range results {
		if r.NSSize == 128*1024 && mem[r.Mode] == nil {
			mem[r.Mode] = r.Memlock
		}
	}
	return "With zones a north-south flood of 10x its zone evicts no east-west entry. " + strings.Join(parts, "; ") +
		fmt.Sprintf(". Memory at the defaults: sp_ct_ns %.0f MiB beside sp_ct's %.0f MiB; one shared map of both sizes %.0f MiB.",
			mib(mem["zones"]["sp_ct_ns"]), mib(mem["zones"]["sp_ct"]), mib(mem["shared"]["sp_ct"]))
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }
