package vm

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Module is a loadable kernel module file on the host.
type Module struct {
	Name string
	Path string // possibly compressed (.ko.xz, .ko.zst)
}

// ResolveModules lists, in load order, the module files needed for names in
// the kernel tree. Built-in modules need nothing; absent ones are returned so
// they can be reported (netkit does not exist before 6.7).
func ResolveModules(tree, release string, names []string) (mods []Module, absent []string, err error) {
	seen := map[string]bool{}
	for _, n := range names {
		out, err := exec.Command("modprobe", "-d", tree, "-S", release, "--show-depends", n).CombinedOutput()
		if err != nil {
			if bytes.Contains(out, []byte("not found")) {
				absent = append(absent, n)
				continue
			}
			return nil, nil, fmt.Errorf("modprobe --show-depends %s: %w\n%s", n, err, out)
		}
		for _, m := range parseShowDepends(string(out)) {
			if !seen[m.Path] {
				seen[m.Path] = true
				mods = append(mods, m)
			}
		}
	}
	return mods, absent, nil
}

func parseShowDepends(out string) []Module {
	var mods []Module
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "insmod" {
			continue
		}
		base := filepath.Base(f[1])
		mods = append(mods, Module{Name: base[:strings.Index(base, ".ko")], Path: f[1]})
	}
	return mods
}

// Binary is a test binary and the package it was built from.
type Binary struct {
	Package string // import path, printed in the console markers
	Path    string // host path of the `go test -c` output
	Dir     string // package directory relative to the module root; the test's working directory
}

// Spec describes one guest.
type Spec struct {
	Busybox     string
	Release     string
	Modules     []Module
	Binaries    []Binary
	Source      string   // module root on the host
	SourceFiles []string // files of the module, relative to Source, copied to /src: tests read testdata and ../../ files
	HostTools   []string // host executables copied with their shared libraries (ip, tc, nft)
	Env         []string // KEY=value exported to the tests
	TestArgs    []string // flags added to every test binary
	TestTimeout time.Duration
}

// Build writes the initramfs for spec to out.
func Build(spec Spec, out string) error {
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer f.Close()
	c := newCPIO(f)
	// The kernel opens /dev/console before running init; devtmpfs comes later.
	for _, d := range []string{"dev", "proc", "sys", "tmp", "run", "root", "sbin", "usr/bin", "usr/sbin"} {
		if err := c.Dir(d); err != nil {
			return err
		}
	}
	if err := c.CharDev("dev/console", 5, 1); err != nil {
		return err
	}
	if err := c.Symlink("var/run", "../run"); err != nil {
		return err
	}
	if err := c.CopyFile("bin/busybox", 0o755, spec.Busybox); err != nil {
		return err
	}
	if err := c.File("init", 0o755, []byte(InitScript(spec))); err != nil {
		return err
	}
	for _, f := range etcFiles {
		if err := c.File(f[0], 0o644, []byte(f[1])); err != nil {
			return err
		}
	}
	for _, m := range spec.Modules {
		data, err := readModule(m.Path)
		if err != nil {
			return err
		}
		if err := c.File(modulePath(spec.Release, m), 0o644, data); err != nil {
			return err
		}
	}
	for _, b := range spec.Binaries {
		if err := c.CopyFile(binaryPath(b), 0o755, b.Path); err != nil {
			return err
		}
		if err := c.Dir(srcPath(b)); err != nil {
			return err
		}
	}
	for _, f := range spec.SourceFiles {
		if err := c.CopyFile("src/"+filepath.ToSlash(f), 0o644, filepath.Join(spec.Source, f)); err != nil {
			return err
		}
	}
	if err := copyTools(c, spec.HostTools); err != nil {
		return err
	}
	if err := c.Close(); err != nil {
		return err
	}
	return f.Close()
}

// etcFiles let Go resolve "localhost" and user names with no DNS or NSS.
var etcFiles = [][2]string{
	{"etc/hosts", "127.0.0.1 localhost\n::1 localhost\n"},
	{"etc/nsswitch.conf", "hosts: files\npasswd: files\ngroup: files\n"},
	{"etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"},
	{"etc/group", "root:x:0:\nnogroup:x:65534:\n"},
}

func modulePath(release string, m Module) string {
	return "lib/modules/" + release + "/" + m.Name + ".ko"
}

func binaryPath(b Binary) string {
	return "tests/" + strings.ReplaceAll(b.Package, "/", "_") + ".test"
}

func srcPath(b Binary) string { return "src/" + b.Dir }

// readModule decompresses with the host's xz or zstd: busybox insmod and
// older kernels take plain .ko files only.
func readModule(path string) ([]byte, error) {
	var cmd *exec.Cmd
	switch {
	case strings.HasSuffix(path, ".xz"):
		cmd = exec.Command("xz", "-dc", path)
	case strings.HasSuffix(path, ".zst"):
		cmd = exec.Command("zstd", "-dcq", path)
	case strings.HasSuffix(path, ".gz"):
		cmd = exec.Command("gzip", "-dc", path)
	default:
		return os.ReadFile(path)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	data, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("decompress %s: %w: %s", path, err, stderr.String())
	}
	return data, nil
}

// copyTools copies host executables and the libraries ldd finds for them
// to the same paths in the guest.
func copyTools(c *cpioWriter, tools []string) error {
	done := map[string]bool{}
	for _, tool := range tools {
		out, err := exec.Command("ldd", tool).Output()
		if err != nil {
			return fmt.Errorf("ldd %s: %w", tool, err)
		}
		for _, p := range append([]string{tool}, parseLdd(string(out))...) {
			if done[p] {
				continue
			}
			done[p] = true
			// Libraries are often symlinks: store the target's bytes at the linked name.
			real, err := filepath.EvalSymlinks(p)
			if err != nil {
				return err
			}
			if err := c.CopyFile(strings.TrimPrefix(p, "/"), 0o755, real); err != nil {
				return err
			}
		}
	}
	return nil
}

// parseLdd returns the library paths of ldd output, the loader included.
func parseLdd(out string) []string {
	var libs []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			libs = append(libs, f[2])
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			libs = append(libs, f[0])
		}
	}
	return libs
}

// Console markers printed by the guest's init.
const (
	markBoot    = "@@vmtest boot "
	markModFail = "@@vmtest modfail "
	markBegin   = "@@vmtest begin "
	markEnd     = "@@vmtest end "
	markDone    = "@@vmtest done"
)

// InitScript is the guest's /init: mount, load modules, run each binary
// between markers, power off.
func InitScript(spec Spec) string {
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format+"\n", a...) }
	w("#!/bin/busybox sh")
	w("/bin/busybox --install -s /bin")
	// Host tools in /usr/sbin come before busybox's applets of the same name.
	w("export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp")
	for _, e := range spec.Env {
		w("export %s", shellQuote(e))
	}
	w("mount -t proc proc /proc")
	w("mount -t sysfs sysfs /sys")
	w("mount -t devtmpfs devtmpfs /dev")
	w("mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm")
	w("mount -t tmpfs tmpfs /tmp && mount -t tmpfs tmpfs /run")
	w("mount -t bpf bpf /sys/fs/bpf")
	w("mount -t cgroup2 cgroup2 /sys/fs/cgroup")
	w("mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null")
	w("mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null")
	// Keep kernel messages off the console so they do not split test output.
	w("dmesg -n 1")
	w("ip link set lo up")
	// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
	w("ulimit -l unlimited")
	w(`echo "%s$(uname -r)"`, markBoot)
	for _, m := range spec.Modules {
		w("insmod /%s || echo %s", modulePath(spec.Release, m), shellQuote(markModFail+m.Name))
	}
	secs := int(spec.TestTimeout.Seconds())
	for _, bin := range spec.Binaries {
		args := append([]string{"-test.v", "-test.count=1", fmt.Sprintf("-test.timeout=%ds", secs)}, spec.TestArgs...)
		for i, a := range args {
			args[i] = shellQuote(a)
		}
		w("echo %s", shellQuote(markBegin+bin.Package))
		w("cd /%s", srcPath(bin))
		// Go's own -test.timeout prints the stuck goroutines; the KILL is the backstop.
		w("timeout -s KILL %d /%s %s 2>&1 </dev/null", secs+30, binaryPath(bin), strings.Join(args, " "))
		w(`echo "%s%s exit=$?"`, markEnd, bin.Package)
	}
	w("cd /")
	w(`echo %s`, markDone)
	w("sync")
	w("poweroff -f")
	return b.String()
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
