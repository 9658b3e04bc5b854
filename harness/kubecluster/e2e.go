package kubecluster

import (
	"context"
	"os/exec"
	"strconv"
	"time"
)

// E2EOptions select and run upstream e2e tests.
type E2EOptions struct {
	Focus, Skip string
	// Procs > 1 runs tests in parallel through the ginkgo CLI.
	Procs     int
	ReportDir string
	Timeout   time.Duration
}

// E2E returns the command that runs e2e.test against the cluster from the
// control plane's netns, writing JUnit reports into ReportDir.
func (c *Cluster) E2E(ctx context.Context, o E2EOptions) *exec.Cmd {
	suite := []string{
		"--kubeconfig=" + c.Kubeconfig, "--provider=local", "--kubectl-path=" + Bin("kubectl"),
		"--report-dir=" + o.ReportDir, "--num-nodes=" + strconv.Itoa(len(c.Nodes)),
		// Nothing on these nodes to collect logs with (no ssh, no log exporter).
		"--dump-logs-on-failure=false", "--disable-log-dump",
	}
	ginkgo := []string{"--no-color", "--timeout=" + o.Timeout.String()}
	if o.Focus != "" {
		ginkgo = append(ginkgo, "--focus="+o.Focus)
	}
	if o.Skip != "" {
		ginkgo = append(ginkgo, "--skip="+o.Skip)
	}
	var cmd *exec.Cmd
	if o.Procs > 1 {
		args := append(append(ginkgo, "--procs="+strconv.Itoa(o.Procs), Bin("e2e.test"), "--"), suite...)
		cmd = c.Command(ctx, Bin("ginkgo"), args...)
	} else {
		for _, f := range ginkgo {
			suite = append(suite, "--ginkgo."+f[2:])
		}
		cmd = c.Command(ctx, Bin("e2e.test"), suite...)
	}
	return cmd
}
