package testenv

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/stretchr/testify/assert"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/mounts"
)

func TestParseKernel(t *testing.T) {
	cases := map[string]kernelVersion{
		"6.18.44-fc-v657":          {6, 18},
		"5.10.0-32-cloud-amd64":    {5, 10},
		"7.2.13+deb14-cloud-amd64": {7, 2},
		"4.19":                     {4, 19},
		"6.1-rc3":                  {6, 1},
	}
	for in, want := range cases {
		got, err := parseKernel(in)
		if err != nil || got != want {
			t.Errorf("parseKernel(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "6", "six.1", "6.x"} {
		if got, err := parseKernel(bad); err == nil {
			t.Errorf("parseKernel(%q) = %v, want error", bad, got)
		}
	}
}

func TestKernelLess(t *testing.T) {
	cases := []struct {
		a, b string
		less bool
	}{
		{"5.10.0-32-cloud-amd64", "6.6", true},
		{"6.18.44-fc-v657", "6.6", false},
		{"6.6.1", "6.6", false},
		{"6.5.99", "6.6", true},
		{"6.9", "6.10", true},
		{"7.2.13+deb14-cloud-amd64", "6.18", false},
	}
	for _, c := range cases {
		a, _ := parseKernel(c.a)
		b, _ := parseKernel(c.b)
		if got := a.less(b); got != c.less {
			t.Errorf("%s < %s = %v, want %v", c.a, c.b, got, c.less)
		}
	}
}

// recorder stands in for testing.TB to observe which way the policy goes.
type recorder struct {
	testing.TB
	outcome string
}

func (r *recorder) Helper() {}
func (r *recorder) Skipf(format string, args ...any) {
	r.outcome = "skip: " + fmt.Sprintf(format, args...)
	runtime.Goexit()
}
func (r *recorder) Fatalf(format string, args ...any) {
	r.outcome = "fatal: " + fmt.Sprintf(format, args...)
	runtime.Goexit()
}

func policy(minKernel, release string, err error) string {
	r := &recorder{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if featureMissing(r, "tcx", minKernel, release, err) {
			r.outcome = "missing: tcx needs kernel " + minKernel + ", running " + release
			return
		}
		r.outcome = "returned"
	}()
	<-done
	return r.outcome
}

func TestRequireFeaturePolicy(t *testing.T) {
	notSup := fmt.Errorf("probe: %w", ebpf.ErrNotSupported)
	cases := []struct {
		name, release string
		err           error
		want          string
	}{
		{"old kernel", "5.10.0-32-cloud-amd64", notSup, "missing: tcx needs kernel 6.6, running 5.10.0-32-cloud-amd64"},
		{"old kernel attach EINVAL", "6.1.0", fmt.Errorf("attach: %w", unix.EINVAL), "missing: "},
		{"old kernel ENOTSUP", "6.1.0", unix.ENOTSUP, "missing: "},
		{"new kernel", "6.18.44-fc-v657", notSup, "fatal: kernel 6.18.44-fc-v657 >= 6.6 should have tcx"},
		{"same minor", "6.6.0", unix.EOPNOTSUPP, "fatal: kernel 6.6.0 >= 6.6"},
		{"other error", "5.10.0", errors.New("permission denied"), "fatal: tcx: permission denied"},
		{"bad release", "weird", notSup, "fatal: "},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := policy("6.6", c.release, c.err)
			if !strings.HasPrefix(got, c.want) {
				t.Errorf("got %q, want prefix %q", got, c.want)
			}
		})
	}
}

func TestRequireFeatureNil(t *testing.T) {
	RequireFeature(t, "anything", "99.0", nil)
	if FeatureMissing(t, "anything", "99.0", nil) {
		t.Error("a feature that worked is not missing")
	}
}

func TestBPFFS(t *testing.T) {
	RequireRoot(t)
	var dir string
	t.Run("mount", func(t *testing.T) {
		dir = BPFFS(t)
		if ok, err := mounts.IsBPFFS(dir); err != nil || !ok {
			t.Fatalf("IsBPFFS(%s) = %v, %v", dir, ok, err)
		}
	})
	if dir == "" {
		return
	}
	if mounted(t, dir) {
		t.Errorf("%s still mounted after the test ended", dir)
	}
}

func TestChildCgroup(t *testing.T) {
	RequireRoot(t)
	var dir string
	t.Run("create", func(t *testing.T) {
		dir = ChildCgroup(t)
		root, err := mounts.Cgroup2Root()
		if err != nil {
			t.Fatal(err)
		}
		if filepath.Dir(dir) != root {
			t.Errorf("%s is not a child of %s", dir, root)
		}
		if _, err := os.Stat(filepath.Join(dir, "cgroup.procs")); err != nil {
			t.Errorf("not a cgroup: %v", err)
		}
	})
	if dir == "" {
		return
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("%s still there after the test ended: %v", dir, err)
	}
}

func mounted(t *testing.T, dir string) bool {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) > 4 && fields[4] == dir {
			return true
		}
	}
	return false
}

func TestRequireDriverPolicy(t *testing.T) {
	unsupported := fmt.Errorf("add netkit: %w", unix.EOPNOTSUPP)
	cases := []struct {
		name, release string
		inVM          bool
		err           error
		want          string
	}{
		{"host kernel built without it", "6.18.0", false, unsupported, "skip: the netkit driver is not in this kernel (6.18.0)"},
		{"host, other error", "6.18.0", false, errors.New("file exists"), "fatal: netkit: file exists"},
		{"vm, old kernel", "6.1.0-56-cloud-amd64", true, unsupported, "skip: netkit needs kernel 6.7, running 6.1.0-56-cloud-amd64"},
		{"vm, kernel that should have it", "6.12.117+deb13-cloud-amd64", true, unsupported, "fatal: kernel 6.12.117+deb13-cloud-amd64 >= 6.7 should have netkit"},
		{"vm, other error", "7.2.13", true, errors.New("file exists"), "fatal: netkit: file exists"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := &recorder{}
			done := make(chan struct{})
			go func() {
				defer close(done)
				requireDriver(r, "netkit", "6.7", c.release, c.inVM, c.err)
				r.outcome = "returned"
			}()
			<-done
			assert.True(t, strings.HasPrefix(r.outcome, c.want), "policy outcome %q starts with %q", r.outcome, c.want)
		})
	}
}
