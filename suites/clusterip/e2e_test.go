package clusterip

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/cluster"
	"github.com/servicepath/servicepath/harness/stats"
	"github.com/servicepath/servicepath/harness/traffic"
)

const (
	e2eTCPPort = 80
	e2eUDPPort = 53
	timeout    = 3 * time.Second
)

var backendNames = cluster.Backends

func TestClusterIPEndToEnd(t *testing.T) {
	for _, mode := range []attach.Mode{attach.TCX, attach.TC} {
		t.Run(string(mode), func(t *testing.T) {
			c := cluster.New(t, cluster.Options{PerPacket: true, Mode: mode})
			for _, f := range Families {
				t.Run(f.Name, func(t *testing.T) { exercise(t, c, f) })
			}
		})
	}
}

// The same story on every device kind the kernel has, with upper-stack
// and BPF host routing, and with backends on another node.
func TestClusterIPEndToEndByKind(t *testing.T) {
	for _, opts := range cluster.RoutingMatrix(attach.Auto) {
		t.Run(opts.String(), func(t *testing.T) {
			c := cluster.New(t, opts)
			for _, f := range Families {
				t.Run(f.Name, func(t *testing.T) { exercise(t, c, f) })
			}
			checkRouting(t, c, opts)
		})
	}
}

// checkRouting asserts the counters say which way packets were routed.
func checkRouting(t *testing.T, c *cluster.Cluster, opts cluster.Options) {
	got := c.Counters(t)
	routed := got["redirect_peer"] + got["redirect_local"] + got["redirect_neigh"]
	hostSide := c.Client.Hook().HostSide
	if c.DP.HostRouting != loader.HostRoutingBPF || !hostSide {
		assert.Zero(t, routed, "no BPF host routing with %s routing on a %s pod (counters %v)", c.DP.HostRouting, c.Client.Kind, got)
		return
	}
	if opts.RemoteBackends {
		assert.Positive(t, got["redirect_neigh"], "requests to the other node were routed by bpf_fib_lookup + bpf_redirect_neigh")
	}
	if c.Client.Hook().FromPod == attach.TCIngress {
		assert.Positive(t, got["redirect_peer"], "local deliveries used bpf_redirect_peer")
	} else {
		assert.Positive(t, got["redirect_local"], "local deliveries from netkit used bpf_redirect")
	}
}

// program points the family's VIP (TCP and UDP) at the named backends.
func program(t *testing.T, c *cluster.Cluster, f Family, names ...string) {
	c.Program(t, f.VIP, e2eTCPPort, service.TCP, names...)
	c.Program(t, f.VIP, e2eUDPPort, service.UDP, names...)
}

func exercise(t *testing.T, c *cluster.Cluster, f Family) {
	tcpVIP := netip.AddrPortFrom(f.VIP, e2eTCPPort)
	udpVIP := netip.AddrPortFrom(f.VIP, e2eUDPPort)
	program(t, c, f, backendNames...)

	// -short (vmtest's TCG guests, where the kind matrix is slow) runs
	// fewer exchanges: the chi-square bound holds its error rate at any n.
	n, after := 300, 100
	if testing.Short() {
		n, after = 60, 30
	}
	tally, err := traffic.Run(n, func(i int) (traffic.Reply, error) {
		return traffic.TCPExchange(c.Client, tcpVIP, []byte(fmt.Sprintf("tcp %d", i)), timeout)
	})
	require.NoError(t, err, "TCP exchanges through %s", tcpVIP)
	counts := tally.Counts(backendNames...)
	stat, df := stats.ChiSquareUniform(counts)
	assert.Less(t, stat, stats.ChiSquareCritical(df, stats.SpreadAlpha), "TCP connections %v spread uniformly over the backends", counts)

	tally, err = traffic.Run(n, func(i int) (traffic.Reply, error) {
		r, err := traffic.UDPExchange(c.Client, udpVIP, []byte(fmt.Sprintf("udp %d", i)), timeout)
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
	program(t, c, f, backendNames[:2]...)
	tally, err = traffic.Run(after, func(i int) (traffic.Reply, error) {
		if i%2 == 0 {
			return traffic.TCPExchange(c.Client, tcpVIP, []byte("after removal"), timeout)
		}
		return traffic.UDPExchange(c.Client, udpVIP, []byte("after removal"), timeout)
	})
	require.NoError(t, err, "exchanges after removing %s", backendNames[2])
	assert.Zero(t, tally[backendNames[2]], "removed backend answered nothing: %v", tally)
	assert.Positive(t, tally[backendNames[0]], "remaining backend 1 still serves: %v", tally)
	assert.Positive(t, tally[backendNames[1]], "remaining backend 2 still serves: %v", tally)

	// Only terminating backends: new flows fall back to them, as
	// kube-proxy's do; one ready again takes every new connection (TCP
	// only: a UDP exchange reusing an earlier flow's port keeps its
	// terminating backend, as it should).
	programStates := func(ready ...string) {
		var bs []service.Backend
		for _, n := range backendNames[:2] {
			state := service.Terminating
			if slices.Contains(ready, n) {
				state = service.Active
			}
			bs = append(bs, c.Backend(n, f.VIP, state))
		}
		c.ProgramBackends(t, f.VIP, e2eTCPPort, service.TCP, bs...)
		c.ProgramBackends(t, f.VIP, e2eUDPPort, service.UDP, bs...)
	}
	programStates()
	tally, err = traffic.Run(after, func(i int) (traffic.Reply, error) {
		if i%2 == 0 {
			return traffic.TCPExchange(c.Client, tcpVIP, []byte("terminating"), timeout)
		}
		return traffic.UDPExchange(c.Client, udpVIP, []byte("terminating"), timeout)
	})
	require.NoError(t, err, "exchanges with only terminating backends")
	assert.Positive(t, tally[backendNames[0]], "terminating backend 1 serves while none is ready: %v", tally)
	assert.Positive(t, tally[backendNames[1]], "terminating backend 2 serves while none is ready: %v", tally)
	programStates(backendNames[1])
	tally, err = traffic.Run(after, func(i int) (traffic.Reply, error) {
		return traffic.TCPExchange(c.Client, tcpVIP, []byte("one ready"), timeout)
	})
	require.NoError(t, err, "TCP exchanges with one backend ready again")
	assert.Equal(t, after, tally[backendNames[1]], "the one ready backend takes every new connection: %v", tally)

	// No ready backends: refused the way kube-proxy refuses.
	program(t, c, f)
	_, err = traffic.TCPExchange(c.Client, tcpVIP, []byte("nobody"), timeout)
	assert.ErrorIs(t, err, syscall.ECONNREFUSED, "TCP to a service without backends is refused")
	_, err = traffic.ConnectedUDPExchange(c.Client, udpVIP, []byte("nobody"), timeout)
	assert.ErrorIs(t, err, syscall.ECONNREFUSED, "connected UDP to a service without backends sees port unreachable")

	// A direct pod-to-pod flow is never rewritten.
	direct := netip.AddrPortFrom(c.Addr(backendNames[0], f.VIP), cluster.BackendPort)
	r, err := traffic.UDPExchange(c.Client, direct, []byte("direct"), timeout)
	require.NoError(t, err, "direct UDP to %s", direct)
	assert.Equal(t, direct, r.Peer, "direct reply keeps the pod's own source")
}

func TestClusterIPSessionAffinity(t *testing.T) {
	c := cluster.New(t, cluster.Options{PerPacket: true, Mode: attach.Auto})
	for _, f := range Families {
		t.Run(f.Name, func(t *testing.T) { c.ExerciseAffinity(t, f.VIP) })
	}
}

// A pod reaching its own service on the per-packet path, chosen as the
// backend: answered from the VIP, with either routing. The backend sees
// the hairpin address as its peer, which is what brings its replies back.
func TestClusterIPHairpin(t *testing.T) {
	for _, routing := range []loader.HostRouting{loader.HostRoutingStack, loader.HostRoutingBPF} {
		t.Run(string(routing), func(t *testing.T) {
			c := cluster.New(t, cluster.Options{PerPacket: true, Mode: attach.Auto, HostRouting: routing})
			for _, f := range Families {
				t.Run(f.Name, func(t *testing.T) {
					before := c.Counters(t)["hairpin"]
					self := c.ExerciseHairpin(t, f.VIP, 60)
					// Two packets each way at least: the request and its answer.
					assert.GreaterOrEqual(t, c.Counters(t)["hairpin"]-before, uint64(2*self), "every self-answered exchange went through the hairpin path")
					assert.True(t, c.Servers[cluster.Backends[0]].SawPeer(f.hairpinAddr()), "the pod saw its own requests come from the hairpin address")
					nodePortHairpin(t, c, f)
				})
			}
		})
	}
}

// Traffic policies on the per-packet path, with remote backends: a pod
// reaching an externalTrafficPolicy Local LoadBalancer IP of a node
// without local backends reaches every backend; an internalTrafficPolicy
// Local cluster IP without local backends drops, as kube-proxy's does, so
// the connect times out rather than being refused.
func TestClusterIPTrafficPolicies(t *testing.T) {
	c := cluster.New(t, cluster.Options{PerPacket: true, Mode: attach.Auto, RemoteBackends: true})
	for _, f := range Families {
		t.Run(f.Name, func(t *testing.T) {
			before := c.Counters(t)
			err := c.ExerciseTrafficPolicies(t, f.VIP, 30)
			var netErr net.Error
			assert.True(t, errors.As(err, &netErr) && netErr.Timeout(), "the internalTrafficPolicy Local connect times out: %v", err)
			after := c.Counters(t)
			assert.Positive(t, after["itp_local_drop"]-before["itp_local_drop"], "the SYNs were dropped as such")
			assert.Zero(t, after["etp_local_drop"]-before["etp_local_drop"], "nothing took the outside clients' entry")
		})
	}
}

// nodePortHairpin: the pod reaches a NodePort at its node's address, with
// itself the only backend; the pod device translates it like a ClusterIP.
func nodePortHairpin(t *testing.T, c *cluster.Cluster, f Family) {
	const port = 30080
	self := cluster.Backends[0]
	node, wildcard := c.Topo.Node.GatewayIPv4, netip.IPv4Unspecified()
	if f.VIP.Is6() {
		node, wildcard = c.Topo.Node.IPv6, netip.IPv6Unspecified()
	}
	dst := netip.AddrPortFrom(node, port)
	for _, proto := range []service.Protocol{service.TCP, service.UDP} {
		require.NoError(t, c.Services.Upsert(service.Service{
			Name:     "default/hairpin-nodeport",
			Frontend: service.Frontend{Addr: wildcard, Port: port, Protocol: proto, Kind: service.NodePort},
			Backends: []service.Backend{c.Backend(self, f.VIP, service.Active)},
		}), "program NodePort %d/%s", port, proto)
	}
	before := c.Counters(t)["hairpin"]
	tally, err := traffic.Run(20, func(i int) (traffic.Reply, error) {
		if i%2 == 0 {
			return traffic.TCPExchange(c.Topo.Pod(self), dst, []byte("nodeport tcp"), timeout)
		}
		r, err := traffic.UDPExchange(c.Topo.Pod(self), dst, []byte("nodeport udp"), timeout)
		if err == nil && r.Peer != dst {
			err = fmt.Errorf("UDP reply came from %s, not the NodePort %s", r.Peer, dst)
		}
		return r, err
	})
	require.NoError(t, err, "%s through its own NodePort %s", self, dst)
	assert.Equal(t, 20, tally[self], "%s answered every exchange itself: %v", self, tally)
	assert.GreaterOrEqual(t, c.Counters(t)["hairpin"]-before, uint64(2*20), "every exchange went through the hairpin path")
}

// ICMP errors a pod's own stack sends about translated flows, with real
// sockets: a pod that is its own backend hears its refusal from the VIP;
// a backend hears a client's refusal of its answer, from the hairpin
// address when the client is itself. Either routing.
func TestClusterIPICMPErrors(t *testing.T) {
	const closedPort, answerPort = 9, 9097
	for _, routing := range []loader.HostRouting{loader.HostRoutingStack, loader.HostRoutingBPF} {
		t.Run(string(routing), func(t *testing.T) {
			c := cluster.New(t, cluster.Options{PerPacket: true, Mode: attach.Auto, HostRouting: routing})
			self := cluster.Backends[0]
			pod := c.Topo.Pod(self)
			port := uint16(5300)
			for _, f := range Families {
				network := map[bool]string{true: "udp4", false: "udp6"}[f.VIP.Is4()]
				// serve gives a fresh UDP port of the VIP the one backend
				// self:backendPort.
				serve := func(backendPort uint16) netip.AddrPort {
					port++
					c.ProgramTo(t, f.VIP, port, service.UDP, backendPort, self)
					return netip.AddrPortFrom(f.VIP, port)
				}
				t.Run(f.Name+"/hairpin-refusal-comes-from-the-vip", func(t *testing.T) {
					vip := serve(closedPort)
					r, err := traffic.UDPErrorReport(pod, vip, []byte("anyone?"), timeout)
					require.NoError(t, err, "an ICMP error about the datagram to %s", vip)
					assert.Equal(t, syscall.ECONNREFUSED, r.Errno, "port unreachable")
					assert.Equal(t, f.VIP, r.Offender, "the refusal came from the VIP")
					assert.Equal(t, vip, r.About, "about the datagram to the VIP")
				})
				for _, client := range []struct {
					name string
					pod  traffic.Doer
					peer netip.Addr
				}{
					{"hairpin", pod, f.hairpinAddr()},
					{"other-pod", c.Client, c.Addr("client", f.VIP)},
				} {
					t.Run(f.Name+"/"+client.name+"-backend-hears-the-client-refusal", func(t *testing.T) {
						vip := serve(answerPort)
						resp, err := traffic.Respond(pod, network, answerPort)
						require.NoError(t, err, "serve in %s", self)
						t.Cleanup(func() { resp.Close() })
						before := c.Counters(t)["icmp_to_backend"]
						_, err = traffic.SendAndClose(client.pod, vip, []byte("bye"))
						require.NoError(t, err, "send to %s", vip)
						peer, err := resp.Answer([]byte("too late"), timeout)
						require.NoError(t, err, "%s answers", self)
						assert.Equal(t, client.peer, peer.Addr(), "the backend's peer")
						assert.ErrorIs(t, resp.Refused(timeout), syscall.ECONNREFUSED, "the backend's connected socket heard the client's port unreachable")
						assert.Positive(t, c.Counters(t)["icmp_to_backend"]-before, "the error was sent on to the backend")
					})
				}
			}
		})
	}
}
