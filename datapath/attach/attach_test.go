package attach_test

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/harness/testenv"
)

func TestParseMode(t *testing.T) {
	for _, in := range []string{"auto", "tcx", "tc"} {
		m, err := attach.ParseMode(in)
		assert.NoError(t, err, "%q parses", in)
		assert.Equal(t, attach.Mode(in), m, "%q parses to itself", in)
	}
	for _, in := range []string{"", "TC", "xdp", "tcx "} {
		m, err := attach.ParseMode(in)
		assert.ErrorContains(t, err, "want auto, tcx or tc", "%q is refused with the valid spellings", in)
		assert.Empty(t, m, "%q gives no mode", in)
	}
}

// enterNewNetns moves the calling goroutine, locked to its thread, into a
// new network namespace; the returned func moves it back. If moving back
// fails the thread stays locked, so the runtime discards it with the
// goroutine instead of reusing it in the wrong namespace. The host netns
// is never touched. No subtests: they would run on other threads.
func enterNewNetns(t *testing.T) func() {
	t.Helper()
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("get current netns: %v", err)
	}
	ns, err := netns.New()
	if err != nil {
		if serr := netns.Set(orig); serr != nil {
			t.Fatalf("new netns: %v; and moving back failed: %v", err, serr)
		}
		orig.Close()
		runtime.UnlockOSThread()
		t.Fatalf("new netns: %v", err)
	}
	return func() {
		if err := netns.Set(orig); err != nil {
			t.Errorf("move back to the original netns: %v", err)
			return
		}
		ns.Close()
		orig.Close()
		runtime.UnlockOSThread()
	}
}

// ourFilters lists servicepath's cls_bpf filters on dev's dir hook.
func ourFilters(t *testing.T, dev string, dir attach.Direction) []*netlink.BpfFilter {
	t.Helper()
	l, err := netlink.LinkByName(dev)
	require.NoError(t, err, "find %s", dev)
	parent := uint32(netlink.HANDLE_MIN_INGRESS)
	if dir == attach.Egress {
		parent = netlink.HANDLE_MIN_EGRESS
	}
	filters, err := netlink.FilterList(l, parent)
	if err != nil {
		// No clsact qdisc, so no filters.
		return nil
	}
	var out []*netlink.BpfFilter
	for _, f := range filters {
		bf, ok := f.(*netlink.BpfFilter)
		assert.True(t, ok, "every filter on %s %s is a bpf filter (no one else's)", dev, dir)
		if ok && bf.Name == "servicepath" {
			out = append(out, bf)
		}
	}
	return out
}

// tcxProgs lists the programs attached with tcx to dev's dir hook.
func tcxProgs(t *testing.T, dev string, dir attach.Direction) []ebpf.ProgramID {
	t.Helper()
	out, err := queryTCX(dev, dir)
	require.NoError(t, err, "query tcx programs on %s %s", dev, dir)
	return out
}

func queryTCX(dev string, dir attach.Direction) ([]ebpf.ProgramID, error) {
	l, err := netlink.LinkByName(dev)
	if err != nil {
		return nil, err
	}
	at := ebpf.AttachTCXIngress
	if dir == attach.Egress {
		at = ebpf.AttachTCXEgress
	}
	res, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: at})
	if err != nil {
		return nil, err
	}
	var out []ebpf.ProgramID
	for _, p := range res.Programs {
		out = append(out, p.ID)
	}
	return out, nil
}

func ifindex(t *testing.T, dev string) int {
	t.Helper()
	l, err := netlink.LinkByName(dev)
	require.NoError(t, err, "find %s", dev)
	return l.Attrs().Index
}

func TestAttachModes(t *testing.T) {
	testenv.RequireRoot(t)
	cfg := loader.DefaultConfig()
	cfg.CTMapSize = 1024
	dp, err := loader.Load(cfg)
	require.NoError(t, err, "load datapath")
	t.Cleanup(func() { dp.Close() })
	fromPod, toPod := testenv.ProgramID(t, dp.FromPod), testenv.ProgramID(t, dp.ToPod)
	linkDir := filepath.Join(testenv.BPFFS(t), "links")

	defer enterNewNetns(t)()
	const devA, devB = "sp-test-a", "sp-test-b"
	require.NoError(t, netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: devA}, PeerName: devB}), "create veth pair in the test netns")
	pinA := filepath.Join(linkDir, devA+"-ingress")

	a := &attach.Attacher{LinkDir: linkDir, Mode: attach.TC}
	_, err = a.Attach(dp.FromPod, "sp-test-missing", attach.Ingress)
	assert.Error(t, err, "attaching to a missing device fails")

	// tc: one cls_bpf filter named servicepath, direct action.
	mode, err := a.Attach(dp.FromPod, devA, attach.Ingress)
	require.NoError(t, err, "attach tc")
	assert.Equal(t, attach.TC, mode, "tc mode reported")
	fs := ourFilters(t, devA, attach.Ingress)
	require.Len(t, fs, 1, "one servicepath filter on ingress")
	assert.Equal(t, int(fromPod), fs[0].Id, "the filter runs from-pod")
	assert.True(t, fs[0].DirectAction, "the filter is in direct-action mode")
	assert.Empty(t, ourFilters(t, devA, attach.Egress), "nothing on egress")
	hooks, err := attach.TCHooks()
	require.NoError(t, err, "list tc hooks")
	assert.Equal(t, []string{devA + "-ingress"}, hooks, "the filter is listed as its tcx link would be pinned")
	if progs, err := queryTCX(devA, attach.Ingress); err == nil { // below 6.6 there is no tcx to find
		assert.Empty(t, progs, "no tcx program in tc mode")
	}

	// Re-attaching replaces in place.
	_, err = a.Attach(dp.ToPod, devA, attach.Ingress)
	require.NoError(t, err, "re-attach tc with another program")
	fs = ourFilters(t, devA, attach.Ingress)
	require.Len(t, fs, 1, "still exactly one servicepath filter after re-attach")
	assert.Equal(t, int(toPod), fs[0].Id, "re-attach replaced the program")
	_, err = a.Attach(dp.FromPod, devA, attach.Ingress)
	require.NoError(t, err, "re-attach tc with the same program")
	require.Len(t, ourFilters(t, devA, attach.Ingress), 1, "still exactly one filter after a third attach")

	// tcx: the tc filter goes, a pinned link appears.
	a.Mode = attach.TCX
	mode, err = a.Attach(dp.FromPod, devA, attach.Ingress)
	testenv.RequireFeature(t, "tcx", "6.6", err)
	assert.Equal(t, attach.TCX, mode, "tcx mode reported")
	assert.Empty(t, ourFilters(t, devA, attach.Ingress), "moving to tcx removed the tc filter")
	assert.Equal(t, []ebpf.ProgramID{fromPod}, tcxProgs(t, devA, attach.Ingress), "from-pod is the one tcx program on ingress")
	pinned, err := link.LoadPinnedLink(pinA, nil)
	require.NoError(t, err, "tcx link pinned at %s", pinA)
	info, err := pinned.Info()
	require.NoError(t, err, "pinned link info")
	require.NotNil(t, info.TCX(), "the pinned link is a tcx link")
	assert.Equal(t, uint32(ifindex(t, devA)), info.TCX().Ifindex, "the pinned link is on %s", devA)
	assert.Equal(t, fromPod, info.Program, "the pinned link runs from-pod")
	linkID := info.ID
	require.NoError(t, pinned.Close(), "close pinned link handle")

	// Re-attaching with tcx updates the pinned link in place.
	_, err = a.Attach(dp.ToPod, devA, attach.Ingress)
	require.NoError(t, err, "re-attach tcx with another program")
	assert.Equal(t, []ebpf.ProgramID{toPod}, tcxProgs(t, devA, attach.Ingress), "re-attach swapped the program; still one")
	pinned, err = link.LoadPinnedLink(pinA, nil)
	require.NoError(t, err, "tcx link still pinned")
	info, err = pinned.Info()
	require.NoError(t, err, "pinned link info")
	assert.Equal(t, linkID, info.ID, "the same link was updated, not a second one made")
	require.NoError(t, pinned.Close(), "close pinned link handle")

	// Detach removes it. The kernel releases an unpinned link
	// asynchronously, so whether the program is gone is checked by
	// TestDetachDetachesTCXLinks, deterministically.
	require.NoError(t, a.Detach(devA, attach.Ingress), "detach")
	_, err = os.Stat(pinA)
	assert.ErrorIs(t, err, os.ErrNotExist, "detach removed the pin")
	assert.Empty(t, ourFilters(t, devA, attach.Ingress), "no tc filter either")
	require.NoError(t, a.Detach(devA, attach.Ingress), "detaching again is not an error")

	// Auto picks tcx here; tc afterwards replaces the tcx link.
	a.Mode = attach.Auto
	mode, err = a.Attach(dp.FromPod, devA, attach.Ingress)
	require.NoError(t, err, "attach auto")
	assert.Equal(t, attach.TCX, mode, "auto uses tcx on a kernel that has it")
	a.Mode = attach.TC
	mode, err = a.Attach(dp.FromPod, devA, attach.Ingress)
	require.NoError(t, err, "attach tc over tcx")
	assert.Equal(t, attach.TC, mode, "tc mode reported")
	_, err = os.Stat(pinA)
	assert.ErrorIs(t, err, os.ErrNotExist, "moving to tc removed the pin")
	require.Len(t, ourFilters(t, devA, attach.Ingress), 1, "one tc filter")

	// DetachAll clears tc and tcx on every device of the netns.
	_, err = a.Attach(dp.ToPod, devA, attach.Egress)
	require.NoError(t, err, "attach tc egress")
	a.Mode = attach.TCX
	_, err = a.Attach(dp.FromPod, devB, attach.Ingress)
	require.NoError(t, err, "attach tcx on the peer")
	_, err = a.Attach(dp.ToPod, devB, attach.Egress)
	require.NoError(t, err, "attach tcx egress on the peer")
	require.NoError(t, a.DetachAll(), "detach all")
	for _, dev := range []string{devA, devB} {
		for _, dir := range []attach.Direction{attach.Ingress, attach.Egress} {
			assert.Empty(t, ourFilters(t, dev, dir), "no servicepath filter on %s %s after DetachAll", dev, dir)
		}
	}
	_, err = os.Stat(linkDir)
	assert.ErrorIs(t, err, os.ErrNotExist, "DetachAll removed the link directory")
}

// Detach, DetachAll and a move to tc must leave no servicepath tcx program
// on the device when they return. Removing the pin is not enough: it drops
// one reference, the kernel frees the link later (after an RCU grace period,
// from a workqueue), and never while another process (bpftool, a second
// servicepath) holds the link open. Holding it open here makes the check
// deterministic.
func TestDetachDetachesTCXLinks(t *testing.T) {
	testenv.RequireRoot(t)
	cfg := loader.DefaultConfig()
	cfg.CTMapSize = 1024
	dp, err := loader.Load(cfg)
	require.NoError(t, err, "load datapath")
	t.Cleanup(func() { dp.Close() })
	linkDir := filepath.Join(testenv.BPFFS(t), "links")

	defer enterNewNetns(t)()
	for i, op := range []struct {
		name string
		do   func(a *attach.Attacher, dev string) error
	}{
		{"Detach", func(a *attach.Attacher, dev string) error { return a.Detach(dev, attach.Ingress) }},
		{"DetachAll", func(a *attach.Attacher, dev string) error { return a.DetachAll() }},
		{"Attach in tc mode", func(a *attach.Attacher, dev string) error {
			a.Mode = attach.TC
			_, err := a.Attach(dp.FromPod, dev, attach.Ingress)
			return err
		}},
	} {
		dev, peer := fmt.Sprintf("sp-held-%d", i), fmt.Sprintf("sp-peer-%d", i)
		require.NoError(t, netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: dev}, PeerName: peer}), "%s: create veth pair", op.name)
		a := &attach.Attacher{LinkDir: linkDir, Mode: attach.TCX}
		_, err := a.Attach(dp.FromPod, dev, attach.Ingress)
		testenv.RequireFeature(t, "tcx", "6.6", err)
		require.Len(t, tcxProgs(t, dev, attach.Ingress), 1, "%s: one tcx program attached", op.name)

		held, err := link.LoadPinnedLink(filepath.Join(linkDir, dev+"-ingress"), nil)
		require.NoError(t, err, "%s: open the pinned link as another process would", op.name)
		require.NoError(t, op.do(a, dev), "%s succeeds", op.name)
		assert.Empty(t, tcxProgs(t, dev, attach.Ingress), "%s leaves no tcx program on %s when it returns", op.name, dev)
		require.NoError(t, held.Close(), "%s: close the other handle", op.name)
	}
}
