package bench

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"

	"github.com/servicepath/servicepath/bench/plot"
)

// Write puts results.json, README.md and the SVG plots in dir.
func Write(dir string, r *Results) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	js, err := json.MarshalIndent(r, "", " ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "results.json"), append(js, '\n'), 0o644); err != nil {
		return err
	}
	plots, err := writePlots(dir, r)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "README.md"), []byte(Markdown(r, plots)), 0o644)
}

func ns(r *Results) []int {
	return r.Settings.Ns
}

func measured(r *Results) []ContenderInfo {
	var out []ContenderInfo
	for _, c := range r.Contenders {
		if c.Pending == "" {
			out = append(out, c)
		}
	}
	return out
}

func writePlots(dir string, r *Results) ([]string, error) {
	var names []string
	write := func(name string, render func(b *bytes.Buffer) error) error {
		var b bytes.Buffer
		if err := render(&b); err != nil {
			return err
		}
		names = append(names, name)
		return os.WriteFile(filepath.Join(dir, name), b.Bytes(), 0o644)
	}
	if len(r.Connect) > 0 {
		for _, q := range []struct {
			file, label string
			get         func(c *ConnectResult) Spread
		}{{"connect-p50.svg", "p50", func(c *ConnectResult) Spread { return c.P50 }},
			{"connect-p99.svg", "p99", func(c *ConnectResult) Spread { return c.P99 }}} {
			var series []plot.Series
			for _, c := range measured(r) {
				s := plot.Series{Name: c.Name}
				for _, n := range ns(r) {
					if cr := r.ConnectAt(c.Name, n); cr != nil && len(cr.Rounds) > 0 {
						v := q.get(cr)
						s.Points = append(s.Points, plot.Point{X: float64(n), Y: v.Median, Lo: v.Min, Hi: v.Max})
					}
				}
				series = append(series, s)
			}
			l := plot.Line{Title: "New-connection latency (" + q.label + ") vs services", XLabel: "services (log scale)",
				YLabel: q.label + " latency, microseconds (log scale)", LogX: true, LogY: true, Series: series}
			if err := write(q.file, func(b *bytes.Buffer) error { return l.Write(b) }); err != nil {
				return nil, err
			}
		}
	}
	if len(r.Control) > 0 {
		for _, op := range Ops {
			var series []plot.Series
			for _, c := range measured(r) {
				s := plot.Series{Name: c.Name}
				for _, n := range ns(r) {
					if cr := r.ControlAt(c.Name, n, op); cr != nil && len(cr.SamplesMs) > 0 {
						s.Points = append(s.Points, plot.Point{X: float64(n), Y: cr.Ms.Median, Lo: cr.Ms.Min, Hi: cr.Ms.Max})
					}
				}
				if len(s.Points) > 0 {
					series = append(series, s)
				}
			}
			l := plot.Line{Title: "Control plane: " + opTitle(op) + " vs services", XLabel: "services (log scale)",
				YLabel: "milliseconds (log scale)", LogX: true, LogY: true, Series: series}
			if err := write("update-"+string(op)+".svg", func(b *bytes.Buffer) error { return l.Write(b) }); err != nil {
				return nil, err
			}
		}
	}
	if len(r.BPF) > 0 {
		var series []plot.Series
		for _, row := range BPFRows {
			s := plot.Series{Name: strings.TrimPrefix(row.Name, "ipv4/")}
			for _, b := range r.BPF {
				if b.Fixture == row.Name {
					s.Points = append(s.Points, plot.Point{X: float64(b.N), Y: b.NsPerPacket.Median, Lo: b.NsPerPacket.Min, Hi: b.NsPerPacket.Max})
				}
			}
			series = append(series, s)
		}
		l := plot.Line{Title: "BPF program cost (BPF_PROG_TEST_RUN) vs services", XLabel: "services (log scale)",
			YLabel: "ns per packet", LogX: true, Series: series}
		if err := write("bpf-ns-per-packet.svg", func(b *bytes.Buffer) error { return l.Write(b) }); err != nil {
			return nil, err
		}
	}
	if len(r.Pod) > 0 {
		var cats []string
		gbps := plot.Series{Name: "Gbit/s"}
		rr := []plot.Series{{Name: "min"}, {Name: "p50"}, {Name: "p90"}, {Name: "p99"}}
		for _, p := range r.Pod {
			if p.Pending != "" {
				continue
			}
			cats = append(cats, p.Path)
			gbps.Points = append(gbps.Points, plot.Point{Y: p.Gbps.Median, Lo: p.Gbps.Min, Hi: p.Gbps.Max})
			for i, s := range []Spread{p.RRMin, p.RRP50, p.RRP90, p.RRP99} {
				rr[i].Points = append(rr[i].Points, plot.Point{Y: s.Median, Lo: s.Min, Hi: s.Max})
			}
		}
		b1 := plot.Bars{Title: "Single TCP stream throughput per path", YLabel: "Gbit/s", Categories: cats, Series: []plot.Series{gbps}}
		b2 := plot.Bars{Title: "TCP request/response latency per path (1 B)", YLabel: "microseconds", Categories: cats, Series: rr}
		if err := write("pod-stream.svg", func(b *bytes.Buffer) error { return b1.Write(b) }); err != nil {
			return nil, err
		}
		if err := write("pod-rr.svg", func(b *bytes.Buffer) error { return b2.Write(b) }); err != nil {
			return nil, err
		}
	}
	return names, nil
}

func opTitle(op Op) string {
	switch op {
	case OpLoad:
		return "load all N from scratch"
	case OpAdd:
		return "add one service"
	case OpChange:
		return "change one service's backends"
	}
	return "remove one service"
}

func fmtSpread(s Spread, digits int) string {
	if s.N == 0 || math.IsNaN(s.Median) {
		return "–"
	}
	f := "%." + fmt.Sprint(digits) + "f"
	if s.N == 1 || s.Min == s.Max {
		return fmt.Sprintf(f, s.Median)
	}
	return fmt.Sprintf(f+" ("+f+"–"+f+")", s.Median, s.Min, s.Max)
}

func fmtMs(s Spread) string {
	if s.N == 0 {
		return "–"
	}
	d := 1
	switch {
	case s.Median < 1:
		d = 3
	case s.Median < 10:
		d = 2
	}
	return fmtSpread(s, d)
}

// HeadlineTable is new-connection p50 per contender and N with the ratio
// to the floor; results/README.md shows it too.
func HeadlineTable(r *Results) string {
	var b strings.Builder
	b.WriteString("| contender |")
	for _, n := range ns(r) {
		fmt.Fprintf(&b, " N=%s |", plot.Label(float64(n)))
	}
	b.WriteString("\n|---|")
	for range ns(r) {
		b.WriteString("---|")
	}
	b.WriteString("\n")
	for _, c := range r.Contenders {
		fmt.Fprintf(&b, "| %s |", c.Name)
		for _, n := range ns(r) {
			cr := r.ConnectAt(c.Name, n)
			switch {
			case c.Pending != "":
				b.WriteString(" pending |")
			case cr == nil:
				b.WriteString(" – |")
			case len(cr.Rounds) == 0:
				b.WriteString(" not run¹ |")
			case c.Name == "floor":
				fmt.Fprintf(&b, " %.1f µs |", cr.P50.Median)
			default:
				fmt.Fprintf(&b, " %.1f µs (%.2f×) |", cr.P50.Median, cr.RatioP50)
			}
		}
		b.WriteString("\n")
	}
	return b.String()
}

// Markdown renders the report.
func Markdown(r *Results, plots []string) string {
	var b strings.Builder
	st := r.Stamp
	fmt.Fprintf(&b, "# servicepath benchmark: %s, %s\n\n", st.Kernel, strings.SplitN(st.Date, "T", 2)[0])
	fmt.Fprintf(&b, "Profile **%s** (`BENCH=%s make bench`), wall time %.0f s. Kernel `%s` (%s), CPU %s × %d, commit `%s`, %s, %s.\n",
		r.Settings.Name, r.Settings.Name, r.WallSecs, st.Kernel, st.Machine, st.CPUModel, st.NumCPU, st.Commit, st.Go, st.Date)
	fmt.Fprintf(&b, "Tools: %s; %s; %s. Client and server threads pinned to CPU %d. Raw samples and settings: [results.json](results.json).\n\n",
		st.Tools["iptables-legacy-restore"], st.Tools["iptables-nft-restore"], st.Tools["nft"], r.CPU)
	b.WriteString("Every figure is the median of repeated runs with the range (min–max) in brackets; every ratio is taken " +
		"between contenders measured in this same run.\n\n")

	if len(r.Connect) > 0 {
		b.WriteString("## Headline: new-connection latency (p50) vs number of services\n\n")
		b.WriteString("connect + 64 B request + 64 B response + close, sequential, target service last; ratio to the floor (no rules) in brackets.\n\n")
		b.WriteString(HeadlineTable(r))
		b.WriteString("\n¹ not run: see the reason in the full table below.\n\n")
		for _, p := range plots {
			if strings.HasPrefix(p, "connect-") {
				fmt.Fprintf(&b, "![%s](%s)\n", p, p)
			}
		}
		b.WriteString("\n## Contenders\n\n| contender | what | status |\n|---|---|---|\n")
		for _, c := range r.Contenders {
			status := "measured"
			if c.Pending != "" {
				status = "**not measured**: " + c.Pending
			}
			fmt.Fprintf(&b, "| %s | %s | %s |\n", c.Name, c.Describe, status)
		}
		b.WriteString("\nEach contender has its own topology from `harness/topology`: a client pod, a node netns holding the " +
			"rules or BPF programs, and three backend pods, each with a pinned server. Services are generated by " +
			"`harness/kubeproxy` (3 endpoints each, ClusterIPs from 10.96.0.1; kube-proxy's rule layout for the " +
			"iptables and nftables contenders). Contenders run interleaved in shuffled rounds.\n\n")

		b.WriteString("## 1. New-connection latency\n\n| contender | N | p50 µs | p90 µs | p99 µs | conn/s | p50 × floor |\n|---|---|---|---|---|---|---|\n")
		for _, c := range measured(r) {
			for _, n := range ns(r) {
				cr := r.ConnectAt(c.Name, n)
				if cr == nil {
					continue
				}
				if len(cr.Rounds) == 0 {
					fmt.Fprintf(&b, "| %s | %d | not run: %s | | | | |\n", c.Name, n, cr.Skipped)
					continue
				}
				ratio := "1"
				if c.Name != "floor" {
					ratio = fmt.Sprintf("%.2f", cr.RatioP50)
				}
				fmt.Fprintf(&b, "| %s | %d | %s | %s | %s | %s | %s |\n", c.Name, n, fmtSpread(cr.P50, 1), fmtSpread(cr.P90, 1),
					fmtSpread(cr.P99, 1), fmtSpread(cr.ConnPerSec, 0), ratio)
			}
		}
		fmt.Fprintf(&b, "\n%d rounds × %d connections per contender per N (after %d unrecorded).\n\n", r.Settings.Rounds, r.Settings.Samples, r.Settings.Warmup)
		b.WriteString(programCostTable(r))
	}

	if len(r.BPF) > 0 {
		b.WriteString("## 2. BPF program cost (BPF_PROG_TEST_RUN, ns/packet)\n\n")
		b.WriteString("Rows of the ClusterIP fixture table (`suites/clusterip`), timed by `inject.Measure` with N−1 other services programmed first; the empty program's time is subtracted.\n\n| fixture | ")
		for _, n := range ns(r) {
			fmt.Fprintf(&b, "N=%s | ", plot.Label(float64(n)))
		}
		b.WriteString("\n|---|")
		for range ns(r) {
			b.WriteString("---|")
		}
		b.WriteString("\n")
		for _, row := range BPFRows {
			fmt.Fprintf(&b, "| %s (%s) |", strings.TrimPrefix(row.Name, "ipv4/"), row.Describe)
			for _, n := range ns(r) {
				for _, x := range r.BPF {
					if x.Fixture == row.Name && x.N == n {
						fmt.Fprintf(&b, " %s |", fmtSpread(x.NsPerPacket, 0))
					}
				}
			}
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "\n%d repeats × %d runs per row.\n\n![bpf](bpf-ns-per-packet.svg)\n\n", r.Settings.BPFRepeats, r.Settings.BPFRuns)
	}

	if len(r.Control) > 0 {
		b.WriteString("## 3. Control plane (milliseconds)\n\n")
		b.WriteString("kube-proxy contenders: the wall time of `iptables-restore --noflush --counters` (partial sync: KUBE-SERVICES and the " +
			"other top-level chains rewritten in full, only the changed service's chains written) or `nft -f` (incremental: " +
			"only the service's chains and map elements), started in the node netns. servicepath: `service.Manager` map " +
			"updates. *load* is all N from scratch (one sample when a load is too slow to repeat); change is 3 → 2 backends.\n\n")
		b.WriteString("| contender | N | load | add | change | remove |\n|---|---|---|---|---|---|\n")
		for _, c := range measured(r) {
			if c.Name == "floor" {
				continue
			}
			for _, n := range ns(r) {
				var cells []string
				any := false
				for _, op := range Ops {
					cr := r.ControlAt(c.Name, n, op)
					if cr == nil {
						cells = append(cells, "–")
						continue
					}
					any = true
					cells = append(cells, fmtMs(cr.Ms))
				}
				if any {
					fmt.Fprintf(&b, "| %s | %d | %s |\n", c.Name, n, strings.Join(cells, " | "))
				}
			}
		}
		b.WriteString("\n")
		for _, p := range plots {
			if strings.HasPrefix(p, "update-") {
				fmt.Fprintf(&b, "![%s](%s)\n", p, p)
			}
		}
		b.WriteString("\n")
	}

	if len(r.Pod) > 0 {
		b.WriteString("## 4. Pod networking per path\n\n")
		b.WriteString("Single TCP flow in the style of `tcp_mmap`: 512 KiB writes, receiver tries `TCP_ZEROCOPY_RECEIVE` on a 512 KiB " +
			"mapping of the socket and reads what it cannot map; CPU is sender + receiver thread time (getrusage RUSAGE_THREAD) " +
			"per MB, both pinned to one CPU, so softirq work is charged to them. Request/response: 1 B each way on one " +
			"connection (netperf TCP_RR style). Ratios to the host baseline from this run.\n\n")
		b.WriteString("| path | Gbit/s | × host | CPU µs/MB | receive | RR min µs | RR p50 µs | RR p90 µs | RR p99 µs | RR p50 × host | RR p99 × host |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
		for _, p := range r.Pod {
			if p.Pending != "" {
				fmt.Fprintf(&b, "| %s | not measured: %s | | | | | | | | | |\n", p.Path, p.Pending)
				continue
			}
			fmt.Fprintf(&b, "| %s | %s | %.2f | %s | %s | %s | %s | %s | %s | %.2f | %.2f |\n", p.Path, fmtSpread(p.Gbps, 2), p.RatioGbps,
				fmtSpread(p.CPUUsPerMB, 0), strings.Join(p.Receive, "; "), fmtSpread(p.RRMin, 1), fmtSpread(p.RRP50, 1),
				fmtSpread(p.RRP90, 1), fmtSpread(p.RRP99, 1), p.RatioRRP50, p.RatioRRP99)
		}
		b.WriteString("\n")
		for _, p := range r.Pod {
			fmt.Fprintf(&b, "- **%s**: %s\n", p.Path, p.Describe)
		}
		fmt.Fprintf(&b, "\n%d repeats, %s streams, %d RR transactions each.\n\n![stream](pod-stream.svg)\n![rr](pod-rr.svg)\n\n",
			r.Settings.PodRepeats, r.Settings.StreamDuration, r.Settings.RRSamples)
	}
	if len(r.Notes) > 0 {
		b.WriteString("## Notes\n\n")
		for _, n := range r.Notes {
			fmt.Fprintf(&b, "- %s\n", n)
		}
		b.WriteString("\n")
	}
	b.WriteString("## Phases (seconds)\n\n")
	for _, k := range []string{"connect+control", "bpf", "pod"} {
		if v, ok := r.Phases[k]; ok {
			fmt.Fprintf(&b, "- %s: %.0f\n", k, v)
		}
	}
	return b.String()
}

// WriteIndex regenerates results/README.md: a link to the latest report
// and its headline table, beside the kernel matrix.
func WriteIndex(resultsDir, reportDir string, r *Results) error {
	rel, err := filepath.Rel(resultsDir, reportDir)
	if err != nil {
		return err
	}
	var b strings.Builder
	b.WriteString("# Results\n\nGenerated by `make bench` (`bench/cmd/bench`); do not edit.\n\n")
	fmt.Fprintf(&b, "## Latest benchmark: [%s](%s/README.md)\n\n", rel, filepath.ToSlash(rel))
	fmt.Fprintf(&b, "Profile %s, kernel `%s`, %s × %d, commit `%s`, %s.\n\n", r.Settings.Name, r.Stamp.Kernel, r.Stamp.CPUModel, r.Stamp.NumCPU, r.Stamp.Commit, r.Stamp.Date)
	b.WriteString("New-connection latency p50 (connect + 64 B request/response + close), target service last; ratio to no rules at all in brackets:\n\n")
	b.WriteString(HeadlineTable(r))
	b.WriteString("\n¹ not run within the profile's load budget; see the report.\n\n")
	fmt.Fprintf(&b, "![p50](%s/connect-p50.svg)\n\n", filepath.ToSlash(rel))
	b.WriteString("## Kernel matrix\n\n[kernels/README.md](kernels/README.md) (`make vmtest`).\n")
	return os.WriteFile(filepath.Join(resultsDir, "README.md"), []byte(b.String()), 0o644)
}

// programCostTable is where a BPF contender's time goes: each program's
// kernel run-time stats over a round of its own.
func programCostTable(r *Results) string {
	var b strings.Builder
	for _, c := range measured(r) {
		for _, n := range ns(r) {
			cr := r.ConnectAt(c.Name, n)
			if cr == nil || len(cr.Programs) == 0 {
				continue
			}
			if b.Len() == 0 {
				b.WriteString("### Where the BPF contenders' time goes\n\n")
				fmt.Fprintf(&b, "One more round of %d connections per BPF contender with the kernel's run-time stats on "+
					"(`kernel.bpf_stats_enabled`, off in the rounds above: it costs two clock reads per run): what each "+
					"program costs per run on real packets and socket calls, and the BPF time of one connection beside its p50.\n\n", r.Settings.Samples)
				b.WriteString("| contender | N | program | runs / connection | ns / run | BPF µs / connection | share of p50 |\n|---|---|---|---|---|---|---|\n")
			}
			for _, p := range cr.Programs {
				fmt.Fprintf(&b, "| %s | %d | %s | %.1f | %.0f | | |\n", c.Name, n, p.Program, p.RunsPerConn, p.NsPerRun)
			}
			total := cr.NsPerConn() / 1e3
			fmt.Fprintf(&b, "| %s | %d | all | | | %.2f | %.1f%% |\n", c.Name, n, total, 100*total/cr.P50.Median)
		}
	}
	if b.Len() > 0 {
		b.WriteString("\n")
	}
	return b.String()
}
