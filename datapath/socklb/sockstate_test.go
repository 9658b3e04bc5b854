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

// One unconnected socket with several datagrams in flight to a service
// of three backends before it reads any reply: every reply, whichever
// backend sent it, reads as the VIP's. This is what a resolver sending A
// and AAAA queries at once needs; in storage mode it is the socket's
// send flows (one per backend) that make it work.
func TestUnconnectedUDPRepliesInFlight(t *testing.T) {
	forEachSockState(t, cluster.Options{SocketLB: true}, func(t *testing.T, mode loader.SockState, o cluster.Options) {
		c := cluster.New(t, o)
		for _, vip := range []netip.Addr{vip4, vip6} {
			t.Run(vip.String(), func(t *testing.T) {
				c.Program(t, vip, 53, service.UDP, cluster.Backends...)
				dst := netip.AddrPortFrom(vip, 53)
				// With 12 sends the chance that all go to one backend is 3^-11.
				const n = 12
				froms, ids, err := burst(c, dst, n)
				require.NoError(t, err, "%d datagrams in flight to %s", n, dst)
				for i, from := range froms {
					assert.Equal(t, dst, from, "reply %d (from %s) reads as the VIP's", i, ids[i])
				}
				distinct := map[string]bool{}
				for _, id := range ids {
					distinct[id] = true
				}
				assert.Greater(t, len(distinct), 1, "replies from several backends were in flight at once: %v", ids)
			})
		}
		assertStateIn(t, c, mode)
	})
}

// burst sends n datagrams from one unconnected socket in the client pod,
// then reads the n replies, returning each reply's source and sender.
func burst(c *cluster.Cluster, dst netip.AddrPort, n int) ([]netip.AddrPort, []string, error) {
	var froms []netip.AddrPort
	var ids []string
	err := c.Client.Do(func() error {
		network := "udp6"
		if dst.Addr().Is4() {
			network = "udp4"
		}
		conn, err := net.ListenUDP(network, nil)
		if err != nil {
			return err
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(timeout))
		for i := range n {
			if _, err := conn.WriteToUDPAddrPort(fmt.Appendf(nil, "q%d", i), dst); err != nil {
				return err
			}
		}
		buf := make([]byte, 1024)
		for range n {
			m, from, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				return fmt.Errorf("after %d replies: %w", len(froms), err)
			}
			id, _, _ := bytes.Cut(buf[:m], []byte{'\n'})
			froms = append(froms, netip.AddrPortFrom(from.Addr().Unmap(), from.Port()))
			ids = append(ids, string(id))
		}
		return nil
	})
	return froms, ids, err
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
