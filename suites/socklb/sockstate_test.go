package socklb

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/cluster"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
)

// sockStates are the places the hooks can keep a socket's reverse
// translation (loader.SockState); the tests that read it back, through
// recvmsg, getpeername or socket destroy, run in each.
var sockStates = []loader.SockState{loader.SockStateMap, loader.SockStateStorage}

// forEachSockState runs fn in a subtest per mode, with opts loading that
// mode. Storage mode skips, naming what is missing, on kernels without
// socket storage for cgroup sock_addr programs.
func forEachSockState(t *testing.T, opts cluster.Options, fn func(t *testing.T, mode loader.SockState, opts cluster.Options)) {
	for _, mode := range sockStates {
		t.Run(string(mode), func(t *testing.T) {
			requireSockState(t, mode)
			o := opts
			o.Config = func(cfg *loader.Config) {
				if opts.Config != nil {
					opts.Config(cfg)
				}
				cfg.SockState = mode
			}
			fn(t, mode, o)
		})
	}
}

// eachKind runs fn on every pod device kind in map mode, the default, and
// on veth alone in storage mode: the socket hooks never see the pod's
// device, so more kinds would only add time (vmtest runs them under TCG).
func eachKind(t *testing.T, mode loader.SockState, o cluster.Options, fn func(t *testing.T, c *cluster.Cluster)) {
	if mode == loader.SockStateMap {
		cluster.ForEachKind(t, o, fn)
		return
	}
	t.Run(string(topology.Veth), func(t *testing.T) { fn(t, cluster.New(t, o)) })
}

// requireSockState skips t, naming what is missing, where the kernel
// cannot run mode.
func requireSockState(t *testing.T, mode loader.SockState) {
	t.Helper()
	if mode == loader.SockStateStorage {
		testenv.RequireRoot(t)
		testenv.RequireFeature(t, "socket storage in cgroup sock_addr programs", loader.SockStateMinKernel, loader.ProbeSockStorage())
	}
}

// reload loads the datapath again over c's pinned maps in mode and swaps
// the cgroup hooks for the new programs, as `servicepath load
// --sock-state` does on a running node.
func reload(t *testing.T, c *cluster.Cluster, mode loader.SockState) {
	t.Helper()
	cfg := loader.DefaultConfig()
	cfg.PinPath = c.DP.PinnedAt
	cfg.SockState = mode
	var dp *loader.Datapath
	err := c.Topo.Node.Do(func() error {
		var err error
		dp, err = loader.Load(cfg)
		return err
	})
	require.NoError(t, err, "reload the datapath in %s mode", mode)
	t.Cleanup(func() { dp.Close() })
	a := &attach.Attacher{LinkDir: filepath.Join(cfg.PinPath, "links")}
	for _, h := range dp.SockHooks {
		require.NoError(t, a.AttachCgroup(h.Prog, c.Cgroup, h.Name, h.Attach), "replace %s", h.Name)
	}
}

// assertStateIn checks that the reverse translations are where mode keeps
// them: entries in sp_sock_revnat in map mode, none in storage mode.
func assertStateIn(t *testing.T, c *cluster.Cluster, mode loader.SockState) {
	t.Helper()
	n := 0
	var k, v []byte
	iter := c.DP.Maps.SockRevNAT.Iterate()
	for iter.Next(&k, &v) {
		n++
	}
	require.NoError(t, iter.Err(), "walk sp_sock_revnat")
	if mode == loader.SockStateStorage {
		assert.Zero(t, n, "storage mode writes nothing to sp_sock_revnat")
	} else {
		assert.Positive(t, n, "map mode keeps the reverse translations in sp_sock_revnat")
	}
}

// One unconnected socket with datagrams in flight to two services before
// it reads any reply: each destination keeps one backend for the socket
// (QUIC and DTLS need their datagrams to reach one peer), and every reply
// reads as the destination it answers. The services have disjoint
// backends so that the replies can only be told apart by their source.
func TestUnconnectedUDPKeepsOneBackendPerDestination(t *testing.T) {
	forEachSockState(t, cluster.Options{SocketLB: true}, func(t *testing.T, mode loader.SockState, o cluster.Options) {
		c := cluster.New(t, o)
		for _, vip := range []netip.Addr{vip4, vip6} {
			t.Run(vip.String(), func(t *testing.T) {
				balanced := netip.AddrPortFrom(vip, 53)
				single := netip.AddrPortFrom(vip, 54)
				c.Program(t, vip, balanced.Port(), service.UDP, cluster.Backends[:2]...)
				c.Program(t, vip, single.Port(), service.UDP, cluster.Backends[2])
				// Balanced one by one, 15 datagrams would all land on
				// one of two backends with chance 2^-14.
				const n = 15
				replies, err := burst(c, []netip.AddrPort{balanced, single}, n)
				require.NoError(t, err, "%d datagrams in flight to each of %s and %s", n, balanced, single)
				by := map[netip.AddrPort]map[string]int{}
				for _, r := range replies {
					if by[r.from] == nil {
						by[r.from] = map[string]int{}
					}
					by[r.from][r.backend]++
				}
				assert.Equal(t, map[string]int{cluster.Backends[2]: n}, by[single], "%s's replies", single)
				assert.Len(t, by[balanced], 1, "one backend answers all of the socket's datagrams to %s: %v", balanced, by[balanced])
				for b, got := range by[balanced] {
					assert.Equal(t, n, got, "%s answered every datagram to %s", b, balanced)
				}
				assert.Len(t, by, 2, "every reply reads as one of the two destinations: %v", by)
			})
		}
		assertStateIn(t, c, mode)
	})
}

type reply struct {
	from    netip.AddrPort
	backend string
}

// burst sends n datagrams to each of dsts, in turn, from one unconnected
// socket in the client pod, then reads every reply.
func burst(c *cluster.Cluster, dsts []netip.AddrPort, n int) ([]reply, error) {
	var replies []reply
	err := c.Client.Do(func() error {
		network := "udp6"
		if dsts[0].Addr().Is4() {
			network = "udp4"
		}
		conn, err := net.ListenUDP(network, nil)
		if err != nil {
			return err
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(timeout))
		for i := range n {
			for _, dst := range dsts {
				if _, err := conn.WriteToUDPAddrPort(fmt.Appendf(nil, "q%d", i), dst); err != nil {
					return err
				}
			}
		}
		buf := make([]byte, 1024)
		for range n * len(dsts) {
			m, from, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				return fmt.Errorf("after %d replies: %w", len(replies), err)
			}
			id, _, _ := bytes.Cut(buf[:m], []byte{'\n'})
			replies = append(replies, reply{netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), string(id)})
		}
		return nil
	})
	return replies, err
}

// Storage asked for where the kernel lacks it fails the load, naming the
// missing feature; it never falls back quietly.
func TestStorageModeNeedsTheKernelFeature(t *testing.T) {
	testenv.RequireRoot(t)
	err := loader.ProbeSockStorage()
	if err == nil {
		t.Skip("this kernel has socket storage for cgroup sock_addr programs; nothing to refuse")
	}
	require.True(t, errors.Is(err, ebpf.ErrNotSupported), "a missing feature is reported as ErrNotSupported: %v", err)
	cfg := loader.DefaultConfig()
	cfg.SockState = loader.SockStateStorage
	_, lerr := loader.Load(cfg)
	assert.ErrorContains(t, lerr, "bpf_sk_storage_get", "the refusal names the missing helper")
}
