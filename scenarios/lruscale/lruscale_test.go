package lruscale_test

import (
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/bench/plot"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/scenarios"
	"github.com/servicepath/servicepath/scenarios/lruscale"
)

// modes are the LRU variants at one talk period (in map turnovers): the
// common LRU, the per-CPU LRU with everything on CPU 0, and (otherCPU) the
// per-CPU LRU with the flood on CPU 1.
func modes(mapSize uint32, fills []float64, period float64, samples int, otherCPU bool) []lruscale.Options {
	base := lruscale.Options{MapSize: mapSize, Fills: fills, Established: 128, Period: period, Backends: 16,
		FloodCPU: 0, EstablishedCPU: 0, Samples: samples}
	percpu := base
	percpu.NoCommonLRU = true
	out := []lruscale.Options{base, percpu}
	if otherCPU && runtime.NumCPU() > 1 {
		other := percpu
		other.FloodCPU = 1
		out = append(out, other)
	}
	return out
}

// The small form: a 4096-entry map filled to 10x, each LRU mode.
func TestLRUScaleSmall(t *testing.T) {
	testenv.RequireRoot(t)
	for _, o := range modes(4096, []float64{1, 2, 10}, 0.25, 200, false) {
		res, err := lruscale.Run(o)
		require.NoError(t, err, "run %+v", o)
		last := res.Checkpoints[len(res.Checkpoints)-1]
		t.Logf("%s: %+v", res.Mode, res.Checkpoints)
		assert.LessOrEqual(t, last.Entries, 4096, "%s: the map never holds more than its size", res.Mode)
		assert.LessOrEqual(t, last.Lost, o.Established, "%s: lost counts distinct flows", res.Mode)
		if res.LRU == "common-lru" {
			assert.Zero(t, last.Lost, "common LRU: established flows that talk 4x per map turnover are never evicted, even at 10x fill")
		}
	}
}

// The full form: 4096- and 65536-entry maps to 10x, and GC cost up to
// the default 512Ki map.
func TestLRUScaleFull(t *testing.T) {
	scenarios.SkipUnlessFull(t)
	testenv.RequireRoot(t)
	start := time.Now()
	fills := []float64{0.25, 0.5, 1, 2, 5, 10}
	var results []*lruscale.Result
	for _, size := range []uint32{4096, 65536} {
		for _, period := range []float64{0.25, 1, 4} {
			for _, o := range modes(size, fills, period, 2000, size == 4096 && period == 0.25) {
				res, err := lruscale.Run(o)
				require.NoError(t, err, "run %+v", o)
				results = append(results, res)
			}
		}
	}
	gc, err := lruscale.MeasureGC([]uint32{4096, 65536, 524288})
	require.NoError(t, err, "measure GC")

	var md strings.Builder
	pass := true
	md.WriteString("Each flow inserts two entries (service and flow); fill = entries inserted by new flows / map size. " +
		"128 established flows each send a reply and a forward packet once every *talk* map turnovers (talk-every-0.25x: every size/4 new entries, 4 times per turnover; 4x: once per 4 turnovers). " +
		"A flow is *lost* once its reply left untranslated or its forward packet re-picked a backend; *moved* when the re-pick chose another backend (a TCP connection then breaks). " +
		"ns/packet is kernel-timed (BPF_PROG_TEST_RUN, one run per copy) less an empty tc program. Injection is pinned to CPU 0 (flood and established flows), or the flood to CPU 1.\n\n")
	md.WriteString("| mode | map | fill | lost | moved | reselected | unxlated | entries | orphans | new-flow ns | established ns | flood flows/s | gc ms (cpu) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	charts := map[string]plot.Line{}
	lost := plot.Line{Title: "Established flows lost vs fill", XLabel: "fill (x map size)", YLabel: "established flows lost (of 128)", LogX: true}
	cost := plot.Line{Title: "Established-packet cost vs fill", XLabel: "fill (x map size)", YLabel: "ns/packet", LogX: true}
	newc := plot.Line{Title: "New-flow cost vs fill", XLabel: "fill (x map size)", YLabel: "ns/packet", LogX: true}
	for _, r := range results {
		name := fmt.Sprintf("%s %d", r.Mode, r.MapSize)
		var ls, cs, ns plot.Series
		ls.Name, cs.Name, ns.Name = name, name, name
		for _, c := range r.Checkpoints {
			fmt.Fprintf(&md, "| %s | %d | %gx | %d | %d | %d | %d | %d | %d | %.0f | %.0f | %.0f | %.2f (%.2f) |\n", r.Mode, r.MapSize, c.Fill,
				c.Lost, c.Moved, c.Reselected, c.Unxlated, c.Entries, c.Orphans, c.NewFlowNs, c.EstablishedNs, c.FloodRate, c.GCMs, c.GCCPUMs)
			ls.Points = append(ls.Points, plot.Point{X: c.Fill, Y: float64(c.Lost), Lo: float64(c.Lost), Hi: float64(c.Lost)})
			cs.Points = append(cs.Points, plot.Point{X: c.Fill, Y: c.EstablishedNs, Lo: c.EstablishedNs, Hi: c.EstablishedNs})
			ns.Points = append(ns.Points, plot.Point{X: c.Fill, Y: c.NewFlowNs, Lo: c.NewFlowNs, Hi: c.NewFlowNs})
			if r.LRU == "common-lru" && r.Period < 1 && c.Lost > 0 {
				pass = false
			}
		}
		if r.MapSize == 4096 {
			lost.Series = append(lost.Series, ls)
		}
		cost.Series = append(cost.Series, cs)
		newc.Series = append(newc.Series, ns)
	}
	charts["lost.svg"], charts["established-ns.svg"], charts["new-flow-ns.svg"] = lost, cost, newc
	md.WriteString("\n## GC cost\n\nA map filled to 90% with synthetic pairs, a third expired. *per-key walk* is the GC before this change (iterate, a partner lookup per expired entry, a delete per key); *batched* reads with BPF_MAP_LOOKUP_BATCH, pairs in memory and deletes with one BPF_MAP_DELETE_BATCH; the *quarter slice* is one paced pass (the pacer's calm budget with 4 passes per sweep).\n\n")
	md.WriteString("| map size | entries | impl | deleted | wall ms | cpu ms | syscalls |\n|---|---|---|---|---|---|---|\n")
	for _, g := range gc {
		fmt.Fprintf(&md, "| %d | %d | %s | %d | %.1f | %.1f | %d |\n", g.Size, g.Entries, g.Impl, g.Deleted, g.WallMs, g.CPUMs, g.Syscalls)
	}
	verdict := verdictText(results, gc)
	r := scenarios.Report{Name: "lruscale", Title: "LRU scale", Stamp: scenarios.Stamp(), Pass: pass, Verdict: verdict,
		WallSeconds: time.Since(start).Seconds(),
		Settings:    map[string]any{"map_sizes": "4096,65536", "fills": fills, "established": 128, "talk_periods": "0.25,1,4", "backends": 16},
		Data:        map[string]any{"runs": results, "gc": gc}}
	dir, err := scenarios.Write(r, md.String(), charts)
	require.NoError(t, err, "write results")
	t.Logf("wrote %s: %s", dir, verdict)
}

func verdictText(results []*lruscale.Result, gc []lruscale.GCCost) string {
	var parts []string
	for _, r := range results {
		last := r.Checkpoints[len(r.Checkpoints)-1]
		parts = append(parts, fmt.Sprintf("%s/%d lost %d of %d established flows at 10x (%d moved)", r.Mode, r.MapSize, last.Lost, r.Established, last.Moved))
	}
	var walk, batch float64
	for _, g := range gc {
		if g.Size == 524288 {
			switch g.Impl {
			case "per-key walk":
				walk = g.WallMs
			case "batched whole map":
				batch = g.WallMs
			}
		}
	}
	return strings.Join(parts, "; ") + fmt.Sprintf(". GC of a 90%%-full 512Ki map: %.0f ms per-key, %.0f ms batched.", walk, batch)
}
