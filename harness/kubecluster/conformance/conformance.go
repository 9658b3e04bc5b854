// Package conformance runs the upstream Kubernetes e2e suite's network
// tests (e2e.test, built by tools/kube) against one-machine clusters
// (harness/kubecluster) whose Services are implemented by kube-proxy in
// iptables and nftables modes and by servicepath with and without
// socket-level load balancing, and writes the results side by side.
package conformance

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/servicepath/servicepath/harness/kubecluster"
)

// Mode is one way of implementing Services in the cluster.
type Mode struct {
	Name  string
	Proxy kubecluster.Proxy
	// Servicepath deploys servicepath's DaemonSet (deploy/) instead.
	Servicepath bool
	SocketLB    kubecluster.SocketLB
}

// Modes are the ones a full run compares.
var Modes = []Mode{
	{Name: "kube-proxy-iptables", Proxy: kubecluster.KubeProxyIPTables},
	{Name: "kube-proxy-nftables", Proxy: kubecluster.KubeProxyNFTables},
	{Name: "servicepath", Proxy: kubecluster.NoProxy, Servicepath: true, SocketLB: kubecluster.SocketLBAll},
	// Pods' traffic through the per-packet path.
	{Name: "servicepath-per-packet", Proxy: kubecluster.NoProxy, Servicepath: true, SocketLB: kubecluster.SocketLBHostOnly},
}

// ModeByName finds one of Modes.
func ModeByName(name string) (Mode, error) {
	for _, m := range Modes {
		if m.Name == name {
			return m, nil
		}
	}
	return Mode{}, fmt.Errorf("unknown mode %q", name)
}

// The suites a full run selects: the Services tests and sig-network's
// conformance tests. Serial and Disruptive tests need a cluster of their
// own each, Slow ones take minutes each, Feature and Flaky ones are not
// for every cluster: left out as kubetest2's conformance runs leave them.
const (
	DefaultFocus = `\[sig-network\] (Services|.*\[Conformance\])`
	DefaultSkip  = `\[Serial\]|\[Disruptive\]|\[Slow\]|\[Feature:|\[Flaky\]|\[LinuxOnly\].*IPv6|\[Feature:IPv6DualStack\]`
)

// Options of a run.
type Options struct {
	Modes []Mode
	// Focus and Skip select tests by name (ginkgo regexps).
	Focus, Skip string
	// WorkDir holds each mode's cluster, logs and JUnit reports.
	WorkDir string
	// Procs is how many tests run at once in a mode (ginkgo -p).
	Procs int
	// Cluster is the base of each mode's cluster options (images, nodes).
	Cluster kubecluster.Options
	// Deploy is the servicepath DaemonSet's options (manifests, image).
	Deploy kubecluster.DeployOptions
	// Timeout bounds each mode's e2e run.
	Timeout  time.Duration
	Progress io.Writer
}

// Run runs the tests in every mode, one cluster after another, and
// returns each mode's cases. A mode whose cluster could not start is
// reported as an error for that mode; the others still run.
func Run(ctx context.Context, o Options) (map[string][]Case, map[string]error) {
	results, errs := map[string][]Case{}, map[string]error{}
	for i, m := range o.Modes {
		if err := ctx.Err(); err != nil {
			errs[m.Name] = fmt.Errorf("not run: %w", err)
			continue
		}
		fmt.Fprintf(o.Progress, "== mode %s\n", m.Name)
		start := time.Now()
		cases, err := runMode(ctx, o, m, i)
		if err != nil {
			errs[m.Name] = err
			fmt.Fprintf(o.Progress, "== mode %s failed: %v\n", m.Name, err)
		}
		results[m.Name] = cases
		fmt.Fprintf(o.Progress, "== mode %s: %d tests in %s\n", m.Name, len(cases), time.Since(start).Round(time.Second))
	}
	return results, errs
}

func runMode(ctx context.Context, o Options, m Mode, i int) ([]Case, error) {
	dir := filepath.Join(o.WorkDir, m.Name)
	if err := os.RemoveAll(dir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(dir, "cluster"), 0o755); err != nil {
		return nil, err
	}
	co := o.Cluster
	co.Name = "cf" + strconv.Itoa(i)
	co.Dir = filepath.Join(dir, "cluster")
	co.Proxy = m.Proxy
	co.Progress = o.Progress
	c, err := kubecluster.Start(ctx, co)
	if err != nil {
		return nil, fmt.Errorf("start cluster: %w", err)
	}
	defer c.Stop()
	if m.Servicepath {
		d := o.Deploy
		d.SocketLB = m.SocketLB
		if err := c.DeployServicepath(ctx, d); err != nil {
			return nil, fmt.Errorf("deploy servicepath: %w", err)
		}
	}
	report := filepath.Join(dir, "report")
	if err := os.MkdirAll(report, 0o755); err != nil {
		return nil, err
	}
	log, err := os.Create(filepath.Join(dir, "e2e.log"))
	if err != nil {
		return nil, err
	}
	defer log.Close()
	fmt.Fprintf(o.Progress, "   e2e.test (%d at once), log %s\n", o.Procs, log.Name())
	runCtx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	cmd := c.E2E(runCtx, kubecluster.E2EOptions{Focus: o.Focus, Skip: o.Skip, Procs: o.Procs, ReportDir: report, Timeout: o.Timeout})
	cmd.Stdout, cmd.Stderr = log, log
	// Failing tests make e2e.test exit non-zero: the report says which.
	runErr := cmd.Run()
	cases, err := ReadJUnit(report)
	if err != nil {
		return nil, fmt.Errorf("%w (e2e.test: %v)", err, runErr)
	}
	return cases, nil
}
