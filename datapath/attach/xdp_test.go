package attach_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/harness/testenv"
)

func TestParseXDPMode(t *testing.T) {
	for _, in := range []string{"off", "auto", "native", "generic"} {
		m, err := attach.ParseXDPMode(in)
		assert.NoError(t, err, "%q parses", in)
		assert.Equal(t, attach.XDPMode(in), m, "%q parses to itself", in)
	}
	_, err := attach.ParseXDPMode("driver")
	assert.ErrorContains(t, err, "want off, auto, native or generic", "an unknown mode is refused with the valid spellings")
}

// xdpPass is an XDP program that passes everything: the attach code does
// not care what it attaches.
func xdpPass(t *testing.T) *ebpf.Program {
	t.Helper()
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.XDP, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 2), asm.Return()}})
	require.NoError(t, err, "load an XDP program")
	t.Cleanup(func() { p.Close() })
	return p
}

// xdpOn is the program attached to dev's XDP hook and how (netlink's
// XDP_ATTACHED_*: 1 native, 2 generic); 0, 0 when none.
func xdpOn(t *testing.T, dev string) (ebpf.ProgramID, uint32) {
	t.Helper()
	l, err := netlink.LinkByName(dev)
	require.NoError(t, err, "find %s", dev)
	x := l.Attrs().Xdp
	if x == nil || !x.Attached {
		return 0, 0
	}
	return ebpf.ProgramID(x.ProgId), x.AttachMode
}

const (
	xdpAttachedNative  = 1
	xdpAttachedGeneric = 2
)

func TestAttachXDP(t *testing.T) {
	testenv.RequireRoot(t)
	p1, p2 := xdpPass(t), xdpPass(t)
	linkDir := filepath.Join(testenv.BPFFS(t), "links")

	defer enterNewNetns(t)()
	const dev, peer = "sp-xdp-a", "sp-xdp-b"
	require.NoError(t, netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: dev}, PeerName: peer}), "create veth pair in the test netns")
	a := &attach.Attacher{LinkDir: linkDir}

	_, err := a.AttachXDP(p1, "sp-test-missing", attach.XDPGeneric)
	assert.Error(t, err, "attaching to a missing device fails")

	mode, err := a.AttachXDP(p1, dev, attach.XDPGeneric)
	testenv.RequireFeature(t, "XDP links", "5.9", err)
	assert.Equal(t, attach.XDPGeneric, mode, "generic mode reported")
	id, how := xdpOn(t, dev)
	assert.Equal(t, testenv.ProgramID(t, p1), id, "the program runs on %s", dev)
	assert.Equal(t, uint32(xdpAttachedGeneric), how, "in generic mode")
	pin := filepath.Join(linkDir, dev+"-xdp-generic")
	pinned, err := link.LoadPinnedLink(pin, nil)
	require.NoError(t, err, "XDP link pinned at %s", pin)
	info, err := pinned.Info()
	require.NoError(t, err, "pinned link info")
	linkID := info.ID
	require.NoError(t, pinned.Close(), "close pinned link handle")

	// Auto keeps the mode a program already runs in and swaps it in place.
	mode, err = a.AttachXDP(p2, dev, attach.XDPAuto)
	require.NoError(t, err, "re-attach with auto")
	assert.Equal(t, attach.XDPGeneric, mode, "auto over a generic link keeps generic")
	id, _ = xdpOn(t, dev)
	assert.Equal(t, testenv.ProgramID(t, p2), id, "re-attach swapped the program")
	pinned, err = link.LoadPinnedLink(pin, nil)
	require.NoError(t, err, "XDP link still pinned")
	info, err = pinned.Info()
	require.NoError(t, err, "pinned link info")
	assert.Equal(t, linkID, info.ID, "the same link was updated, not a second one made")
	require.NoError(t, pinned.Close(), "close pinned link handle")

	// Native: veth has a driver XDP hook. The generic link goes first, since
	// a device runs one XDP program.
	mode, err = a.AttachXDP(p1, dev, attach.XDPNative)
	require.NoError(t, err, "attach native on veth")
	assert.Equal(t, attach.XDPNative, mode, "native mode reported")
	id, how = xdpOn(t, dev)
	assert.Equal(t, testenv.ProgramID(t, p1), id, "the program runs on %s", dev)
	assert.Equal(t, uint32(xdpAttachedNative), how, "in native mode")
	_, err = os.Stat(pin)
	assert.ErrorIs(t, err, os.ErrNotExist, "the generic link's pin is gone")

	// DetachAll finds XDP links too, even while another process holds one.
	held, err := link.LoadPinnedLink(filepath.Join(linkDir, dev+"-xdp-native"), nil)
	require.NoError(t, err, "open the pinned link as another process would")
	require.NoError(t, a.DetachAll(), "detach all")
	id, _ = xdpOn(t, dev)
	assert.Zero(t, id, "no XDP program on %s after DetachAll", dev)
	require.NoError(t, held.Close(), "close the other handle")

	// Auto on a fresh device takes native where the driver has it.
	mode, err = a.AttachXDP(p1, dev, attach.XDPAuto)
	require.NoError(t, err, "attach auto")
	assert.Equal(t, attach.XDPNative, mode, "auto is native on veth")
	require.NoError(t, a.DetachXDP(dev), "detach XDP")
	id, _ = xdpOn(t, dev)
	assert.Zero(t, id, "no XDP program on %s after DetachXDP", dev)
	require.NoError(t, a.DetachXDP(dev), "detaching again is not an error")
}
