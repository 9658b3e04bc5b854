// Command bench is `make bench`: servicepath against kube-proxy (iptables
// and nftables modes) and no rules at all, across numbers of services,
// plus the BPF programs' own cost, control-plane update times and pod
// networking per path. It writes results/bench/<kernel>-<date>/
// (results.json, README.md, SVG plots) and regenerates results/README.md.
//
//	BENCH=quick make bench      # the default; under 15 minutes on 2 cores
//	BENCH=full make bench       # up to 100k services; for dedicated hardware
//	BENCH=smoke make bench      # tiny, a few seconds of each measure (CI)
//
// It needs root: it creates network namespaces, loads BPF and writes
// rules, only inside namespaces it creates.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/servicepath/servicepath/bench"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run() error {
	def := os.Getenv("BENCH")
	if def == "" {
		def = "quick"
	}
	profile := flag.String("profile", def, "quick, full or smoke (default from $BENCH, else quick)")
	out := flag.String("out", "", "report directory (default results/bench/<kernel>-<date>; smoke: a temporary directory)")
	results := flag.String("results", "results", "results directory whose README.md links the latest report (quick and full only)")
	cpu := flag.Int("cpu", runtime.NumCPU()-1, "CPU every client and server thread is pinned to")
	only := flag.String("only", "", "comma-separated measures to run: connect, bpf, pod (default all)")
	render := flag.String("render", "", "only rewrite the report and plots of this directory from its results.json (and the index)")
	flag.Parse()
	if *render != "" {
		return rerender(*render, *results)
	}

	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root (network namespaces, BPF, rules inside its own namespaces)")
	}
	p, err := bench.ProfileByName(*profile)
	if err != nil {
		return err
	}
	start := time.Now()
	progress := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "[%6.1fs] %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, args...))
	}
	env, err := bench.NewEnv(*cpu, p.MaxN())
	if err != nil {
		return err
	}
	defer env.Close()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	r := &bench.Runner{Profile: p, Env: env, Progress: progress, Only: map[string]bool{}}
	for _, m := range strings.Split(*only, ",") {
		if m = strings.TrimSpace(m); m != "" {
			r.Only[m] = true
		}
	}
	stamp := bench.NewStamp(".")
	progress("profile %s: N=%v, kernel %s, %s x %d, commit %s", p.Name, p.Ns, stamp.Kernel, stamp.CPUModel, stamp.NumCPU, stamp.Commit)
	res, err := r.Run(ctx, stamp)
	if err != nil {
		return err
	}
	res.Notes = append(res.Notes,
		"A pod networking path whose device this kernel lacks (netkit before 6.7, or built without it) is listed with the reason it was not measured, not faked; netkit's numbers come from a kernel that has it.",
		"The host baseline is netns → veth → netns without forwarding: the topology builder makes one node, so two hosts joined by a wire is the closest shape.",
		"A contender whose from-scratch load of N services exceeds (or is projected to exceed) the profile's load budget is not run at that N or above; the reason is recorded.",
		"Added services take ClusterIPs from 10.112.0.1 and go last in KUBE-SERVICES; updates run after the latency rounds, so the target stays last while it is measured.")

	dir := *out
	if dir == "" {
		if p.Name == "smoke" {
			if dir, err = os.MkdirTemp("", "servicepath-bench-smoke-"); err != nil {
				return err
			}
		} else {
			dir = filepath.Join(*results, "bench", stamp.Kernel+"-"+time.Now().UTC().Format("2006-01-02"))
		}
	}
	if err := bench.Write(dir, res); err != nil {
		return err
	}
	if p.Name != "smoke" && len(r.Only) == 0 {
		if err := bench.WriteIndex(*results, dir, res); err != nil {
			return err
		}
	}
	progress("report: %s/README.md (%.0f s)", dir, time.Since(start).Seconds())
	fmt.Println(bench.HeadlineTable(res))
	return nil
}

// rerender rewrites a report from its results.json, for report changes
// that need no new measurements.
func rerender(dir, results string) error {
	js, err := os.ReadFile(filepath.Join(dir, "results.json"))
	if err != nil {
		return err
	}
	var res bench.Results
	if err := json.Unmarshal(js, &res); err != nil {
		return fmt.Errorf("%s/results.json: %w", dir, err)
	}
	if err := bench.Write(dir, &res); err != nil {
		return err
	}
	if res.Settings.Name != "smoke" {
		return bench.WriteIndex(results, dir, &res)
	}
	return nil
}
