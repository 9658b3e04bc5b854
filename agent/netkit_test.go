package agent

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/endpoints"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
	"github.com/servicepath/servicepath/harness/traffic"
)

// waitNetkitHooked waits until dev carries from-pod in netkit's peer slot
// and to-pod in its primary slot.
func waitNetkitHooked(t *testing.T, n *topology.Node, dp *loader.Datapath, dev string) {
	t.Helper()
	from, to := testenv.ProgramID(t, dp.FromPod), testenv.ProgramID(t, dp.ToPod)
	waitFor(t, "pod programs in netkit's slots of "+dev, func() (bool, string) {
		var peer, primary []ebpf.ProgramID
		err := n.Do(func() error {
			l, err := netlink.LinkByName(dev)
			if err != nil {
				return err
			}
			for _, q := range []struct {
				at  ebpf.AttachType
				ids *[]ebpf.ProgramID
			}{{ebpf.AttachNetkitPeer, &peer}, {ebpf.AttachNetkitPrimary, &primary}} {
				res, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: q.at})
				if err != nil {
					return err
				}
				for _, p := range res.Programs {
					*q.ids = append(*q.ids, p.ID)
				}
			}
			return nil
		})
		if err != nil {
			return false, err.Error()
		}
		return slices.Contains(peer, from) && slices.Contains(primary, to), fmt.Sprintf("peer %v, primary %v", peer, primary)
	})
}

// A netkit pod device is found and attached to as a veth is, in netkit's
// own slots; its endpoint says from-pod does not run at tc ingress, and the
// pod answers its hostPort through BPF host routing. Removing the device
// removes its pins.
func TestPodNetworkNetkit(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireFeature(t, "BPF host routing (bpf_fib_lookup, bpf_redirect_neigh, bpf_redirect_peer)", "5.10", loader.ProbeHostRouting())
	topo, dp, pin := newPodNetBed(t, topology.Spec{Name: "podnk", Kind: topology.NetkitL2})
	node, web := topo.Node, topo.Pod("web")

	pattern, err := ParseDevicePattern("h[0-9]*")
	require.NoError(t, err, "pattern")
	linkDir := filepath.Join(pin, "links")
	c := newFakeKube()
	a := startAgent(t, c, dp.Maps, Config{NodeName: testNode, Pods: &PodNetwork{
		Devices: pattern, NodeDevices: []string{topology.WireIfName},
		Attacher: &attach.Attacher{LinkDir: linkDir, Mode: attach.Auto},
		FromPod:  dp.FromPod, ToPod: dp.ToPod, Endpoints: dp.Endpoints, Do: node.Do,
	}})
	c.waitWatching(t)
	a.waitHealthy(t)
	waitNetkitHooked(t, node, dp, web.HostIf)

	c.create(t, withHostPort(pod("web", testNode, corev1.PodRunning, web.IPv4.String(), web.IPv6.String()), corev1.ProtocolTCP, 18080, 8080))
	want := &endpoints.Info{Ifindex: uint32(web.HostIfIndex)}
	copy(want.MAC[:], macIn(t, web.Do, web.IfName))
	copy(want.NodeMAC[:], macIn(t, node.Do, web.HostIf))
	waitEndpoint(t, dp.Endpoints, web.IPv4, want)
	waitEndpoint(t, dp.Endpoints, web.IPv6, want)
	for _, addr := range []netip.Addr{node.WireIPv4, node.WireIPv6} {
		r, err := traffic.TCPExchange(topo.External, netip.AddrPortFrom(addr, 18080), []byte("hostport"), 5*time.Second)
		require.NoError(t, err, "TCP from outside to the hostPort on %s", addr)
		assert.Equal(t, "web", r.Identity, "pod web answers its hostPort on %s", addr)
	}

	require.NoError(t, node.Do(func() error {
		l, err := netlink.LinkByName(web.HostIf)
		if err != nil {
			return err
		}
		return netlink.LinkDel(l)
	}), "delete netkit %s", web.HostIf)
	waitUnpinned(t, linkDir, web.HostIf)
	waitEndpoint(t, dp.Endpoints, web.IPv4, nil)
}
