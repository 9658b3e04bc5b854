package mounts_test

import (
	"bufio"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/mounts"
	"github.com/servicepath/servicepath/harness/testenv"
)

func TestCgroup2Root(t *testing.T) {
	root, err := mounts.Cgroup2Root()
	if err != nil {
		t.Skipf("no cgroup2 here: %v", err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		t.Errorf("%s has fs magic %#x, not cgroup2", root, st.Type)
	}
}

func TestIsBPFFSOnOtherFS(t *testing.T) {
	ok, err := mounts.IsBPFFS(t.TempDir())
	if err != nil || ok {
		t.Errorf("IsBPFFS(tempdir) = %v, %v", ok, err)
	}
	if _, err := mounts.IsBPFFS(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("IsBPFFS on a missing path succeeded")
	}
}

func TestFSType(t *testing.T) {
	for path, want := range map[string]string{"/proc": "proc", testenv.BPFFS(t): "bpf"} {
		if got, err := mounts.FSType(path); err != nil || got != want {
			t.Errorf("FSType(%s) = %q, %v; want %q", path, got, err, want)
		}
	}
	if _, err := mounts.FSType(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("FSType on a missing path succeeded")
	}
}

func TestEnsureBPFFS(t *testing.T) {
	testenv.RequireRoot(t)
	dir := filepath.Join(t.TempDir(), "a", "b")
	if err := mounts.EnsureBPFFS(dir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	if ok, err := mounts.IsBPFFS(dir); err != nil || !ok {
		t.Fatalf("IsBPFFS after EnsureBPFFS = %v, %v", ok, err)
	}
	if err := mounts.EnsureBPFFS(dir); err != nil {
		t.Fatal(err)
	}
	if n := mountCount(t, dir); n != 1 {
		t.Errorf("%s mounted %d times, want 1", dir, n)
	}
}

func mountCount(t *testing.T, dir string) int {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) > 4 && fields[4] == dir {
			n++
		}
	}
	return n
}
