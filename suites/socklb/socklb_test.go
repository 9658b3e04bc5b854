package socklb

import (
	"fmt"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/ct"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/cluster"
	"github.com/servicepath/servicepath/harness/stats"
	"github.com/servicepath/servicepath/harness/traffic"
)

const timeout = 3 * time.Second

var (
	vip4 = netip.MustParseAddr("198.19.0.20")
	vip6 = netip.MustParseAddr("fd00:5f::20")
)

// Socket hooks only: nothing rewrites packets, so every success below is
// the socket layer's doing.
func TestSocketLB(t *testing.T) {
	forEachSockState(t, cluster.Options{SocketLB: true}, func(t *testing.T, mode loader.SockState, o cluster.Options) {
		eachKind(t, mode, o, func(t *testing.T, c *cluster.Cluster) {
			for _, vip := range []netip.Addr{vip4, vip6} {
				c.Program(t, vip, 80, service.TCP, cluster.Backends...)
				c.Program(t, vip, 53, service.UDP, cluster.Backends...)
			}
			for _, vip := range []netip.Addr{vip4, vip6} {
				t.Run(vip.String(), func(t *testing.T) {
					tcp := netip.AddrPortFrom(vip, 80)
					udp := netip.AddrPortFrom(vip, 53)
					spread := func(what string, fn func(i int) (traffic.Reply, error)) {
						// Fewer under -short (vmtest's TCG guests run every kind);
						// the chi-square bound keeps its error rate at any count.
						n := 300
						if testing.Short() {
							n = 60
						}
						tally, err := traffic.Run(n, fn)
						require.NoError(t, err, "%s exchanges", what)
						counts := tally.Counts(cluster.Backends...)
						stat, df := stats.ChiSquareUniform(counts)
						assert.Less(t, stat, stats.ChiSquareCritical(df, stats.SpreadAlpha), "%s spread %v is uniform", what, counts)
					}
					spread("TCP", func(i int) (traffic.Reply, error) {
						r, err := traffic.TCPExchange(c.Client, tcp, []byte("tcp"), timeout)
						if err == nil && r.Peer != tcp {
							err = fmt.Errorf("getpeername says %s, not the VIP", r.Peer)
						}
						return r, err
					})
					spread("connected UDP", func(i int) (traffic.Reply, error) {
						r, err := traffic.ConnectedUDPExchange(c.Client, udp, []byte("cudp"), timeout)
						if err == nil && r.Peer != udp {
							err = fmt.Errorf("getpeername says %s, not the VIP", r.Peer)
						}
						return r, err
					})
					spread("unconnected UDP", func(i int) (traffic.Reply, error) {
						r, err := traffic.UDPExchange(c.Client, udp, []byte("udp"), timeout)
						if err == nil && r.Peer != udp {
							err = fmt.Errorf("reply source %s, not the VIP", r.Peer)
						}
						return r, err
					})

					direct := netip.AddrPortFrom(c.Addr(cluster.Backends[0], vip), cluster.BackendPort)
					r, err := traffic.UDPExchange(c.Client, direct, []byte("direct"), timeout)
					require.NoError(t, err, "UDP straight to a pod")
					assert.Equal(t, direct, r.Peer, "a reply straight from a pod is never rewritten")

					// From the node itself ("the host") too, with no per-netns setup.
					r, err = traffic.TCPExchange(c.Topo.Node, tcp, []byte("host"), timeout)
					require.NoError(t, err, "TCP from the host netns")
					assert.Equal(t, tcp, r.Peer, "host sees the VIP as its peer")
				})
			}

			entries, err := ct.Dump(c.DP.Maps.CT)
			require.NoError(t, err, "dump conntrack")
			assert.Empty(t, entries, "socket-level load balancing needs no per-packet conntrack")
			got := c.Counters(t)
			assert.Positive(t, got["sock_xlate"], "translations counted")
			assert.Positive(t, got["sock_rev_xlate"], "reverse translations counted")
			assert.Zero(t, got["lb_new"], "the per-packet path did nothing")
			assertStateIn(t, c, mode)
		})
	})
}

// A dual-stack IPv6 socket reaching an IPv4 service through its
// v4-mapped address, and getpeername answering in the same form.
func TestSocketLBV4MappedOnDualStackSocket(t *testing.T) {
	forEachSockState(t, cluster.Options{SocketLB: true}, func(t *testing.T, mode loader.SockState, o cluster.Options) {
		eachKind(t, mode, o, func(t *testing.T, c *cluster.Cluster) {
			c.Program(t, vip4, 80, service.TCP, cluster.Backends...)
			mapped := netip.AddrFrom16(vip4.As16())

			var peer netip.AddrPort
			var reply string
			require.NoError(t, c.Client.Do(func() error {
				fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
				if err != nil {
					return err
				}
				defer unix.Close(fd)
				if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err != nil {
					return err
				}
				tv := unix.NsecToTimeval(timeout.Nanoseconds())
				if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
					return err
				}
				if err := unix.Connect(fd, &unix.SockaddrInet6{Port: 80, Addr: mapped.As16()}); err != nil {
					return fmt.Errorf("connect to %s: %w", mapped, err)
				}
				sa, err := unix.Getpeername(fd)
				if err != nil {
					return err
				}
				in6 := sa.(*unix.SockaddrInet6)
				peer = netip.AddrPortFrom(netip.AddrFrom16(in6.Addr), uint16(in6.Port))
				if _, err := unix.Write(fd, []byte("mapped")); err != nil {
					return err
				}
				buf := make([]byte, 256)
				n, err := unix.Read(fd, buf)
				if err != nil {
					return err
				}
				reply = string(buf[:n])
				return nil
			}), "exchange over a dual-stack socket")
			assert.Equal(t, netip.AddrPortFrom(mapped, 80), peer, "getpeername reports the v4-mapped VIP")
			assert.Regexp(t, `^backend-\d\n`, reply, "a backend answered")
			assertStateIn(t, c, mode)
		})
	})
}

// Services without ready backends are refused at connect, as kube-proxy's
// reject would; a removed backend gets no new connections.
func TestSocketLBRefusesAndForgetsRemovedBackends(t *testing.T) {
	cluster.ForEachKind(t, cluster.Options{SocketLB: true}, func(t *testing.T, c *cluster.Cluster) {
		tcp := netip.AddrPortFrom(vip4, 80)
		c.Program(t, vip4, 80, service.TCP)
		c.Program(t, vip4, 53, service.UDP)
		_, err := traffic.TCPExchange(c.Client, tcp, []byte("nobody"), timeout)
		assert.ErrorIs(t, err, cluster.RefusalErrno(t, syscall.ECONNREFUSED), "connect to a service without backends is refused")
		_, err = traffic.UDPExchange(c.Client, netip.AddrPortFrom(vip4, 53), []byte("nobody"), timeout)
		assert.ErrorIs(t, err, cluster.RefusalErrno(t, syscall.ECONNREFUSED), "UDP to a service without backends is refused at sendmsg")

		c.Program(t, vip4, 80, service.TCP, cluster.Backends[:2]...)
		tally, err := traffic.Run(100, func(int) (traffic.Reply, error) {
			return traffic.TCPExchange(c.Client, tcp, []byte("after"), timeout)
		})
		require.NoError(t, err, "exchanges after removing a backend")
		assert.Zero(t, tally[cluster.Backends[2]], "removed backend gets nothing: %v", tally)
		assert.Equal(t, uint64(2), c.Counters(t)["sock_no_backend"], "TCP and UDP refusals counted")
	})
}

// With only terminating backends, connects fall back to them (kube-proxy's
// serving-terminating fallback); one ready again takes every new one.
func TestSocketLBFallsBackToTerminatingBackends(t *testing.T) {
	cluster.ForEachKind(t, cluster.Options{SocketLB: true}, func(t *testing.T, c *cluster.Cluster) {
		tcp := netip.AddrPortFrom(vip4, 80)
		exchange := func(int) (traffic.Reply, error) {
			return traffic.TCPExchange(c.Client, tcp, []byte("terminating"), timeout)
		}
		a, b := cluster.Backends[0], cluster.Backends[1]
		c.ProgramBackends(t, vip4, 80, service.TCP, c.Backend(a, vip4, service.Terminating), c.Backend(b, vip4, service.Terminating))
		tally, err := traffic.Run(60, exchange)
		require.NoError(t, err, "connects with only terminating backends")
		assert.Positive(t, tally[a], "terminating %s serves while none is ready: %v", a, tally)
		assert.Positive(t, tally[b], "terminating %s serves while none is ready: %v", b, tally)

		c.ProgramBackends(t, vip4, 80, service.TCP, c.Backend(a, vip4, service.Terminating), c.Backend(b, vip4, service.Active))
		tally, err = traffic.Run(30, exchange)
		require.NoError(t, err, "connects with %s ready again", b)
		assert.Equal(t, 30, tally[b], "the ready backend takes every new connect: %v", tally)
		assert.Zero(t, c.Counters(t)["sock_no_backend"], "nothing refused")
	})
}

// With socket-LB limited to the host netns, the host is translated at the
// socket while pods fall through to the per-packet path.
func TestSocketLBHostNetnsOnly(t *testing.T) {
	cluster.RequireNetnsCookie(t)
	cluster.ForEachKind(t, cluster.Options{SocketLB: true, PerPacket: true, Mode: attach.Auto,
		Config: func(cfg *loader.Config) { cfg.SockLBHostOnly = true }}, func(t *testing.T, c *cluster.Cluster) {
		tcp := netip.AddrPortFrom(vip4, 80)
		c.Program(t, vip4, 80, service.TCP, cluster.Backends...)

		r, err := traffic.TCPExchange(c.Client, tcp, []byte("pod"), timeout)
		require.NoError(t, err, "pod reaches the service through the per-packet path")
		assert.Equal(t, tcp, r.Peer, "pod's peer is the VIP")
		got := c.Counters(t)
		assert.Equal(t, uint64(1), got["sock_other_netns"], "the pod's connect was left to the per-packet path")
		assert.Equal(t, uint64(1), got["lb_new"], "and the per-packet path load-balanced it")
		assert.Zero(t, got["sock_xlate"], "no socket translation for the pod")

		r, err = traffic.TCPExchange(c.Topo.Node, tcp, []byte("host"), timeout)
		require.NoError(t, err, "host reaches the service")
		assert.Equal(t, tcp, r.Peer, "host's peer is the VIP")
		assert.Equal(t, uint64(1), c.Counters(t)["sock_xlate"], "the host was translated at the socket")
	})
}

func TestSocketLBSessionAffinity(t *testing.T) {
	cluster.ForEachKind(t, cluster.Options{SocketLB: true}, func(t *testing.T, c *cluster.Cluster) {
		for _, vip := range []netip.Addr{vip4, vip6} {
			t.Run(vip.String(), func(t *testing.T) { c.ExerciseAffinity(t, vip) })
		}
	})
}

// Traffic policies at the socket: the client pod reaches every backend of
// an externalTrafficPolicy Local LoadBalancer IP without local backends;
// connect to an internalTrafficPolicy Local cluster IP without local
// backends is refused: a socket hook cannot drop a packet as kube-proxy
// does, and failing at once beats a client's timeout.
func TestSocketLBTrafficPolicies(t *testing.T) {
	c := cluster.New(t, cluster.Options{SocketLB: true})
	for _, vip := range []netip.Addr{vip4, vip6} {
		t.Run(vip.String(), func(t *testing.T) {
			err := c.ExerciseTrafficPolicies(t, vip, 30)
			assert.ErrorIs(t, err, cluster.RefusalErrno(t, syscall.ECONNREFUSED), "the internalTrafficPolicy Local connect is refused")
		})
	}
	got := c.Counters(t)
	assert.Zero(t, got["lb_new"], "the per-packet path did nothing (counters %v)", got)
}

// A pod connecting to its own service through the socket hooks: connect
// writes its own address in, and the kernel loops the flow back inside
// the pod, so no packet needs translating.
func TestSocketLBHairpin(t *testing.T) {
	c := cluster.New(t, cluster.Options{SocketLB: true})
	for _, vip := range []netip.Addr{vip4, vip6} {
		t.Run(vip.String(), func(t *testing.T) {
			c.ExerciseHairpin(t, vip, 60)
			assert.True(t, c.Servers[cluster.Backends[0]].SawPeer(c.Addr(cluster.Backends[0], vip)), "the pod saw itself as its peer")
		})
	}
	entries, err := ct.Dump(c.DP.Maps.CT)
	require.NoError(t, err, "dump conntrack")
	assert.Empty(t, entries, "no per-packet conntrack")
	got := c.Counters(t)
	assert.Zero(t, got["lb_new"]+got["hairpin"], "the per-packet path did nothing (counters %v)", got)
}
