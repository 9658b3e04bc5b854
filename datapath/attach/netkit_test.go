package attach_test

import (
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
)

// queryNetkit lists the programs in one of a netkit device's slots.
func queryNetkit(ifindex int, at ebpf.AttachType) []ebpf.ProgramID {
	res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: at})
	if err != nil {
		return nil
	}
	var ids []ebpf.ProgramID
	for _, p := range res.Programs {
		ids = append(ids, p.ID)
	}
	return ids
}

// Assertions inside Node.Do use assert only: require's FailNow must not
// run off the test goroutine.

// The pod's programs go into netkit's peer and primary slots through the
// primary device; attaching again replaces in place, detaching empties.
func TestNetkitPoints(t *testing.T) {
	topo := topology.NewForTest(t, topology.Spec{Name: "nkattach", Kind: topology.NetkitL3, Pods: []topology.PodSpec{{Name: "p"}}})
	dp, err := loader.Load(loader.DefaultConfig())
	require.NoError(t, err, "load datapath")
	t.Cleanup(func() { dp.Close() })
	pod := topo.Pods[0]
	a := &attach.Attacher{LinkDir: filepath.Join(testenv.BPFFS(t), "links")}
	ids := map[attach.Point]ebpf.ProgramID{attach.NetkitPeer: testenv.ProgramID(t, dp.FromPod), attach.NetkitPrimary: testenv.ProgramID(t, dp.ToPod)}
	require.NoError(t, topo.Node.Do(func() error {
		for _, p := range []struct {
			prog  *ebpf.Program
			point attach.Point
			at    ebpf.AttachType
		}{{dp.FromPod, attach.NetkitPeer, ebpf.AttachNetkitPeer}, {dp.ToPod, attach.NetkitPrimary, ebpf.AttachNetkitPrimary}} {
			for range 2 {
				mode, err := a.AttachPoint(p.prog, pod.HostIf, p.point)
				if err != nil {
					return err
				}
				assert.Equal(t, attach.Netkit, mode, "%s reported as netkit", p.point)
			}
			assert.Equal(t, []ebpf.ProgramID{ids[p.point]}, queryNetkit(pod.HostIfIndex, p.at), "%s slot holds our program once", p.point)
			if err := a.DetachPoint(pod.HostIf, p.point); err != nil {
				return err
			}
			assert.Empty(t, queryNetkit(pod.HostIfIndex, p.at), "%s slot empty after detach", p.point)
		}
		// A veth is not netkit: refused, not attached somewhere else.
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "not-nk"}, PeerName: "not-nk-p"}
		if err := netlink.LinkAdd(veth); err != nil {
			return err
		}
		_, err := a.AttachPoint(dp.FromPod, "not-nk", attach.NetkitPeer)
		assert.ErrorContains(t, err, "not netkit", "netkit points on a veth are refused")
		return nil
	}), "in the node")
}
