package clusterip

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/stats"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
	"github.com/servicepath/servicepath/harness/traffic"
)

const (
	e2eTCPPort = 80
	e2eUDPPort = 53
	timeout    = 3 * time.Second
)

var backendNames = []string{"backend-1", "backend-2", "backend-3"}

// cluster is a client pod and three backend pods on one node, with the
// datapath attached to every pod's host-side device.
type cluster struct {
	topo    *topology.Topology
	client  *topology.Pod
	mgr     *service.Manager
	servers map[string]*traffic.Server
}

func newCluster(t *testing.T, mode attach.Mode) *cluster {
	testenv.RequireRoot(t)
	topo := topology.NewForTest(t, topology.Spec{Name: "cip", Pods: []topology.PodSpec{
		{Name: "client"}, {Name: backendNames[0]}, {Name: backendNames[1]}, {Name: backendNames[2]},
	}})
	bpffs := testenv.BPFFS(t)
	cfg := loader.DefaultConfig()
	cfg.PinPath = filepath.Join(bpffs, "servicepath")
	dp, err := loader.Load(cfg)
	require.NoError(t, err, "load datapath")
	t.Cleanup(func() { dp.Close() })

	a := &attach.Attacher{LinkDir: filepath.Join(cfg.PinPath, "links"), Mode: mode}
	require.NoError(t, topo.Node.Do(func() error {
		for _, p := range topo.Pods {
			if used, err := a.Attach(dp.FromPod, p.HostIf, attach.Ingress); err != nil || used != mode {
				return fmt.Errorf("attach %s ingress: mode %s: %w", p.HostIf, used, err)
			}
			if used, err := a.Attach(dp.ToPod, p.HostIf, attach.Egress); err != nil || used != mode {
				return fmt.Errorf("attach %s egress: mode %s: %w", p.HostIf, used, err)
			}
		}
		return nil
	}), "attach to every pod device with %s", mode)

	mgr, err := service.NewManager(dp.Maps)
	require.NoError(t, err, "service manager")
	c := &cluster{topo: topo, client: topo.Pod("client"), mgr: mgr, servers: map[string]*traffic.Server{}}
	for _, name := range backendNames {
		srv, err := traffic.Serve(topo.Pod(name), name, BackendPort)
		require.NoError(t, err, "serve in %s", name)
		t.Cleanup(func() { srv.Close() })
		c.servers[name] = srv
	}
	return c
}

func (c *cluster) backendAddr(name string, v6 bool) netip.Addr {
	p := c.topo.Pod(name)
	if v6 {
		return p.IPv6
	}
	return p.IPv4
}

// program points the family's VIP (TCP and UDP) at the named backends.
func (c *cluster) program(t *testing.T, f Family, names ...string) {
	v6 := f.VIP.Is6()
	for _, proto := range []struct {
		p    service.Protocol
		port uint16
	}{{service.TCP, e2eTCPPort}, {service.UDP, e2eUDPPort}} {
		s := service.Service{Name: "default/e2e", PortName: proto.p.String(),
			Frontend: service.Frontend{Addr: f.VIP, Port: proto.port, Protocol: proto.p}}
		for _, n := range names {
			s.Backends = append(s.Backends, service.Backend{Addr: c.backendAddr(n, v6), Port: BackendPort})
		}
		require.NoError(t, c.mgr.Upsert(s), "program %s", s.Frontend)
	}
}

func TestClusterIPEndToEnd(t *testing.T) {
	for _, mode := range []attach.Mode{attach.TCX, attach.TC} {
		t.Run(string(mode), func(t *testing.T) {
			c := newCluster(t, mode)
			for _, f := range Families {
				t.Run(f.Name, func(t *testing.T) { c.exercise(t, f) })
			}
		})
	}
}

func (c *cluster) exercise(t *testing.T, f Family) {
	tcpVIP := netip.AddrPortFrom(f.VIP, e2eTCPPort)
	udpVIP := netip.AddrPortFrom(f.VIP, e2eUDPPort)
	c.program(t, f, backendNames...)

	const n = 300
	tally, err := traffic.Run(n, func(i int) (traffic.Reply, error) {
		return traffic.TCPExchange(c.client, tcpVIP, []byte(fmt.Sprintf("tcp %d", i)), timeout)
	})
	require.NoError(t, err, "TCP exchanges through %s", tcpVIP)
	counts := tally.Counts(backendNames...)
	stat, df := stats.ChiSquareUniform(counts)
	assert.Less(t, stat, stats.ChiSquareCritical(df, stats.SpreadAlpha), "TCP connections %v spread uniformly over the backends", counts)

	tally, err = traffic.Run(n, func(i int) (traffic.Reply, error) {
		r, err := traffic.UDPExchange(c.client, udpVIP, []byte(fmt.Sprintf("udp %d", i)), timeout)
		if err == nil && r.Peer != udpVIP {
			err = fmt.Errorf("UDP reply came from %s, not the VIP %s", r.Peer, udpVIP)
		}
		return r, err
	})
	require.NoError(t, err, "UDP exchanges through %s, every reply from the VIP", udpVIP)
	counts = tally.Counts(backendNames...)
	stat, df = stats.ChiSquareUniform(counts)
	assert.Less(t, stat, stats.ChiSquareCritical(df, stats.SpreadAlpha), "UDP flows %v spread uniformly over the backends", counts)

	// A removed backend gets no new connections.
	c.program(t, f, backendNames[:2]...)
	removed := c.servers[backendNames[2]]
	before := removed.TCPServed() + removed.UDPServed()
	tally, err = traffic.Run(100, func(i int) (traffic.Reply, error) {
		if i%2 == 0 {
			return traffic.TCPExchange(c.client, tcpVIP, []byte("after removal"), timeout)
		}
		return traffic.UDPExchange(c.client, udpVIP, []byte("after removal"), timeout)
	})
	require.NoError(t, err, "exchanges after removing %s", backendNames[2])
	assert.Zero(t, tally[backendNames[2]], "removed backend answered nothing: %v", tally)
	assert.Equal(t, before, removed.TCPServed()+removed.UDPServed(), "removed backend served no request")
	assert.Positive(t, tally[backendNames[0]], "remaining backend 1 still serves: %v", tally)
	assert.Positive(t, tally[backendNames[1]], "remaining backend 2 still serves: %v", tally)

	// No ready backends: refused the way kube-proxy refuses.
	c.program(t, f)
	_, err = traffic.TCPExchange(c.client, tcpVIP, []byte("nobody"), timeout)
	assert.ErrorIs(t, err, syscall.ECONNREFUSED, "TCP to a service without backends is refused")
	_, err = traffic.ConnectedUDPExchange(c.client, udpVIP, []byte("nobody"), timeout)
	assert.ErrorIs(t, err, syscall.ECONNREFUSED, "connected UDP to a service without backends sees port unreachable")

	// A direct pod-to-pod flow is never rewritten.
	direct := netip.AddrPortFrom(c.backendAddr(backendNames[0], f.VIP.Is6()), BackendPort)
	r, err := traffic.UDPExchange(c.client, direct, []byte("direct"), timeout)
	require.NoError(t, err, "direct UDP to %s", direct)
	assert.Equal(t, direct, r.Peer, "direct reply keeps the pod's own source")
}
