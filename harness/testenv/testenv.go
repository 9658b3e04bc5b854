// Package testenv holds the test-only policy for privileged tests: when to
// skip, how to get a private bpffs or cgroup, and which kernels must support
// which features.
package testenv

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/mounts"
)

var (
	memlockOnce sync.Once
	memlockErr  error
)

// RequireRoot skips t unless running as root, and lifts RLIMIT_MEMLOCK so
// BPF maps load on kernels that still charge them to it.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN to load BPF and build netns")
	}
	memlockOnce.Do(func() { memlockErr = rlimit.RemoveMemlock() })
	if memlockErr != nil {
		t.Fatalf("remove memlock rlimit: %v", memlockErr)
	}
}

// BPFFS mounts a fresh bpffs on a new temporary directory, so pins from one
// test never leak into another, and detaches it when t ends.
func BPFFS(t testing.TB) string {
	t.Helper()
	RequireRoot(t)
	dir := t.TempDir()
	if err := mounts.EnsureBPFFS(dir); err != nil {
		t.Fatal(err)
	}
	// Registered after TempDir's cleanup, so it runs first.
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount bpffs %s: %v", dir, err)
		}
	})
	return dir
}

// ChildCgroup creates a uniquely named cgroup under the cgroup2 root and
// removes it when t ends. The test must move out any process it put there.
func ChildCgroup(t testing.TB) string {
	t.Helper()
	RequireRoot(t)
	root, err := mounts.Cgroup2Root()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp(root, "servicepath-test-")
	if err != nil {
		t.Fatalf("create child cgroup: %v", err)
	}
	t.Cleanup(func() {
		// A cgroup whose last process just exited can stay busy briefly.
		deadline := time.Now().Add(5 * time.Second)
		for {
			err := unix.Rmdir(dir)
			if err == nil || errors.Is(err, unix.ENOENT) {
				return
			}
			if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
				t.Errorf("remove cgroup %s: %v", dir, err)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	return dir
}

// notSupported lists the errors that mean "this kernel lacks the feature":
// cilium/ebpf's probe result, and what attach calls return on kernels that
// do not know the attach type. EOPNOTSUPP is ENOTSUP on Linux.
var notSupported = []error{ebpf.ErrNotSupported, errors.ErrUnsupported, unix.EOPNOTSUPP, unix.EINVAL}

// RequireFeature applies the kernel-matrix policy to err, the result of
// using feature: a missing feature skips t on kernels older than minKernel
// (a "major.minor" release) and fails it on newer ones, where it must work.
// Any other error fails t.
func RequireFeature(t testing.TB, feature, minKernel string, err error) {
	t.Helper()
	if FeatureMissing(t, feature, minKernel, err) {
		t.Skipf("%s needs kernel %s, running %s: %v", feature, minKernel, release(t), err)
	}
}

// FeatureMissing is the same policy for tests that expect a fallback
// instead of skipping: true when err says feature is not supported and the
// kernel is older than minKernel; t fails when a kernel that should have
// the feature lacks it, and on any other error.
func FeatureMissing(t testing.TB, feature, minKernel string, err error) bool {
	t.Helper()
	if err == nil {
		return false
	}
	return featureMissing(t, feature, minKernel, release(t), err)
}

// RequireBuiltFeature is RequireFeature for a feature the machine's own
// kernel may be built without whatever its version (its XDP, for one,
// lost bpf_xdp_adjust_meta in a rebuild of 6.18): outside a VM a missing
// feature skips naming it, and make vmtest's Debian kernels keep the
// version policy.
func RequireBuiltFeature(t testing.TB, feature, minKernel string, err error) {
	t.Helper()
	if BuiltFeatureMissing(t, feature, minKernel, err) {
		t.Skipf("%s is missing from kernel %s (needs %s, and this build may lack it; make vmtest runs it in kernels that have it): %v",
			feature, release(t), minKernel, err)
	}
}

// BuiltFeatureMissing is FeatureMissing with RequireBuiltFeature's policy.
func BuiltFeatureMissing(t testing.TB, feature, minKernel string, err error) bool {
	t.Helper()
	if err != nil && !InVMTest() && isNotSupported(err) {
		return true
	}
	return FeatureMissing(t, feature, minKernel, err)
}

// KernelAtLeast says whether the running kernel is minKernel ("major.minor")
// or newer, for behaviour that changes with the kernel without failing:
// what a test expects then depends on it.
func KernelAtLeast(t testing.TB, minKernel string) bool {
	t.Helper()
	running, err := parseKernel(release(t))
	if err != nil {
		t.Fatalf("running kernel: %v", err)
	}
	want, err := parseKernel(minKernel)
	if err != nil {
		t.Fatalf("bad minimum kernel: %v", err)
	}
	return !running.less(want)
}

func release(t testing.TB) string {
	t.Helper()
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		t.Fatalf("uname: %v", err)
	}
	return unix.ByteSliceToString(uts.Release[:])
}

func featureMissing(t testing.TB, feature, minKernel, release string, err error) bool {
	t.Helper()
	if !isNotSupported(err) {
		t.Fatalf("%s: %v", feature, err)
	}
	running, perr := parseKernel(release)
	if perr != nil {
		t.Fatalf("%s: %v (%v)", feature, err, perr)
	}
	want, perr := parseKernel(minKernel)
	if perr != nil {
		t.Fatalf("%s: bad minimum kernel: %v", feature, perr)
	}
	if running.less(want) {
		return true
	}
	t.Fatalf("kernel %s >= %s should have %s: %v", release, minKernel, feature, err)
	return false
}

func isNotSupported(err error) bool {
	for _, target := range notSupported {
		if errors.Is(err, target) {
			return true
		}
	}
	return false
}

type kernelVersion struct{ major, minor int }

func (v kernelVersion) less(o kernelVersion) bool {
	if v.major != o.major {
		return v.major < o.major
	}
	return v.minor < o.minor
}

// parseKernel reads major.minor from a uname release such as
// "5.10.0-32-cloud-amd64"; distributions append anything after it.
func parseKernel(release string) (kernelVersion, error) {
	end := strings.IndexFunc(release, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	if end < 0 {
		end = len(release)
	}
	parts := strings.Split(release[:end], ".")
	if len(parts) < 2 {
		return kernelVersion{}, fmt.Errorf("kernel release %q: want major.minor", release)
	}
	major, err1 := strconv.Atoi(parts[0])
	minor, err2 := strconv.Atoi(parts[1])
	if err := errors.Join(err1, err2); err != nil {
		return kernelVersion{}, fmt.Errorf("kernel release %q: %w", release, err)
	}
	return kernelVersion{major, minor}, nil
}

// EnterCgroup moves the whole test process into the cgroup at dir until
// the test ends, so cgroup socket hooks attached there see its sockets.
func EnterCgroup(t testing.TB, dir string) {
	t.Helper()
	home, err := mounts.OwnCgroup()
	if err != nil {
		t.Fatalf("read this process' cgroup: %v", err)
	}
	if err := mounts.JoinCgroup(dir); err != nil {
		t.Fatalf("enter cgroup %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := mounts.JoinCgroup(home); err != nil {
			t.Errorf("return to cgroup %s: %v", home, err)
		}
	})
}

// VMTestEnv is set (to `uname -r`) inside a vmtest guest, whose kernels are
// Debian's with every driver the matrix expects.
const VMTestEnv = "VMTEST_KERNEL_RELEASE"

// InVMTest reports whether the test runs inside a vmtest guest.
func InVMTest() bool { return os.Getenv(VMTestEnv) != "" }

// RequireDriver applies the policy for a network device driver (netkit,
// ipvlan) that err, the result of creating such a device, says is missing.
// Whether a kernel has a driver is a build choice, not only a question of
// version: the machine's own kernel may be built without it. So outside a
// vmtest guest a missing driver skips t, naming it. Inside one the guest
// is a Debian kernel that has every driver from minKernel on, and
// RequireFeature's policy applies: older kernels skip, newer ones fail.
func RequireDriver(t testing.TB, driver, minKernel string, err error) {
	t.Helper()
	if err == nil {
		return
	}
	requireDriver(t, driver, minKernel, release(t), InVMTest(), err)
}

func requireDriver(t testing.TB, driver, minKernel, release string, inVM bool, err error) {
	t.Helper()
	if !inVM {
		if !isNotSupported(err) {
			t.Fatalf("%s: %v", driver, err)
		}
		t.Skipf("the %s driver is not in this kernel (%s), which was built without it; "+
			"make vmtest runs this in kernels that have it: %v", driver, release, err)
	}
	if featureMissing(t, driver, minKernel, release, err) {
		t.Skipf("%s needs kernel %s, running %s: %v", driver, minKernel, release, err)
	}
}

// ProgramID is the kernel's id of a loaded program, for comparing with
// what a device or link reports is attached.
func ProgramID(t testing.TB, p *ebpf.Program) ebpf.ProgramID {
	t.Helper()
	info, err := p.Info()
	if err != nil {
		t.Fatalf("program info: %v", err)
	}
	id, ok := info.ID()
	if !ok {
		t.Fatal("the kernel reports no program ids")
	}
	return id
}
