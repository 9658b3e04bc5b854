package socklb

import (
	"net"
	"net/netip"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/nodeaddrs"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/cluster"
	"github.com/servicepath/servicepath/harness/topology"
	"github.com/servicepath/servicepath/harness/traffic"
)

func program(t *testing.T, c *cluster.Cluster, fe service.Frontend) {
	s := service.Service{Name: "default/np", PortName: fe.String(), Frontend: fe}
	like := fe.Addr
	for _, n := range cluster.Backends {
		s.Backends = append(s.Backends, service.Backend{Addr: c.Addr(n, like), Port: cluster.BackendPort})
	}
	require.NoError(t, c.Services.Upsert(s), "program %s", fe)
}

func nodePort(addr string, port uint16, proto service.Protocol) service.Frontend {
	return service.Frontend{Addr: netip.MustParseAddr(addr), Port: port, Protocol: proto, Kind: service.NodePort}
}

// NodePort through the socket hooks: at loopback from the host, and at a
// node address from the host and from pods. A pod's own loopback is its
// own, never the node's.
func TestNodePortThroughSocketHooks(t *testing.T) {
	cluster.RequireNetnsCookie(t)
	forEachSockState(t, cluster.Options{SocketLB: true}, func(t *testing.T, mode loader.SockState, o cluster.Options) {
		eachKind(t, mode, o, func(t *testing.T, c *cluster.Cluster) {
			program(t, c, nodePort("0.0.0.0", 30080, service.TCP))
			program(t, c, nodePort("::", 30080, service.TCP))
			nodeAddr := netip.AddrPortFrom(topology.GatewayIPv4, 30080)

			for _, tc := range []struct {
				name string
				from traffic.Doer
				dst  netip.AddrPort
			}{
				{"host via 127.0.0.1", c.Topo.Node, netip.MustParseAddrPort("127.0.0.1:30080")},
				{"host via ::1", c.Topo.Node, netip.MustParseAddrPort("[::1]:30080")},
				{"host via a node address", c.Topo.Node, nodeAddr},
				{"pod via a node address", c.Client, nodeAddr},
			} {
				t.Run(tc.name, func(t *testing.T) {
					r, err := traffic.TCPExchange(tc.from, tc.dst, []byte("np"), timeout)
					require.NoError(t, err, "reach the NodePort at %s", tc.dst)
					assert.Contains(t, cluster.Backends, r.Identity, "a backend answered")
					assert.Equal(t, tc.dst, r.Peer, "the peer is what the client dialled")
				})
			}
			_, err := traffic.TCPExchange(c.Client, netip.MustParseAddrPort("127.0.0.1:30080"), []byte("np"), timeout)
			assert.ErrorIs(t, err, syscall.ECONNREFUSED, "a pod's loopback is its own: not translated, nothing listens")
			assertStateIn(t, c, mode)
		})
	})
}

// The host may not bind a NodePort's port on a node address, loopback or
// the wildcard; other ports, and pods, may.
func TestNodePortPortsReservedOnTheHost(t *testing.T) {
	cluster.RequireNetnsCookie(t)
	cluster.ForEachKind(t, cluster.Options{SocketLB: true}, func(t *testing.T, c *cluster.Cluster) {
		program(t, c, nodePort("0.0.0.0", 30081, service.TCP))
		program(t, c, nodePort("0.0.0.0", 30082, service.UDP))

		bind := func(in traffic.Doer, network, addr string) error {
			return in.Do(func() error {
				if network == "udp" {
					pc, err := net.ListenPacket(network, addr)
					if err == nil {
						pc.Close()
					}
					return err
				}
				l, err := net.Listen(network, addr)
				if err == nil {
					l.Close()
				}
				return err
			})
		}
		inUse := cluster.RefusalErrno(t, syscall.EADDRINUSE)
		for _, addr := range []string{"0.0.0.0:30081", "127.0.0.1:30081", topology.GatewayIPv4.String() + ":30081", "[::]:30081"} {
			assert.ErrorIs(t, bind(c.Topo.Node, "tcp", addr), inUse, "host bind to %s is refused", addr)
		}
		assert.ErrorIs(t, bind(c.Topo.Node, "udp", "0.0.0.0:30082"), inUse, "host UDP bind to the NodePort is refused")
		assert.NoError(t, bind(c.Topo.Node, "tcp", "0.0.0.0:30083"), "another port is free")
		assert.NoError(t, bind(c.Topo.Node, "udp", "0.0.0.0:30081"), "the TCP NodePort's number is free for UDP")
		assert.NoError(t, bind(c.Client, "tcp", "0.0.0.0:30081"), "a pod has ports of its own")
		// Go's Listen may try more than one socket per call.
		assert.GreaterOrEqual(t, c.Counters(t)["sock_bind_refused"], uint64(5), "every refusal counted")
	})
}

// Kubernetes routes the host's traffic to an ExternalIP that is not local
// instead of translating it; pods, and local ExternalIPs, are translated.
func TestExternalIPFromTheHost(t *testing.T) {
	cluster.RequireNetnsCookie(t)
	cluster.ForEachKind(t, cluster.Options{SocketLB: true}, func(t *testing.T, c *cluster.Cluster) {
		remote := netip.MustParseAddr("203.0.113.10")
		local := netip.MustParseAddr("203.0.113.20")
		for _, ip := range []netip.Addr{remote, local} {
			program(t, c, service.Frontend{Addr: ip, Port: 80, Protocol: service.TCP, Kind: service.ExternalIP})
		}
		require.NoError(t, c.Topo.Node.Do(func() error {
			lo, err := netlink.LinkByName("lo")
			if err != nil {
				return err
			}
			if err := netlink.AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: local.AsSlice(), Mask: net.CIDRMask(32, 32)}}); err != nil {
				return err
			}
			return nodeaddrs.SyncLocal(c.DP.Maps.NodeAddrs)
		}), "give the node a local ExternalIP")

		r, err := traffic.TCPExchange(c.Client, netip.AddrPortFrom(remote, 80), []byte("pod"), timeout)
		require.NoError(t, err, "a pod reaches the remote ExternalIP")
		assert.Contains(t, cluster.Backends, r.Identity, "through a backend")

		before := c.Counters(t)["sock_xlate"]
		_, err = traffic.TCPExchange(c.Topo.Node, netip.AddrPortFrom(remote, 80), []byte("host"), timeout)
		assert.Error(t, err, "the host's connect to a remote ExternalIP is routed as is (the node has no route)")
		assert.Equal(t, before, c.Counters(t)["sock_xlate"], "and not translated")

		r, err = traffic.TCPExchange(c.Topo.Node, netip.AddrPortFrom(local, 80), []byte("host"), timeout)
		require.NoError(t, err, "the host reaches a local ExternalIP")
		assert.Contains(t, cluster.Backends, r.Identity, "through a backend")
	})
}
