// Package cluster builds the end-to-end test bed: a node with a client pod
// and backend pods (harness/topology), the datapath loaded and attached the
// way a test asks (per-packet on the pod devices, socket hooks on a child
// cgroup the test process joins), and a TCP+UDP server in every backend.
package cluster

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/attach"
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
	topo := topology.NewForTest(t, topology.Spec{Name: "cl", Pods: []topology.PodSpec{
		{Name: "client"}, {Name: Backends[0]}, {Name: Backends[1]}, {Name: Backends[2]},
	}})
	cfg := loader.DefaultConfig()
	cfg.PinPath = filepath.Join(testenv.BPFFS(t), "servicepath")
	if opts.Config != nil {
		opts.Config(&cfg)
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
		if !opts.PerPacket {
			return nil
		}
		for _, p := range topo.Pods {
			for _, h := range []struct {
				prog *ebpf.Program
				dir  attach.Direction
			}{{dp.FromPod, attach.Ingress}, {dp.ToPod, attach.Egress}} {
				used, err := a.Attach(h.prog, p.HostIf, h.dir)
				if err != nil {
					return err
				}
				if opts.Mode != attach.Auto && used != opts.Mode {
					return fmt.Errorf("attach %s %s: asked for %s, got %s", p.HostIf, h.dir, opts.Mode, used)
				}
			}
		}
		return nil
	})
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
	s := service.Service{Name: "default/e2e", PortName: fmt.Sprintf("%s-%d", proto, port),
		Frontend: service.Frontend{Addr: vip, Port: port, Protocol: proto}}
	for _, n := range backends {
		s.Backends = append(s.Backends, service.Backend{Addr: c.Addr(n, vip), Port: backendPort})
	}
	require.NoError(t, c.Services.Upsert(s), "program %s", s.Frontend)
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
	err := features.HaveProgramHelper(ebpf.CGroupSockAddr, asm.FnSetRetval)
	if testenv.FeatureMissing(t, "bpf_set_retval", "5.19", err) {
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
