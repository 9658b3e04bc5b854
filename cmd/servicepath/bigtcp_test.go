package main

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/servicepath/servicepath/datapath/netdev"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
)

// `load --big-tcp` raises the limits of the pod and node devices it
// attaches to, and prints what applied; without it they stay.
func TestCLIBigTCP(t *testing.T) {
	testenv.RequireRoot(t)
	topo := topology.NewForTest(t, topology.Spec{Name: "clibig", External: true, Pods: []topology.PodSpec{{Name: "a"}}})
	bpffs := filepath.Join(testenv.BPFFS(t), "sp")
	devs := []string{topo.Pod("a").HostIf, topology.WireIfName}
	gso := func(dev string) (v6, v4 uint32) {
		require.NoError(t, topo.Node.Do(func() error {
			l, err := netlink.LinkByName(dev)
			if err == nil {
				v6, v4 = l.Attrs().GSOMaxSize, l.Attrs().GSOIPv4MaxSize
			}
			return err
		}), "limits of %s", dev)
		return v6, v4
	}
	load := func(extra ...string) string {
		args := append([]string{"load", "--bpffs", bpffs, "--device", devs[0], "--node-device", devs[1]}, extra...)
		code, out, errOut := runCLIIn(t, topo.Node, args...)
		require.Zero(t, code, "servicepath %s: %s", strings.Join(args, " "), errOut)
		return out
	}
	t.Cleanup(func() { runCLIIn(t, topo.Node, "unload", "--bpffs", bpffs) })

	out := load()
	assert.NotContains(t, out, "big tcp", "not asked for: %s", out)
	for _, dev := range devs {
		v6, _ := gso(dev)
		assert.LessOrEqual(t, v6, uint32(65536), "%s untouched without --big-tcp", dev)
	}
	out = load("--big-tcp")
	for _, dev := range devs {
		v6, v4 := gso(dev)
		assert.Contains(t, out, "big tcp on "+dev+": gso_max_size", "%s reported: %s", dev, out)
		if strings.Contains(out, "big tcp on "+dev+" refused") || v4 == 0 {
			t.Logf("the kernel kept %s short of BIG TCP: %s", dev, out)
			continue
		}
		assert.Equal(t, uint32(netdev.BigTCPSize), v6, "%s gso_max_size", dev)
		assert.Equal(t, uint32(netdev.BigTCPSize), v4, "%s gso_ipv4_max_size", dev)
		assert.Contains(t, out, "(IPv6 true, IPv4 true)", "%s", out)
	}
}
