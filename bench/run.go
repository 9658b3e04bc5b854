package bench

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/kubeproxy"
	"github.com/servicepath/servicepath/harness/netperf"
	"github.com/servicepath/servicepath/suites/clusterip"
)

// Runner runs a profile.
type Runner struct {
	Profile  Profile
	Env      *Env
	Progress func(format string, args ...any)
	// Only, when non-empty, limits the run to these measures
	// ("connect", "bpf", "pod").
	Only map[string]bool
}

func (r *Runner) want(m string) bool { return len(r.Only) == 0 || r.Only[m] }

// Run measures everything the profile asks for.
func (r *Runner) Run(ctx context.Context, stamp Stamp) (*Results, error) {
	start := time.Now()
	res := &Results{Stamp: stamp, Settings: r.Profile, CPU: r.Env.CPU, Phases: map[string]float64{}}
	for _, c := range Contenders() {
		res.Contenders = append(res.Contenders, ContenderInfo{Name: c.Name, Describe: c.Describe, Pending: c.Pending})
	}
	phase := func(name string, fn func() error) error {
		t := time.Now()
		err := fn()
		res.Phases[name] = time.Since(t).Seconds()
		return err
	}
	if r.want("connect") {
		if err := phase("connect+control", func() error { return r.connectAndControl(ctx, res) }); err != nil {
			return res, err
		}
	}
	if err := ctx.Err(); err != nil {
		return res, err
	}
	if r.want("bpf") {
		if err := phase("bpf", func() error { return r.bpfCost(res) }); err != nil {
			return res, err
		}
	}
	if err := ctx.Err(); err != nil {
		return res, err
	}
	if r.want("pod") {
		if err := phase("pod", func() error { return r.podNetwork(res) }); err != nil {
			return res, err
		}
	}
	res.WallSecs = time.Since(start).Seconds()
	return res, nil
}

// loadHistory projects a contender's next from-scratch load.
type loadHistory struct {
	ns    []int
	times []time.Duration
}

// projected extrapolates to n with the exponent of the last two loads of
// at least 1000 services (at least linear), or quadratically from one such
// load (kube-proxy's nf_tables loads are, in practice); nothing is
// projected from smaller loads, whose fixed costs dominate.
func (h loadHistory) projected(n int) (time.Duration, bool) {
	var ns []float64
	var ts []float64
	for i, m := range h.ns {
		if m >= 1000 {
			ns = append(ns, float64(m))
			ts = append(ts, h.times[i].Seconds())
		}
	}
	if len(ns) == 0 {
		return 0, false
	}
	k := 2.0
	if l := len(ns); l >= 2 && ts[l-2] > 0 && ns[l-1] > ns[l-2] {
		k = max(1, math.Log(ts[l-1]/ts[l-2])/math.Log(ns[l-1]/ns[l-2]))
	}
	last := len(ns) - 1
	return time.Duration(ts[last] * math.Pow(float64(n)/ns[last], k) * float64(time.Second)), true
}

func (r *Runner) connectAndControl(ctx context.Context, res *Results) error {
	p := r.Profile
	skipped := map[string]string{}
	history := map[string]*loadHistory{}
	var active []Contender
	for _, c := range Contenders() {
		if c.Pending != "" {
			continue
		}
		if c.Available != nil {
			if err := c.Available(); err != nil {
				skipped[c.Name] = err.Error()
			}
		}
		history[c.Name] = &loadHistory{}
		active = append(active, c)
	}
	for _, n := range p.Ns {
		if err := ctx.Err(); err != nil {
			return err
		}
		services := kubeproxy.Synthetic(n, vipBase, vipPort, Endpoints())
		insts := map[string]Instance{}
		closeAll := func() error {
			var errs []error
			for _, in := range insts {
				errs = append(errs, in.Close())
			}
			return errors.Join(errs...)
		}
		for _, c := range active {
			if why := skipped[c.Name]; why != "" {
				res.Connect = append(res.Connect, ConnectResult{Contender: c.Name, N: n, Skipped: why})
				continue
			}
			h := history[c.Name]
			if est, ok := h.projected(n); ok && est > p.LoadBudget {
				skipped[c.Name] = fmt.Sprintf("loading %d services projected at %s, over the %s budget", n, est.Round(time.Second), p.LoadBudget)
				res.Connect = append(res.Connect, ConnectResult{Contender: c.Name, N: n, Skipped: skipped[c.Name]})
				r.Progress("  %-18s N=%-6d skipped: %s", c.Name, n, skipped[c.Name])
				continue
			}
			lctx, cancel := context.WithTimeout(ctx, p.LoadBudget)
			t0 := time.Now()
			in, err := c.Setup(lctx, r.Env, services)
			cancel()
			if err != nil {
				if lctx.Err() != nil {
					skipped[c.Name] = fmt.Sprintf("loading %d services exceeded the %s budget (killed)", n, p.LoadBudget)
				} else {
					skipped[c.Name] = fmt.Sprintf("setup at N=%d failed: %v", n, err)
				}
				res.Connect = append(res.Connect, ConnectResult{Contender: c.Name, N: n, Skipped: skipped[c.Name]})
				r.Progress("  %-18s N=%-6d %s", c.Name, n, skipped[c.Name])
				continue
			}
			insts[c.Name] = in
			if !c.Floor {
				h.ns = append(h.ns, n)
				h.times = append(h.times, in.Loaded())
			}
			r.Progress("  %-18s N=%-6d set up in %s (load %s)", c.Name, n, time.Since(t0).Round(time.Millisecond), in.Loaded().Round(time.Microsecond))
		}

		// New-connection latency, contenders interleaved in shuffled rounds.
		rounds := map[string][]Round{}
		failed := map[string]string{}
		for round := range p.Rounds {
			if err := ctx.Err(); err != nil {
				return errors.Join(err, closeAll())
			}
			order := make([]Contender, 0, len(active))
			for _, c := range active {
				if insts[c.Name] != nil && failed[c.Name] == "" {
					order = append(order, c)
				}
			}
			rand.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
			for _, c := range order {
				in := insts[c.Name]
				l, err := crr(in, netperf.CRROptions{CPU: r.Env.CPU, Size: 64, Warmup: p.Warmup, N: p.Samples})
				if err != nil {
					failed[c.Name] = fmt.Sprintf("connections to %s failed: %v", in.Target(), err)
					r.Progress("  %-18s N=%-6d %s", c.Name, n, failed[c.Name])
					continue
				}
				us := netperf.Micros(l.Samples)
				s := netperf.Summarize(us)
				rounds[c.Name] = append(rounds[c.Name], Round{P50: round1(s.P50), P90: round1(s.P90), P99: round1(s.P99), ConnPerSec: math.Round(l.PerSecond()), SamplesUs: roundAll(us)})
			}
			r.Progress("  N=%-6d latency round %d/%d done", n, round+1, p.Rounds)
		}
		var floorP50 float64
		for _, c := range active {
			if c.Floor && len(rounds[c.Name]) > 0 {
				floorP50 = SpreadOf(pick(rounds[c.Name], func(x Round) float64 { return x.P50 })).Median
			}
		}
		for _, c := range active {
			if insts[c.Name] == nil {
				continue
			}
			cr := ConnectResult{Contender: c.Name, N: n, Skipped: failed[c.Name], Rounds: rounds[c.Name]}
			if rs := rounds[c.Name]; len(rs) > 0 {
				cr.P50 = SpreadOf(pick(rs, func(x Round) float64 { return x.P50 }))
				cr.P90 = SpreadOf(pick(rs, func(x Round) float64 { return x.P90 }))
				cr.P99 = SpreadOf(pick(rs, func(x Round) float64 { return x.P99 }))
				cr.ConnPerSec = SpreadOf(pick(rs, func(x Round) float64 { return x.ConnPerSec }))
				if floorP50 > 0 {
					cr.RatioP50 = math.Round(cr.P50.Median/floorP50*100) / 100
				}
				var err error
				if cr.Programs, err = r.programCosts(insts[c.Name]); err != nil {
					return errors.Join(fmt.Errorf("%s at N=%d: %w", c.Name, n, err), closeAll())
				}
				r.Progress("  %-18s N=%-6d p50 %.1f us  p99 %.1f us  %.0f conn/s", c.Name, n, cr.P50.Median, cr.P99.Median, cr.ConnPerSec.Median)
			}
			res.Connect = append(res.Connect, cr)
		}

		// Control plane.
		if err := ctx.Err(); err != nil {
			return errors.Join(err, closeAll())
		}
		for _, c := range active {
			in := insts[c.Name]
			if in == nil || c.Floor {
				continue
			}
			r.control(ctx, res, c, in, n, services)
		}
		if err := closeAll(); err != nil {
			return fmt.Errorf("tear down at N=%d: %w", n, err)
		}
	}
	return nil
}

// programCosts runs one more round of connections through in with the
// kernel's BPF run-time stats on, and gives each program's runs per
// connection and time per run. The stats cost two clock reads per run, so
// they are off in the latency rounds. Nil for an instance without BPF.
func (r *Runner) programCosts(in Instance) ([]ProgramCost, error) {
	progs, ok := in.(programmed)
	if !ok {
		return nil, nil
	}
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		return nil, fmt.Errorf("enable BPF run-time stats: %w", err)
	}
	defer stats.Close()
	snapshot := func() (map[string]*ebpf.ProgramStats, error) {
		out := map[string]*ebpf.ProgramStats{}
		for name, prog := range progs.Programs() {
			st, err := prog.Stats()
			if err != nil {
				return nil, fmt.Errorf("stats of %s: %w", name, err)
			}
			out[name] = st
		}
		return out, nil
	}
	before, err := snapshot()
	if err != nil {
		return nil, err
	}
	l, err := crr(in, netperf.CRROptions{CPU: r.Env.CPU, Size: 64, N: r.Profile.Samples})
	if err != nil {
		return nil, err
	}
	after, err := snapshot()
	if err != nil {
		return nil, err
	}
	var costs []ProgramCost
	for _, name := range slices.Sorted(maps.Keys(after)) {
		runs := after[name].RunCount - before[name].RunCount
		if runs == 0 {
			continue // a hook these connections never call
		}
		runtime := after[name].Runtime - before[name].Runtime
		costs = append(costs, ProgramCost{
			Program:     name,
			RunsPerConn: round1(float64(runs) / float64(len(l.Samples))),
			NsPerRun:    round1(float64(runtime.Nanoseconds()) / float64(runs)),
		})
	}
	return costs, nil
}

func (r *Runner) control(ctx context.Context, res *Results, c Contender, in Instance, n int, services []kubeproxy.Service) {
	p := r.Profile
	loads := []float64{ms(in.Loaded())}
	spent := in.Loaded()
	for len(loads) < p.LoadRepeats && spent*4 < p.LoadBudget && c.LoadScratch != nil {
		lctx, cancel := context.WithTimeout(ctx, p.LoadBudget)
		d, err := c.LoadScratch(lctx, r.Env, services)
		cancel()
		if err != nil {
			r.Progress("  %-18s N=%-6d reload failed: %v", c.Name, n, err)
			break
		}
		loads = append(loads, ms(d))
		spent += d
	}
	res.Control = append(res.Control, ControlResult{Contender: c.Name, N: n, Op: OpLoad, SamplesMs: loads, Ms: SpreadOf(loads)})

	samples := map[Op][]float64{}
	var failed error
	eps := Endpoints()
	for k := range p.UpdateRepeats {
		ip := addedBase
		for range k {
			ip = ip.Next()
		}
		svc := kubeproxy.SyntheticService(n+k, ip, vipPort, eps)
		changed := svc
		changed.Endpoints = eps[:2]
		for _, step := range []struct {
			op  Op
			svc kubeproxy.Service
		}{{OpAdd, svc}, {OpChange, changed}, {OpRemove, svc}} {
			uctx, cancel := context.WithTimeout(ctx, p.LoadBudget)
			d, err := in.Apply(uctx, step.op, step.svc)
			cancel()
			if err != nil {
				failed = fmt.Errorf("%s: %w", step.op, err)
				break
			}
			samples[step.op] = append(samples[step.op], ms(d))
		}
		if failed != nil {
			break
		}
	}
	for _, op := range []Op{OpAdd, OpChange, OpRemove} {
		cr := ControlResult{Contender: c.Name, N: n, Op: op, SamplesMs: samples[op], Ms: SpreadOf(samples[op])}
		if failed != nil {
			cr.Skipped = failed.Error()
		}
		res.Control = append(res.Control, cr)
	}
	r.Progress("  %-18s N=%-6d load %.1f ms, add %.2f ms, change %.2f ms, remove %.2f ms", c.Name, n,
		SpreadOf(loads).Median, SpreadOf(samples[OpAdd]).Median, SpreadOf(samples[OpChange]).Median, SpreadOf(samples[OpRemove]).Median)
}

// BPFRows are the fixture rows timed at each N: a connection's first
// packet, a packet of an established flow, a reply, and a packet that is
// not for a service.
var BPFRows = []struct{ Name, Describe string }{
	{"ipv4/tcp-syn-to-vip-dnat-to-backend", "first packet (SYN): lookup, backend choice, CT create, DNAT"},
	{"ipv4/tcp-established-keeps-backend", "established flow: CT hit, DNAT"},
	{"ipv4/tcp-reply-source-back-to-vip", "reply into the client pod: reverse NAT"},
	{"ipv4/not-a-service-passes-untouched", "not a service: lookup miss"},
}

func (r *Runner) bpfCost(res *Results) error {
	p := r.Profile
	byName := map[string]inject.Fixture{}
	for _, f := range clusterip.Fixtures() {
		byName[f.Name] = f
	}
	var rows []inject.Fixture
	for _, row := range BPFRows {
		f, ok := byName[row.Name]
		if !ok {
			return fmt.Errorf("fixture row %q not in the ClusterIP table", row.Name)
		}
		rows = append(rows, f)
	}
	sized := r.Env.DatapathConfig()
	for _, n := range p.Ns {
		// The fixture programs its own service; N-1 others come first.
		owners, fillers := toServices(kubeproxy.Synthetic(n-1, vipBase, vipPort, Endpoints()))
		repeats := map[string][]float64{}
		empty := map[string][]float64{}
		for range p.BPFRepeats {
			ts, err := inject.Measure(rows, inject.MeasureOptions{
				Runs: p.BPFRuns,
				Config: func(c *loader.Config) {
					c.ServiceMapSize, c.BackendMapSize = sized.ServiceMapSize, sized.BackendMapSize
				},
				Prepare: func(e *inject.Env) error { return e.Services.Apply(owners, fillers) },
			})
			if err != nil {
				return fmt.Errorf("BPF cost at N=%d: %w", n, err)
			}
			for _, t := range ts {
				repeats[t.Name] = append(repeats[t.Name], round1(t.PacketNs))
				empty[t.Name] = append(empty[t.Name], t.EmptyNs)
			}
		}
		for _, row := range BPFRows {
			br := BPFResult{N: n, Fixture: row.Name, Describe: row.Describe, RepeatsNs: repeats[row.Name],
				NsPerPacket: SpreadOf(repeats[row.Name]), EmptyNs: round1(SpreadOf(empty[row.Name]).Median), Runs: p.BPFRuns}
			res.BPF = append(res.BPF, br)
		}
		r.Progress("  BPF N=%-6d first packet %.0f ns, established %.0f ns", n,
			SpreadOf(repeats[BPFRows[0].Name]).Median, SpreadOf(repeats[BPFRows[1].Name]).Median)
	}
	return nil
}

func pick[T any](xs []T, f func(T) float64) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = f(x)
	}
	return out
}

func ms(d time.Duration) float64 { return math.Round(float64(d.Nanoseconds())/1e3) / 1e3 }

func round1(x float64) float64 { return math.Round(x*10) / 10 }

func roundAll(xs []float64) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = round1(x)
	}
	return out
}

// crr measures new connections from in's client, from inside the cgroup
// the instance's socket hooks watch when it has one.
func crr(in Instance, opts netperf.CRROptions) (netperf.Latencies, error) {
	j, ok := in.(cgroupJoiner)
	if !ok {
		return netperf.RunCRR(in.Client(), in.Target(), opts)
	}
	leave, err := j.Join()
	if err != nil {
		return netperf.Latencies{}, err
	}
	l, err := netperf.RunCRR(in.Client(), in.Target(), opts)
	return l, errors.Join(err, leave())
}
