// Command kubecluster starts and stops the one-machine Kubernetes cluster
// of harness/kubecluster (`make cluster`, `make cluster-down`) and runs
// kubectl in it.
//
//	kubecluster up [-name N] [-proxy none|iptables|nftables] [-nodes 2] [-servicepath [-socket-lb all|host-only|off]]
//	kubecluster down [-name N]
//	kubecluster kubectl [-name N] -- ARGS...
//	kubecluster conformance [-modes a,b] [-focus RE] [-skip RE] [-results DIR]
//
// up starts a supervisor in the background, which owns the cluster's
// processes and tears them down on SIGTERM; it returns once the cluster is
// up (or says which component failed, with its last log lines).
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/servicepath/servicepath/harness/kubecluster"
	"github.com/servicepath/servicepath/harness/kubecluster/conformance"
	"github.com/servicepath/servicepath/tools/image"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch cmd, args := os.Args[1], os.Args[2:]; cmd {
	case "up":
		err = up(args)
	case "serve":
		err = serve(args)
	case "down":
		err = down(args)
	case "kubectl":
		err = kubectl(args)
	case "conformance":
		err = conformanceRun(args)
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "kubecluster: %v\n", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: kubecluster up|down|kubectl|conformance [flags]")
	os.Exit(2)
}

// stateRoot holds one folder per cluster: configs, logs, containerd's
// image store; on disk, as images and containers do not fit /run.
const stateRoot = "/var/tmp/servicepath-kubecluster"

type common struct {
	name string
}

func (c *common) register(fs *flag.FlagSet) {
	fs.StringVar(&c.name, "name", "spk", "cluster name (prefixes its netns, nodes and cgroups)")
}

func (c *common) dir() string { return filepath.Join(stateRoot, c.name) }

func (c *common) validate() error {
	if c.name == "" || len(c.name) > 8 || strings.Trim(c.name, "abcdefghijklmnopqrstuvwxyz0123456789") != "" {
		return fmt.Errorf("-name %q: want 1 to 8 lowercase letters and digits (it prefixes netns and interface names)", c.name)
	}
	return nil
}

type upFlags struct {
	common
	proxy       string
	nodes       int
	servicepath bool
	socketLB    string
	image       string
	manifests   string
}

func parseUp(args []string) (*upFlags, error) {
	var f upFlags
	fs := flag.NewFlagSet("up", flag.ContinueOnError)
	f.register(fs)
	fs.StringVar(&f.proxy, "proxy", string(kubecluster.NoProxy), "service proxy: none (deploy servicepath yourself), iptables or nftables (kube-proxy)")
	fs.IntVar(&f.nodes, "nodes", 2, "number of nodes")
	fs.BoolVar(&f.servicepath, "servicepath", false, "deploy servicepath's DaemonSet (needs -proxy none)")
	fs.StringVar(&f.socketLB, "socket-lb", string(kubecluster.SocketLBAll),
		"with -servicepath: which clients the socket hooks translate: all, host-only (pods per packet) or off")
	fs.StringVar(&f.image, "image", "bin/servicepath-image.tar", "with -servicepath: the agent's image (make image)")
	fs.StringVar(&f.manifests, "manifests", "deploy", "with -servicepath: the DaemonSet's manifests")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if err := f.validate(); err != nil {
		return nil, err
	}
	if _, err := kubecluster.ParseProxy(f.proxy); err != nil {
		return nil, fmt.Errorf("-proxy: %w", err)
	}
	if _, err := kubecluster.ParseSocketLB(f.socketLB); err != nil {
		return nil, fmt.Errorf("-socket-lb: %w", err)
	}
	if f.servicepath && f.proxy != string(kubecluster.NoProxy) {
		return nil, fmt.Errorf("-servicepath replaces kube-proxy: use it with -proxy none, not -proxy %s", f.proxy)
	}
	if f.servicepath {
		for _, p := range []string{f.image, f.manifests} {
			if _, err := os.Stat(p); err != nil {
				return nil, fmt.Errorf("-servicepath: %w (run make image)", err)
			}
		}
		var err error
		if f.image, err = filepath.Abs(f.image); err != nil {
			return nil, err
		}
	}
	if f.nodes < 1 || f.nodes > 8 {
		return nil, fmt.Errorf("-nodes %d: want 1 to 8", f.nodes)
	}
	return &f, nil
}

// up validates, then starts `serve` detached and follows its progress.
func up(args []string) error {
	f, err := parseUp(args)
	if err != nil {
		return err
	}
	if err := kubecluster.CheckAssets(); err != nil {
		return err
	}
	if pid, alive := supervisor(f.dir()); alive {
		return fmt.Errorf("cluster %s is already running (supervisor pid %d); `kubecluster down -name %s` first", f.name, pid, f.name)
	}
	// Whatever a previous run left (a killed supervisor) goes first.
	if err := sweep(f.dir()); err != nil {
		return err
	}
	if err := os.MkdirAll(f.dir(), 0o755); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	logPath := filepath.Join(f.dir(), "supervisor.log")
	log, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer log.Close()
	cmd := exec.Command(self, append([]string{"serve"}, args...)...)
	cmd.Stdout, cmd.Stderr = log, log
	// A session of its own: it outlives this command and the terminal.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	return follow(logPath, exited, f)
}

// follow prints the supervisor's log until it says the cluster is up or
// it exits.
func follow(path string, exited <-chan error, f *upFlags) error {
	file, err := os.Open(path)
	if err != nil {
		return err
	}
	defer file.Close()
	r := bufio.NewReader(file)
	var partial string
	for {
		line, err := r.ReadString('\n')
		partial += line
		if err == io.EOF {
			select {
			case werr := <-exited:
				rest, _ := io.ReadAll(r)
				fmt.Print(partial + string(rest))
				return fmt.Errorf("supervisor exited (%v); its log: %s", werr, path)
			case <-time.After(200 * time.Millisecond):
			}
			continue
		}
		fmt.Print(partial)
		if strings.HasPrefix(partial, readyLine) {
			fmt.Printf("\nkubectl: %s kubectl -name %s -- get nodes\nstop:    %s down -name %s\n", os.Args[0], f.name, os.Args[0], f.name)
			return nil
		}
		partial = ""
	}
}

const readyLine = "READY "

// serve runs the cluster in the foreground until SIGTERM or SIGINT.
func serve(args []string) error {
	f, err := parseUp(args)
	if err != nil {
		return err
	}
	proxy, _ := kubecluster.ParseProxy(f.proxy)
	socketLB, _ := kubecluster.ParseSocketLB(f.socketLB)
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	if err := os.WriteFile(filepath.Join(f.dir(), "supervisor.pid"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return err
	}
	fmt.Println("images: building")
	images, err := kubecluster.BuildImages(filepath.Join(f.dir(), "images"), ".")
	if err != nil {
		return err
	}
	c, err := kubecluster.Start(ctx, kubecluster.Options{
		Name: f.name, Dir: f.dir(), Nodes: f.nodes, Proxy: proxy,
		Images: images, SandboxImage: image.PauseTag, Progress: os.Stdout,
		OnState: func(s kubecluster.State) error { return kubecluster.WriteState(statePath(f.dir()), s) },
	})
	if err != nil {
		return err
	}
	if f.servicepath {
		err := c.DeployServicepath(ctx, kubecluster.DeployOptions{Manifests: f.manifests, Image: f.image, SocketLB: socketLB})
		if err != nil {
			return errors.Join(err, c.Stop())
		}
	}
	fmt.Printf("%skubeconfig %s (in netns %s)\n", readyLine, c.Kubeconfig, c.ControlPlane)
	<-ctx.Done()
	fmt.Println("stopping")
	err = c.Stop()
	os.Remove(statePath(f.dir()))
	return err
}

func statePath(dir string) string { return filepath.Join(dir, "state.json") }

// supervisor returns the pid of the running supervisor of the cluster in dir.
func supervisor(dir string) (int, bool) {
	b, err := os.ReadFile(filepath.Join(dir, "supervisor.pid"))
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, false
	}
	cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return pid, strings.Contains(string(cmdline), "serve")
}

// sweep removes what a cluster whose supervisor died left behind.
func sweep(dir string) error {
	s, err := kubecluster.ReadState(statePath(dir))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := kubecluster.Sweep(s); err != nil {
		return err
	}
	return os.Remove(statePath(dir))
}

func down(args []string) error {
	var c common
	fs := flag.NewFlagSet("down", flag.ContinueOnError)
	c.register(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := c.validate(); err != nil {
		return err
	}
	if pid, alive := supervisor(c.dir()); alive {
		fmt.Printf("stopping cluster %s (supervisor pid %d)\n", c.name, pid)
		syscall.Kill(pid, syscall.SIGTERM)
		for i := 0; i < 120; i++ {
			if _, alive := supervisor(c.dir()); !alive {
				break
			}
			time.Sleep(500 * time.Millisecond)
		}
		if _, alive := supervisor(c.dir()); alive {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	if err := sweep(c.dir()); err != nil {
		return err
	}
	if err := os.RemoveAll(c.dir()); err != nil {
		return err
	}
	fmt.Printf("cluster %s is down\n", c.name)
	return nil
}

func kubectl(args []string) error {
	var c common
	fs := flag.NewFlagSet("kubectl", flag.ContinueOnError)
	c.register(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := c.validate(); err != nil {
		return err
	}
	s, err := kubecluster.ReadState(statePath(c.dir()))
	if err != nil {
		return fmt.Errorf("cluster %s is not running: %w", c.name, err)
	}
	cmd := s.Command(context.Background(), kubecluster.Bin("kubectl"), fs.Args()...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	return cmd.Run()
}

// conformanceRun runs the e2e network tests in each mode, one cluster
// after another, and writes the results side by side.
func conformanceRun(args []string) error {
	fs := flag.NewFlagSet("conformance", flag.ContinueOnError)
	var names []string
	for _, m := range conformance.Modes {
		names = append(names, m.Name)
	}
	modes := fs.String("modes", strings.Join(names, ","), "modes to compare, in order")
	focus := fs.String("focus", conformance.DefaultFocus, "tests to run (ginkgo regexp)")
	skip := fs.String("skip", conformance.DefaultSkip, "tests to leave out (ginkgo regexp)")
	results := fs.String("results", "results/conformance", "folder for results.json and README.md")
	procs := fs.Int("procs", 4, "tests at once in each mode")
	timeout := fs.Duration("timeout", 2*time.Hour, "limit of each mode's run")
	img := fs.String("image", "bin/servicepath-image.tar", "the agent's image (make image)")
	manifests := fs.String("manifests", "deploy", "servicepath's DaemonSet manifests")
	strict := fs.Bool("strict", false, "fail when any test fails (CI), not only when a mode cannot run")
	reportOnly := fs.Bool("report-only", false, "rewrite the results from the last run's JUnit reports, running nothing")
	ifCached := fs.Bool("if-cached", false, "when the cluster binaries are not built, say so and succeed (CI on a machine without them)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	o := conformance.Options{Focus: *focus, Skip: *skip, Procs: *procs, Timeout: *timeout, Progress: os.Stdout,
		WorkDir: filepath.Join(stateRoot, "conformance")}
	for _, name := range strings.Split(*modes, ",") {
		m, err := conformance.ModeByName(strings.TrimSpace(name))
		if err != nil {
			return fmt.Errorf("-modes: %w (want some of %s)", err, strings.Join(names, ","))
		}
		o.Modes = append(o.Modes, m)
		if m.Servicepath && o.Deploy.Image == "" {
			abs, err := filepath.Abs(*img)
			if err != nil {
				return err
			}
			if _, err := os.Stat(abs); err != nil {
				return fmt.Errorf("-image: %w (run make image)", err)
			}
			o.Deploy = kubecluster.DeployOptions{Image: abs, Manifests: *manifests}
		}
	}
	if *reportOnly {
		res, errs := map[string][]conformance.Case{}, map[string]error{}
		for _, m := range o.Modes {
			res[m.Name], errs[m.Name] = conformance.ReadJUnit(filepath.Join(o.WorkDir, m.Name, "report"))
			if errs[m.Name] == nil {
				delete(errs, m.Name)
			}
		}
		report := conformance.NewReport(o, res, errs, ".")
		// The reports are the last run's: so is the stamp, when it was written.
		if last, err := conformance.ReadReport(*results); err == nil {
			report.Stamp = last.Stamp
		}
		return report.Write(*results)
	}
	if *procs < 1 {
		return fmt.Errorf("-procs %d: want at least 1", *procs)
	}
	if err := kubecluster.CheckAssets(); err != nil {
		if *ifCached && errors.Is(err, kubecluster.ErrNoAssets) {
			fmt.Printf("conformance not run: %v\n", err)
			return nil
		}
		return err
	}
	images, err := kubecluster.BuildImages(filepath.Join(o.WorkDir, "images"), ".")
	if err != nil {
		return err
	}
	o.Cluster = kubecluster.Options{Images: images, SandboxImage: image.PauseTag}
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	res, errs := conformance.Run(ctx, o)
	report := conformance.NewReport(o, res, errs, ".")
	if err := report.Write(*results); err != nil {
		return err
	}
	fmt.Printf("results: %s\n", filepath.Join(*results, "README.md"))
	if len(errs) > 0 {
		return fmt.Errorf("%d of %d modes did not run to the end", len(errs), len(o.Modes))
	}
	if failed := report.Failed(); *strict && len(failed) > 0 {
		return fmt.Errorf("%d tests failed:\n%s", len(failed), strings.Join(failed, "\n"))
	}
	return nil
}
