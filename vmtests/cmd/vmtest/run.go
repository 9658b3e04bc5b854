package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/servicepath/servicepath/vmtests/internal/debian"
	"github.com/servicepath/servicepath/vmtests/internal/report"
	"github.com/servicepath/servicepath/vmtests/internal/vm"
)

// run boots every kernel and reports whether anything failed.
func run(cfg config) (failed bool, err error) {
	start := time.Now()
	root, err := goOutput("", "env", "GOMOD")
	if err != nil || root == "" || root == os.DevNull {
		return false, fmt.Errorf("not inside a Go module")
	}
	root = filepath.Dir(root)
	if cfg.results == "" {
		cfg.results = filepath.Join(root, "results", "kernels")
	}
	if cfg.reportOnly {
		readme, err := writeReadme(cfg.results)
		if err == nil {
			logf("wrote %s", readme)
		}
		return false, err
	}
	tmp, err := os.MkdirTemp("", "vmtest-")
	if err != nil {
		return false, err
	}
	defer os.RemoveAll(tmp)

	bins, err := buildTests(root, cfg.packages, tmp)
	if err != nil {
		return false, err
	}
	kernels, busybox, err := fetch(cfg)
	if err != nil {
		return false, err
	}
	qemuVersion, err := vm.Version(cfg.qemu)
	if err != nil {
		return false, err
	}
	if major, err := qemuMajor(cfg.qemu); err == nil && major < 10 {
		logf("warning: %s; QEMU before 10 fails to boot 6.12 under TCG (run `vmtest deps`)", qemuVersion)
	}
	machine := vm.Machine{QEMU: cfg.qemu, Accel: cfg.accel, CPUs: cfg.cpus, Memory: cfg.memory}
	if cfg.accel == "auto" {
		probe := filepath.Join(tmp, "probe.cpio")
		if err := vm.Build(vm.Spec{Busybox: busybox.path, Release: kernels[0].Release}, probe); err != nil {
			return false, err
		}
		machine.Accel = vm.DetectAccel(machine, kernels[0].Vmlinuz, probe, os.Stderr)
	}
	logf("%s, accel %s", qemuVersion, machine.Accel)

	sources, err := sourceFiles(root, cfg.results)
	if err != nil {
		return false, err
	}
	var tools []string
	for _, t := range cfg.hostTools {
		if p, err := exec.LookPath(t); err == nil {
			tools = append(tools, p)
		} else {
			logf("host tool %s not found, guests use busybox's if it has one", t)
		}
	}
	commit := gitCommit(root)
	goVersion, _ := goOutput(root, "env", "GOVERSION")
	var packages []string
	for _, b := range bins {
		packages = append(packages, b.Package)
	}
	var total report.Counts
	var walls []string
	for _, k := range kernels {
		res, err := boot(cfg, machine, k, busybox, vm.Spec{Binaries: bins, Source: root, SourceFiles: sources, HostTools: tools}, tmp)
		if err != nil {
			return false, fmt.Errorf("kernel %s: %w", k.Version, err)
		}
		res.Header.QEMU, res.Header.Accel, res.Header.Commit, res.Header.Go = qemuVersion, machine.Accel, commit, goVersion
		res.Events, res.Header.Binaries, err = report.Events(packages, res.runs, res.Header.Problem)
		if err != nil {
			return false, err
		}
		path, err := report.Write(cfg.results, res.Result)
		if err != nil {
			return false, err
		}
		c := report.Count(res.Result)
		total.Pass, total.Fail, total.Skip = total.Pass+c.Pass, total.Fail+c.Fail, total.Skip+c.Skip
		status := "ok"
		if res.Header.Problem != "" {
			status = res.Header.Problem
			failed = true
		}
		if c.Fail > 0 {
			failed = true
		}
		walls = append(walls, fmt.Sprintf("%s %.0fs", k.Version, res.Header.WallSeconds))
		logf("%s (%s): %s, %d passed, %d failed, %d skipped in %.1fs -> %s",
			k.Version, k.Release, status, c.Pass, c.Fail, c.Skip, res.Header.WallSeconds, path)
	}
	readme, err := writeReadme(cfg.results)
	if err != nil {
		return false, err
	}
	logf("wrote %s; VM wall time %s; total %.0fs", readme, strings.Join(walls, ", "), time.Since(start).Seconds())
	// The closing line CI and people read.
	fmt.Printf("vmtest: %d passed, %d failed, %d skipped\n", total.Pass, total.Fail, total.Skip)
	return failed, nil
}

type busyboxBin struct{ path, version string }

// fetch resolves and unpacks the kernels and busybox, falling back to the
// cache when the archive cannot be reached.
func fetch(cfg config) ([]*debian.Kernel, busyboxBin, error) {
	archive, err := debian.HostArchive("/etc/apt", "/etc/os-release")
	if err != nil {
		return nil, busyboxBin{}, err
	}
	apt := debian.KernelSuites(archive, filepath.Join(cfg.cache, "apt", "kernels"))
	maxAge := 24 * time.Hour
	if cfg.refresh {
		maxAge = 0
	}
	if err := apt.Update(maxAge); err != nil {
		logf("warning: apt update failed, using the lists and kernels in the cache: %v", err)
	}
	var bb busyboxBin
	bb.path, bb.version, err = debian.Busybox(apt, cfg.cache)
	if err != nil {
		return nil, bb, err
	}
	kernels, err := resolve(apt, cfg)
	if err != nil {
		logf("warning: %v; looking in the cache", err)
		kernels, err = debian.Cached(cfg.kernels, cfg.cache)
	}
	return kernels, bb, err
}

func resolve(apt *debian.Apt, cfg config) ([]*debian.Kernel, error) {
	names, err := apt.Cache("pkgnames", "linux-image-")
	if err != nil {
		return nil, err
	}
	show, err := apt.Cache(append([]string{"show"}, debian.ImageNames(names)...)...)
	if err != nil {
		return nil, err
	}
	sels, err := debian.Select(cfg.kernels, debian.ParseStanzas(show))
	if err != nil {
		return nil, err
	}
	var out []*debian.Kernel
	for _, s := range sels {
		logf("kernel %s: %s %s", s.Series, s.Packages[0].Name, s.Packages[0].Version)
		k, err := debian.Fetch(apt, s, cfg.cache)
		if err != nil {
			return nil, err
		}
		out = append(out, k)
	}
	return out, nil
}

type kernelResult struct {
	report.Result
	runs []*vm.Run
}

// boot runs the binaries in one kernel.
func boot(cfg config, m vm.Machine, k *debian.Kernel, bb busyboxBin, spec vm.Spec, tmp string) (kernelResult, error) {
	mods, absent, err := vm.ResolveModules(k.Tree, k.Release, cfg.modules)
	if err != nil {
		return kernelResult{}, err
	}
	spec.Busybox, spec.Release, spec.Modules, spec.TestTimeout = bb.path, k.Release, mods, cfg.testTimeout
	spec.Env = []string{
		"VMTEST_KERNEL_RELEASE=" + k.Release,
		"VMTEST_KERNEL_VERSION=" + k.Version,
		"VMTEST_KERNEL_SERIES=" + k.Series,
	}
	if cfg.short {
		spec.TestArgs = append(spec.TestArgs, "-test.short")
	}
	if cfg.run != "" {
		spec.TestArgs = append(spec.TestArgs, "-test.run="+cfg.run)
	}
	initrd := filepath.Join(tmp, k.Release+".cpio")
	if err := vm.Build(spec, initrd); err != nil {
		return kernelResult{}, err
	}
	logf("booting %s: %s", k.Version, m.Command(k.Vmlinuz, initrd))
	prefix := "[" + k.Version + "] "
	out := m.Boot(k.Vmlinuz, initrd, cfg.bootTimeout, cfg.vmTimeout, func(line string) {
		fmt.Println(prefix + line)
	})
	os.Remove(initrd)
	c := out.Console
	h := report.Header{
		Series:        k.Series,
		Version:       k.Version,
		Release:       k.Release,
		Packages:      k.Packages,
		Busybox:       bb.version,
		Cmdline:       vm.Cmdline,
		Date:          time.Now().UTC().Format(time.RFC3339),
		Booted:        c.Booted(),
		Finished:      c.Done,
		ModulesAbsent: absent,
		ModulesFailed: c.ModuleFailures,
		WallSeconds:   out.Wall.Seconds(),
	}
	switch {
	case !c.Booted() && out.TimedOut != "":
		h.Problem = "did not boot within " + cfg.bootTimeout.String()
	case !c.Booted():
		h.Problem = "did not boot"
	case c.InitramfsFailed:
		h.Problem = "the initramfs did not unpack whole: guest memory (-memory " + cfg.memory + ") too small for it"
	case out.TimedOut != "":
		h.Problem = "timed out after " + cfg.vmTimeout.String()
	case !c.Done:
		h.Problem = "guest ended before its tests finished (kernel panic?)"
	}
	if out.Err != nil {
		logf("%s: %v", k.Version, out.Err)
		if h.Problem == "" {
			h.Problem = "QEMU failed"
		}
	}
	if c.Booted() && c.Release != k.Release {
		return kernelResult{}, fmt.Errorf("guest booted %s, expected %s", c.Release, k.Release)
	}
	return kernelResult{Result: report.Result{Header: h}, runs: c.Runs}, nil
}

// buildTests compiles one static test binary per package that has tests.
func buildTests(root string, patterns []string, dir string) ([]vm.Binary, error) {
	out, err := goOutput(root, append([]string{"list", "-f", "{{if or .TestGoFiles .XTestGoFiles}}{{.ImportPath}} {{.Dir}}{{end}}"}, patterns...)...)
	if err != nil {
		return nil, err
	}
	var bins []vm.Binary
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		pkg, pkgDir, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		rel, _ := filepath.Rel(root, pkgDir)
		b := vm.Binary{Package: pkg, Dir: filepath.ToSlash(rel), Path: filepath.Join(dir, strings.ReplaceAll(pkg, "/", "_")+".test")}
		logf("building %s", pkg)
		cmd := exec.Command("go", "test", "-c", "-o", b.Path, pkg)
		cmd.Dir = root
		// Static, so the binary runs in a guest that has no libc.
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("go test -c %s: %w\n%s", pkg, err, out)
		}
		bins = append(bins, b)
	}
	if len(bins) == 0 {
		return nil, fmt.Errorf("no packages with tests in %s", strings.Join(patterns, " "))
	}
	return bins, nil
}

func goOutput(dir string, args ...string) (string, error) {
	cmd := exec.Command("go", args...)
	cmd.Dir = dir
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("go %s: %w", strings.Join(args, " "), err)
	}
	return strings.TrimSpace(string(out)), nil
}

// sourceFiles lists the module's files as git sees them, untracked ones
// included and ignored ones (build output) left out, and none of the
// results directory: the run rewrites it (a kernel's new results replace
// its series' old file) while later guests are still being built.
func sourceFiles(root, results string) ([]string, error) {
	cmd := exec.Command("git", "ls-files", "--cached", "--others", "--exclude-standard")
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("git ls-files in %s: %w", root, err)
	}
	var files []string
	abs, err := filepath.Abs(results)
	if err != nil {
		return nil, err
	}
	skip, err := filepath.Rel(root, abs)
	if err != nil {
		return nil, err
	}
	for _, f := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if f == skip || strings.HasPrefix(f, skip+"/") {
			continue
		}
		// Deleted but still in the index: nothing to copy.
		if st, err := os.Stat(filepath.Join(root, f)); err == nil && st.Mode().IsRegular() {
			files = append(files, f)
		}
	}
	return files, nil
}

// gitCommit names the work tree's commit, "+dirty" if it has local changes.
func gitCommit(root string) string {
	git := func(args ...string) (string, error) {
		cmd := exec.Command("git", args...)
		cmd.Dir = root
		// Read-only: no index refresh.
		cmd.Env = append(os.Environ(), "GIT_OPTIONAL_LOCKS=0")
		out, err := cmd.Output()
		return strings.TrimSpace(string(out)), err
	}
	commit, err := git("rev-parse", "--short=12", "HEAD")
	if err != nil {
		return "none"
	}
	if st, err := git("status", "--porcelain", "--untracked-files=no"); err == nil && st != "" {
		commit += "+dirty"
	}
	return commit
}

func logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "vmtest: "+format+"\n", a...)
}

// writeReadme renders the matrix README from every results file in dir.
func writeReadme(dir string) (string, error) {
	all, err := report.Load(dir)
	if err != nil {
		return "", err
	}
	readme := filepath.Join(dir, "README.md")
	return readme, os.WriteFile(readme, []byte(report.Render(report.Sorted(all))), 0o644)
}
