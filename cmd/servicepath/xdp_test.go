package main

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
)

// `load --node-device-xdp` puts XDP ahead of tc on the node device, a
// later load moves it between modes or takes it off, and unload removes
// it with the rest.
func TestCLINodeDeviceXDP(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireBuiltFeature(t, "the XDP node-device program", loader.XDPMinKernel, loader.ProbeXDP())
	topo := topology.NewForTest(t, topology.Spec{Name: "clixdp", Nodes: 1, External: true})
	bpffs := filepath.Join(testenv.BPFFS(t), "sp")
	dev := topology.WireIfName
	inNode := func(args ...string) string {
		code, out, errOut := runCLIIn(t, topo.Node, args...)
		require.Zero(t, code, "servicepath %s: %s", strings.Join(args, " "), errOut)
		return out
	}
	// The XDP program on dev and how (1 native, 2 generic); 0 when none.
	xdpMode := func() uint32 {
		var mode uint32
		require.NoError(t, topo.Node.Do(func() error {
			l, err := netlink.LinkByName(dev)
			if err == nil && l.Attrs().Xdp != nil && l.Attrs().Xdp.Attached {
				mode = l.Attrs().Xdp.AttachMode
			}
			return err
		}), "look at %s", dev)
		return mode
	}
	load := func(mode string) string {
		return inNode("load", "--bpffs", bpffs, "--node-device", dev, "--node-device-xdp", mode)
	}

	out := load("generic")
	assert.Contains(t, out, "attached from-netdev and to-netdev to "+dev, "tc stays: %s", out)
	assert.Contains(t, out, "attached xdp-from-netdev to "+dev+" (generic)", "XDP in front: %s", out)
	assert.Equal(t, uint32(2), xdpMode(), "generic XDP on %s", dev)

	out = load("native")
	assert.Contains(t, out, "attached xdp-from-netdev to "+dev+" (native)", "moved to native: %s", out)
	assert.Equal(t, uint32(1), xdpMode(), "native XDP on %s", dev)

	out = load("off")
	assert.NotContains(t, out, "xdp-from-netdev", "no XDP asked for: %s", out)
	assert.Zero(t, xdpMode(), "a load without XDP takes it off %s", dev)

	load("auto")
	assert.Equal(t, uint32(1), xdpMode(), "auto is native on veth")
	inNode("unload", "--bpffs", bpffs)
	assert.Zero(t, xdpMode(), "unload takes XDP off %s", dev)
}
