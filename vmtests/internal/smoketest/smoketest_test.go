package smoketest

import (
	"os"
	"runtime"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/rlimit"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: BPF and netlink configuration need CAP_BPF and CAP_NET_ADMIN")
	}
	// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
	if err := rlimit.RemoveMemlock(); err != nil {
		t.Fatalf("remove memlock limit: %v", err)
	}
}

func TestGuestKernel(t *testing.T) {
	want := os.Getenv("VMTEST_KERNEL_RELEASE")
	if want == "" {
		t.Skip("not in a vmtest guest")
	}
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatalf("uname: %v", err)
	}
	if got := unix.ByteSliceToString(u.Release[:]); got != want {
		t.Fatalf("guest runs kernel %s, vmtest booted %s", got, want)
	}
}

func TestHashMap(t *testing.T) {
	requireRoot(t)
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: 8, MaxEntries: 16})
	if err != nil {
		t.Fatalf("create hash map: %v", err)
	}
	defer m.Close()
	if err := m.Put(uint32(7), uint64(42)); err != nil {
		t.Fatalf("put key 7: %v", err)
	}
	var got uint64
	if err := m.Lookup(uint32(7), &got); err != nil {
		t.Fatalf("lookup key 7: %v", err)
	}
	if got != 42 {
		t.Fatalf("value of key 7 is %d, want 42", got)
	}
}

func TestXDPTestRun(t *testing.T) {
	requireRoot(t)
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:    ebpf.XDP,
		License: "MIT",
		Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R0, 2), // XDP_PASS
			asm.Return(),
		},
	})
	if err != nil {
		t.Fatalf("load XDP program: %v", err)
	}
	defer prog.Close()
	ret, err := prog.Run(&ebpf.RunOptions{Data: make([]byte, 64)})
	if err != nil {
		t.Fatalf("BPF_PROG_TEST_RUN: %v", err)
	}
	if ret != 2 {
		t.Fatalf("XDP verdict is %d, want XDP_PASS (2)", ret)
	}
}

func TestVethPair(t *testing.T) {
	requireRoot(t)
	h := newNetns(t)
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "smoke0"}, PeerName: "smoke1"}
	if err := h.LinkAdd(veth); err != nil {
		t.Fatalf("add veth pair: %v", err)
	}
	for _, name := range []string{"smoke0", "smoke1"} {
		l, err := h.LinkByName(name)
		if err != nil {
			t.Fatalf("find %s: %v", name, err)
		}
		if err := h.LinkSetUp(l); err != nil {
			t.Fatalf("set %s up: %v", name, err)
		}
	}
}

// newNetns returns a netlink handle in a fresh network namespace, so the
// test leaves the host's (or guest's) interfaces alone.
func newNetns(t *testing.T) *netlink.Handle {
	t.Helper()
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatalf("get current netns: %v", err)
	}
	defer orig.Close()
	ns, err := netns.New()
	if err != nil {
		t.Fatalf("create netns: %v", err)
	}
	t.Cleanup(func() { ns.Close() })
	if err := netns.Set(orig); err != nil {
		// The thread stays locked and dies with the test goroutine.
		t.Fatalf("return to original netns: %v", err)
	}
	runtime.UnlockOSThread()
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatalf("netlink handle in new netns: %v", err)
	}
	t.Cleanup(h.Close)
	return h
}
