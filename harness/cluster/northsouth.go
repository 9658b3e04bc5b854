package cluster

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/metrics"
	"github.com/servicepath/servicepath/datapath/netdev"
	"github.com/servicepath/servicepath/datapath/nodeaddrs"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
	"github.com/servicepath/servicepath/harness/traffic"
)

// NSNode is one node of a north-south bed, with a datapath of its own.
type NSNode struct {
	*topology.Node
	DP       *loader.Datapath
	Services *service.Manager
	// Backend names this node's backend pod.
	Backend string
	// attacher put the node-device programs on the wire device.
	attacher *attach.Attacher
}

// NorthSouth is the north-south test bed: two nodes joined by the wire,
// one backend pod on each, an external client on the wire, and on every
// node its own datapath with the node-device programs on its wire device.
type NorthSouth struct {
	Topo    *topology.Topology
	Nodes   []*NSNode
	Servers map[string]*traffic.Server
}

// NewNorthSouth builds the bed, torn down when the test ends; cfg adjusts
// each node's load-time settings.
func NewNorthSouth(t *testing.T, cfg func(*loader.Config)) *NorthSouth {
	return NewNorthSouthWith(t, NSOptions{Config: cfg})
}

// NSOptions adjust a north-south bed.
type NSOptions struct {
	// Config adjusts each node's load-time settings.
	Config func(*loader.Config)
	// XDP puts the XDP program ahead of tc on every node's wire device, in
	// this mode (empty or attach.XDPOff: tc alone), as UseXDP does. The
	// bed skips the test when the kernel or the devices cannot take it.
	XDP attach.XDPMode
}

// NewNorthSouthWith is NewNorthSouth with options.
func NewNorthSouthWith(t *testing.T, o NSOptions) *NorthSouth {
	testenv.RequireRoot(t)
	testenv.RequireFeature(t, "north-south routing (bpf_fib_lookup, bpf_redirect_neigh)", "5.10", loader.ProbeHostRouting())
	xdp := o.XDP
	if xdp == "" {
		xdp = attach.XDPOff
	}
	if xdp != attach.XDPOff {
		testenv.RequireBuiltFeature(t, "the XDP node-device program", loader.XDPMinKernel, loader.ProbeXDP())
	}
	topo := topology.NewForTest(t, topology.Spec{Name: "ns", Nodes: 2, External: true,
		Pods: []topology.PodSpec{{Name: "backend-0"}, {Name: "backend-1", Node: 1}}})
	if xdp != attach.XDPOff {
		wireChecksums(t, topo)
	}
	bpffs := testenv.BPFFS(t)
	ns := &NorthSouth{Topo: topo, Servers: map[string]*traffic.Server{}}
	for i, n := range topo.Nodes {
		c := loader.DefaultConfig()
		c.PinPath = filepath.Join(bpffs, fmt.Sprintf("node%d", i))
		c.XDP = xdp != attach.XDPOff
		if o.Config != nil {
			o.Config(&c)
		}
		node := &NSNode{Node: n, Backend: fmt.Sprintf("backend-%d", i),
			attacher: &attach.Attacher{LinkDir: filepath.Join(c.PinPath, "links", "netdev"), Mode: attach.Auto}}
		err := n.Do(func() error {
			dp, err := loader.Load(c)
			if err != nil {
				return err
			}
			node.DP = dp
			if err := nodeaddrs.SyncLocal(dp.Maps.NodeAddrs); err != nil {
				return err
			}
			_, err = netdev.Attach(node.attacher, dp, topology.WireIfName, attach.XDPOff)
			return err
		})
		if node.DP != nil {
			t.Cleanup(func() { node.DP.Close() })
		}
		require.NoError(t, err, "load the datapath on node %d and attach it to its wire", i)
		require.NoError(t, AttachNodePods(topo, n, node.DP, attach.Auto, c.PinPath), "attach node %d's pods", i)
		mgr, err := service.NewManager(node.DP.Maps)
		require.NoError(t, err, "service manager of node %d", i)
		node.Services = mgr
		ns.Nodes = append(ns.Nodes, node)

		srv, err := traffic.Serve(topo.Pod(node.Backend), node.Backend, BackendPort)
		require.NoError(t, err, "serve in %s", node.Backend)
		t.Cleanup(func() { srv.Close() })
		ns.Servers[node.Backend] = srv
	}
	if xdp != attach.XDPOff {
		ns.UseXDP(t, xdp)
	}
	return ns
}

// UseXDP puts the XDP program on every node's wire device in mode, ahead
// of tc, replacing the one there; the datapaths must have been loaded with
// XDP (NSOptions.XDP). It skips t when the devices cannot take the mode.
func (ns *NorthSouth) UseXDP(t *testing.T, mode attach.XDPMode) {
	if mode == attach.XDPNative {
		nativeWirePorts(t, ns.Topo)
	}
	for i, n := range ns.Nodes {
		require.NotNil(t, n.DP.XDPFromNetdev, "node %d's datapath has the XDP program: %v", i, n.DP.XDPMissing)
		var used attach.XDPMode
		err := n.Do(func() error {
			var err error
			used, err = n.attacher.AttachXDP(n.DP.XDPFromNetdev, topology.WireIfName, mode)
			return err
		})
		if err != nil {
			t.Skipf("XDP %s on node %d's wire device (veth): %v", mode, i, err)
		}
		require.Equal(t, mode, used, "node %d runs XDP in the mode asked for", i)
	}
}

// Backend is pod's address of like's family, at BackendPort.
func (ns *NorthSouth) Backend(pod string, like netip.Addr) service.Backend {
	p := ns.Topo.Pod(pod)
	a := p.IPv4
	if like.Is6() {
		a = p.IPv6
	}
	return service.Backend{Addr: a, Port: BackendPort}
}

// Counters reads node i's counters.
func (ns *NorthSouth) Counters(t *testing.T, i int) map[string]uint64 {
	c, err := metrics.Read(ns.Nodes[i].DP.Maps.Metrics)
	require.NoError(t, err, "read node %d's counters", i)
	return c
}

// wireChecksums makes the bed's veths carry checksums as a wire does, for
// XDP, which sees packets as a NIC hands them over: no checksum offload on
// the wire devices, so what arrives carries complete checksums (a partial
// one is nothing XDP can update), and pods' devices check what they
// receive, which veth would otherwise take as verified, leaving a
// rewrite's checksum unproved.
func wireChecksums(t *testing.T, topo *topology.Topology) {
	wire := func() error { return topology.SetChecksumOffload(topology.WireIfName, false, false) }
	for _, n := range topo.Nodes {
		require.NoError(t, n.Do(wire), "checksum offload off on %s's wire device", n.Name)
	}
	require.NoError(t, topo.External.Do(wire), "checksum offload off on the client's wire device")
	for _, p := range topo.Pods {
		err := p.Do(func() error { return topology.SetChecksumOffload(topology.PodIfName, true, false) })
		require.NoError(t, err, "receive checksum offload off in pod %s", p.Name)
	}
}

// nativeWirePorts readies the wire for native XDP: a veth takes frames its
// peer sends with XDP_TX or XDP_REDIRECT only when its own receive side
// runs NAPI, which an XDP program on it turns on. The bridge's ports, the
// wire devices' peers, get a program that passes everything.
func nativeWirePorts(t *testing.T, topo *topology.Topology) {
	pass, err := ebpf.NewProgram(&ebpf.ProgramSpec{Name: "sp_xdp_pass", Type: ebpf.XDP, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 2), asm.Return()}}) // XDP_PASS
	require.NoError(t, err, "load an XDP program that passes everything")
	t.Cleanup(func() { pass.Close() })
	err = topo.WirePorts(func(port netlink.Link) error {
		if x := port.Attrs().Xdp; x != nil && x.Attached {
			return nil // readied before
		}
		l, err := link.AttachXDP(link.XDPOptions{Program: pass, Interface: port.Attrs().Index, Flags: link.XDPDriverMode})
		if err != nil {
			return err
		}
		t.Cleanup(func() { l.Close() })
		return nil
	})
	if err != nil {
		t.Skipf("native XDP on the bridge's ports, which native XDP_TX to them needs: %v", err)
	}
}
