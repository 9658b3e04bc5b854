// Package cluster builds the end-to-end test bed: a node with a client pod
// and backend pods (harness/topology) plugged by the device kind a test
// asks for, the datapath loaded and attached the way it asks (per-packet
// where the kind wants its hooks, socket hooks on a child cgroup the test
// process joins; upper-stack or BPF host routing), and a TCP+UDP server in
// every backend.
package cluster

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/endpoints"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/metrics"
	"github.com/servicepath/servicepath/datapath/nodeaddrs"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
	"github.com/servicepath/servicepath/harness/traffic"
)

// BackendPort is where every backend's server listens, TCP and UDP.
const BackendPort = 8080

// Backends names the backend pods.
var Backends = []string{"backend-1", "backend-2", "backend-3"}

// Options say which parts of the datapath to attach.
type Options struct {
	// PerPacket attaches the tc programs to every pod device with Mode.
	PerPacket bool
	Mode      attach.Mode
	// SocketLB attaches the socket hooks to a child cgroup and moves the
	// test process into it.
	SocketLB bool
	// Config adjusts the load-time settings.
	Config func(*loader.Config)
	// Kind plugs the pods into the node; empty means veth. A kind the
	// kernel lacks follows testenv.RequireDriver.
	Kind topology.Kind
	// HostRouting selects upper-stack or BPF host routing (empty: probe).
	// Asking for BPF where the kernel cannot follows testenv.RequireFeature.
	HostRouting loader.HostRouting
	// RemoteBackends puts every backend but the first on a second node,
	// joined to the client's by the wire. The datapath is the first node's.
	RemoteBackends bool
	// BigTCP raises every pod device's GSO/GRO limits (topology.Spec.BigTCP).
	// With upper-stack routing the node refuses to forward IPv6 BIG TCP
	// packets (too big), so IPv6 flows between pods crawl.
	BigTCP bool
}

// String names the options' topology and routing, for subtests.
func (o Options) String() string {
	kind, routing := o.Kind, o.HostRouting
	if kind == "" {
		kind = topology.Veth
	}
	if routing == loader.HostRoutingAuto {
		routing = "auto"
	}
	s := fmt.Sprintf("%s/%s-routing", kind, routing)
	if o.RemoteBackends {
		s += "/two-nodes"
	}
	if o.BigTCP {
		s += "/big-tcp"
	}
	return s
}

// Cluster is a running test bed.
type Cluster struct {
	Topo     *topology.Topology
	Client   *topology.Pod
	DP       *loader.Datapath
	Services *service.Manager
	Servers  map[string]*traffic.Server
	// Cgroup holds the socket hooks and the test process (SocketLB only).
	Cgroup string
}

// New builds a cluster, torn down when the test ends. The datapath is
// loaded inside the node netns, which is "the host" for socket hooks.
func New(t *testing.T, opts Options) *Cluster {
	testenv.RequireRoot(t)
	spec := topology.Spec{Name: "cl", Kind: opts.Kind, BigTCP: opts.BigTCP, Pods: []topology.PodSpec{{Name: "client"}}}
	for i, b := range Backends {
		ps := topology.PodSpec{Name: b}
		if opts.RemoteBackends && i > 0 {
			spec.Nodes, ps.Node = 2, 1
		}
		spec.Pods = append(spec.Pods, ps)
	}
	topo := topology.NewForTest(t, spec)
	cfg := loader.DefaultConfig()
	cfg.PinPath = filepath.Join(testenv.BPFFS(t), "servicepath")
	cfg.HostRouting = opts.HostRouting
	if opts.Config != nil {
		opts.Config(&cfg)
	}
	if cfg.HostRouting == loader.HostRoutingBPF {
		testenv.RequireFeature(t, "BPF host routing", "5.10", loader.ProbeHostRouting())
	}
	c := &Cluster{Topo: topo, Client: topo.Pod("client"), Servers: map[string]*traffic.Server{}}
	a := &attach.Attacher{LinkDir: filepath.Join(cfg.PinPath, "links"), Mode: opts.Mode}
	err := topo.Node.Do(func() error {
		dp, err := loader.Load(cfg)
		if err != nil {
			return err
		}
		c.DP = dp
		if err := nodeaddrs.SyncLocal(dp.Maps.NodeAddrs); err != nil {
			return err
		}
		return nil
	})
	if err == nil && opts.PerPacket {
		err = c.attachPerPacket(opts.Mode, cfg.PinPath)
	}
	if c.DP != nil {
		t.Cleanup(func() { c.DP.Close() })
	}
	if opts.Mode == attach.TCX && errors.Is(err, ebpf.ErrNotSupported) {
		testenv.RequireFeature(t, "tcx", "6.6", err)
	}
	require.NoError(t, err, "load the datapath in the node and attach it")

	if opts.SocketLB {
		cg := testenv.ChildCgroup(t)
		c.Cgroup = cg
		for _, h := range c.DP.SockHooks {
			require.NoError(t, a.AttachCgroup(h.Prog, cg, h.Name, h.Attach), "attach %s to the test cgroup", h.Name)
		}
		testenv.EnterCgroup(t, cg)
	}

	mgr, err := service.NewManager(c.DP.Maps)
	require.NoError(t, err, "service manager")
	c.Services = mgr
	for _, name := range Backends {
		srv, err := traffic.Serve(topo.Pod(name), name, BackendPort)
		require.NoError(t, err, "serve in %s", name)
		t.Cleanup(func() { srv.Close() })
		c.Servers[name] = srv
	}
	return c
}

// ForEachKind runs fn, in a subtest named after each device kind, on a
// cluster built with opts and that kind. Kinds the kernel lacks skip
// outside vmtest and fail in a vmtest kernel that should have them.
func ForEachKind(t *testing.T, opts Options, fn func(t *testing.T, c *Cluster)) {
	for _, k := range topology.Kinds {
		o := opts
		o.Kind = k
		t.Run(string(k), func(t *testing.T) { fn(t, New(t, o)) })
	}
}

// RoutingMatrix is the per-packet test beds: every kind with upper-stack
// and with BPF host routing, and BPF host routing to backends on another
// node for the kinds whose pods the node routes (veth, netkit).
func RoutingMatrix(mode attach.Mode) []Options {
	var out []Options
	for _, k := range topology.Kinds {
		for _, r := range []loader.HostRouting{loader.HostRoutingStack, loader.HostRoutingBPF} {
			out = append(out, Options{PerPacket: true, Mode: mode, Kind: k, HostRouting: r})
		}
	}
	for _, k := range []topology.Kind{topology.Veth, topology.NetkitL3} {
		out = append(out, Options{PerPacket: true, Mode: mode, Kind: k, HostRouting: loader.HostRoutingBPF, RemoteBackends: true})
	}
	return out
}

// attachPerPacket attaches the pod-device programs of the cluster's node.
func (c *Cluster) attachPerPacket(mode attach.Mode, pinPath string) error {
	return AttachPods(c.Topo, c.DP, mode, pinPath)
}

// AttachPods attaches dp's pod-device programs where each pod of topo's
// first node wants them (topology.Pod.Hook: one code path for every kind),
// and registers the pods reachable from the node side for BPF host
// routing. Tests, the bench and scenarios share it.
func AttachPods(topo *topology.Topology, dp *loader.Datapath, mode attach.Mode, pinPath string) error {
	return AttachNodePods(topo, topo.Node, dp, mode, pinPath)
}

// AttachNodePods is AttachPods for the pods of one node, with that node's
// datapath.
func AttachNodePods(topo *topology.Topology, node *topology.Node, dp *loader.Datapath, mode attach.Mode, pinPath string) error {
	for _, p := range topo.Pods {
		if p.Node != node {
			continue
		}
		h := p.Hook()
		a := &attach.Attacher{LinkDir: filepath.Join(pinPath, "links", h.Name), Mode: mode}
		err := h.Do(func() error {
			for _, at := range []struct {
				prog  *ebpf.Program
				point attach.Point
			}{{dp.FromPod, h.FromPod}, {dp.ToPod, h.ToPod}} {
				used, err := a.AttachPoint(at.prog, h.Dev, at.point)
				if err != nil {
					return err
				}
				if used != attach.Netkit && mode != attach.Auto && used != mode {
					return fmt.Errorf("attach %s %s: asked for %s, got %s", h.Dev, at.point, mode, used)
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("pod %s: %w", p.Name, err)
		}
		if !h.HostSide {
			continue
		}
		ep := endpoints.Endpoint{Addrs: []netip.Addr{p.IPv4, p.IPv6}, Ifindex: h.Ifindex}
		if h.FromPod == attach.TCIngress {
			ep.Flags |= endpoints.TCIngress
		}
		if err := p.Do(func() error { return macOf(p.IfName, &ep.MAC) }); err != nil {
			return err
		}
		if err := h.Do(func() error { return macOf(h.Dev, &ep.NodeMAC) }); err != nil {
			return err
		}
		if err := endpoints.Upsert(dp.Endpoints, ep); err != nil {
			return fmt.Errorf("register pod %s: %w", p.Name, err)
		}
	}
	return nil
}

func macOf(dev string, mac *net.HardwareAddr) error {
	l, err := netlink.LinkByName(dev)
	if err != nil {
		return err
	}
	*mac = l.Attrs().HardwareAddr
	return nil
}

// Addr is a pod's address in the family of like.
func (c *Cluster) Addr(pod string, like netip.Addr) netip.Addr {
	p := c.Topo.Pod(pod)
	if like.Unmap().Is4() {
		return p.IPv4
	}
	return p.IPv6
}

// Program points vip:port/proto at BackendPort of the named backend pods.
func (c *Cluster) Program(t *testing.T, vip netip.Addr, port uint16, proto service.Protocol, backends ...string) {
	c.ProgramTo(t, vip, port, proto, BackendPort, backends...)
}

// ProgramTo points vip:port/proto at backendPort of the named backend pods.
func (c *Cluster) ProgramTo(t *testing.T, vip netip.Addr, port uint16, proto service.Protocol, backendPort uint16, backends ...string) {
	var bs []service.Backend
	for _, n := range backends {
		bs = append(bs, service.Backend{Addr: c.Addr(n, vip), Port: backendPort})
	}
	c.ProgramBackends(t, vip, port, proto, bs...)
}

// ProgramBackends points vip:port/proto at backends as given, states and all.
func (c *Cluster) ProgramBackends(t *testing.T, vip netip.Addr, port uint16, proto service.Protocol, backends ...service.Backend) {
	s := service.Service{Name: "default/e2e", PortName: fmt.Sprintf("%s-%d", proto, port),
		Frontend: service.Frontend{Addr: vip, Port: port, Protocol: proto}, Backends: backends}
	require.NoError(t, c.Services.Upsert(s), "program %s", s.Frontend)
}

// Backend is the named pod at BackendPort in the family of like, in state.
func (c *Cluster) Backend(pod string, like netip.Addr, state service.BackendState) service.Backend {
	return service.Backend{Addr: c.Addr(pod, like), Port: BackendPort, State: state}
}

// Counters reads the datapath's counters.
func (c *Cluster) Counters(t *testing.T) map[string]uint64 {
	m, err := metrics.Read(c.DP.Maps.Metrics)
	require.NoError(t, err, "read counters")
	return m
}

// RefusalErrno is what a socket hook's refusal returns on this kernel: the
// errno servicepath sets where the kernel has bpf_set_retval (5.19+),
// EPERM before that.
func RefusalErrno(t *testing.T, want syscall.Errno) syscall.Errno {
	if testenv.FeatureMissing(t, "bpf_set_retval", "5.19", loader.ProbeSetRetval()) {
		return syscall.EPERM
	}
	return want
}

// RequireNetnsCookie skips where the kernel cannot say which netns a
// socket is in (SO_NETNS_COOKIE, 5.14): the hooks then cannot tell the
// host from a pod.
func RequireNetnsCookie(t *testing.T) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err, "socket")
	defer unix.Close(fd)
	_, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if errors.Is(err, unix.ENOPROTOOPT) {
		err = fmt.Errorf("%w: %v", ebpf.ErrNotSupported, err)
	}
	testenv.RequireFeature(t, "SO_NETNS_COOKIE", "5.14", err)
}
