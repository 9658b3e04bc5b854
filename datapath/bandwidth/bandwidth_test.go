package bandwidth_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/bandwidth"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
)

// edtMaps creates the two maps as the pod-device object declares them.
func edtMaps(t *testing.T) *maps.Maps {
	testenv.RequireRoot(t)
	spec, err := loader.LoadLxc()
	require.NoError(t, err)
	m := &maps.Maps{}
	for name, dst := range map[string]**ebpf.Map{maps.EDTPodsName: &m.EDTPods, maps.EDTRatesName: &m.EDTRates} {
		ms := spec.Maps[name].Copy()
		ms.Pinning = ebpf.PinNone
		*dst, err = ebpf.NewMap(ms)
		require.NoError(t, err, "create %s", name)
		t.Cleanup(func() { (*dst).Close() })
	}
	return m
}

func content(t *testing.T, m *maps.Maps) (pods map[uint32]uint32, rates map[uint32]maps.EDTRate) {
	pods, rates = map[uint32]uint32{}, map[uint32]maps.EDTRate{}
	var k uint32
	var p maps.EDTPod
	for it := m.EDTPods.Iterate(); it.Next(&k, &p); {
		pods[k] = p.Aggregate
	}
	var r maps.EDTRate
	for it := m.EDTRates.Iterate(); it.Next(&k, &r); {
		rates[k] = r
	}
	return pods, rates
}

func TestManager(t *testing.T) {
	m := edtMaps(t)
	mgr, err := bandwidth.NewManager(m)
	require.NoError(t, err)

	require.NoError(t, mgr.Set(7, 8_000_000))
	require.NoError(t, mgr.Set(9, 16_000))
	pods, rates := content(t, m)
	require.Len(t, pods, 2)
	a7, a9 := pods[7], pods[9]
	assert.NotEqual(t, a7, a9, "each pod its own aggregate")
	for _, a := range []uint32{a7, a9} {
		assert.NotZero(t, a&maps.EDTAggregateBit, "aggregate %#x carries the bit", a)
	}
	assert.Equal(t, uint64(1_000_000), rates[a7].BytesPerSec)
	assert.Equal(t, uint64(2_000), rates[a9].BytesPerSec)

	// A new rate keeps the aggregate and the pod's clock.
	require.NoError(t, m.EDTRates.Put(a7, maps.EDTRate{BytesPerSec: 1_000_000, TLast: 42}))
	require.NoError(t, mgr.Set(7, 4_000_000))
	pods, rates = content(t, m)
	assert.Equal(t, a7, pods[7])
	assert.Equal(t, maps.EDTRate{BytesPerSec: 500_000, TLast: 42}, rates[a7])

	// A restarted agent takes the maps over as they are.
	again, err := bandwidth.NewManager(m)
	require.NoError(t, err)
	assert.Equal(t, map[int]uint64{7: 4_000_000, 9: 16_000}, again.Rates())

	// Sync: 9 lifted, 7 kept, 11 new; its aggregate is 9's, freed.
	require.NoError(t, again.Sync(map[int]uint64{7: 4_000_000, 11: 80_000}))
	pods, rates = content(t, m)
	assert.Equal(t, map[uint32]uint32{7: a7, 11: a9}, pods)
	assert.Len(t, rates, 2)
	assert.Equal(t, uint64(42), rates[a7].TLast, "an unchanged rate is not rewritten")

	require.NoError(t, again.Delete(7))
	require.NoError(t, again.Delete(7), "lifting twice is no error")
	pods, rates = content(t, m)
	assert.Equal(t, map[uint32]uint32{11: a9}, pods)
	assert.Len(t, rates, 1)
}

func TestManagerRefusesBadLimits(t *testing.T) {
	m := edtMaps(t)
	mgr, err := bandwidth.NewManager(m)
	require.NoError(t, err)
	require.NoError(t, mgr.Set(3, 1_000))
	for _, c := range []struct {
		ifindex int
		rate    uint64
		want    string
	}{{0, 1_000, "ifindex 0"}, {-1, 1_000, "ifindex -1"}, {4, 7, "7 bit/s"}} {
		assert.ErrorContains(t, mgr.Set(c.ifindex, c.rate), c.want)
		assert.ErrorContains(t, mgr.Sync(map[int]uint64{3: 1_000, c.ifindex: c.rate}), c.want)
	}
	pods, _ := content(t, m)
	assert.Equal(t, []int{3}, keys(pods), "the valid limit stays, nothing else is written")
}

func keys(m map[uint32]uint32) []int {
	var out []int
	for k := range m {
		out = append(out, int(k))
	}
	return out
}

// EnsureFQ puts fq at the root of a single-queue device and under mq on
// each queue of a multi-queue one, and a second call changes nothing.
func TestEnsureFQ(t *testing.T) {
	testenv.RequireRoot(t)
	for _, queues := range []int{1, 4} {
		t.Run(fmt.Sprintf("%d-queues", queues), func(t *testing.T) {
			topo := topology.NewForTest(t, topology.Spec{Name: fmt.Sprintf("fq%d", queues)})
			require.NoError(t, topo.Node.Do(func() error {
				return netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "fqdev", NumTxQueues: queues, NumRxQueues: queues}, PeerName: "fqpeer"})
			}))
			var first, second []netlink.Qdisc
			err := topo.Node.Do(func() error {
				l, err := netlink.LinkByName("fqdev")
				if err != nil {
					return err
				}
				if err := bandwidth.EnsureFQ(l); err != nil {
					return err
				}
				if first, err = netlink.QdiscList(l); err != nil {
					return err
				}
				if err := bandwidth.EnsureFQ(l); err != nil {
					return err
				}
				second, err = netlink.QdiscList(l)
				return err
			})
			testenv.RequireDriver(t, "fq qdisc (sch_fq)", "5.10", err)
			require.NoError(t, err)
			fqs := 0
			for _, q := range first {
				if q.Type() == "fq" {
					fqs++
				}
			}
			assert.Equal(t, queues, fqs, "one fq per tx queue: %v", first)
			assert.Equal(t, first, second, "a second call keeps what is there")
		})
	}
}

// EnableBBR sets the default of its own netns only, and new sockets there
// use BBR. The test's netns starts from reno, so BBR is the call's doing
// (this machine's host default may be BBR already). Outside the host netns
// the kernel lets a netns choose BBR only if the host allows it
// (tcp_allowed_congestion_control); the agent itself runs in the host
// netns. A vmtest guest, which is the test's alone, allows it.
func TestEnableBBR(t *testing.T) {
	testenv.RequireRoot(t)
	const allowed = "/proc/sys/net/ipv4/tcp_allowed_congestion_control"
	if testenv.InVMTest() {
		b, err := os.ReadFile(allowed)
		require.NoError(t, err)
		if !slices.Contains(strings.Fields(string(b)), "bbr") {
			require.NoError(t, os.WriteFile(allowed, append(bytes.TrimSpace(b), " bbr"...), 0), "allow bbr in the guest")
		}
	}
	topo := topology.NewForTest(t, topology.Spec{Name: "bbr"})
	host, err := bandwidth.CongestionControl()
	require.NoError(t, err)
	var got, sock string
	err = topo.Node.Do(func() error {
		if err := os.WriteFile("/proc/sys/net/ipv4/tcp_congestion_control", []byte("reno"), 0); err != nil {
			return err
		}
		if err := bandwidth.EnableBBR(); err != nil {
			return err
		}
		var err error
		if got, err = bandwidth.CongestionControl(); err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		sock, err = unix.GetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_CONGESTION)
		return err
	})
	if errors.Is(err, unix.EPERM) && !testenv.InVMTest() {
		t.Skipf("this host does not allow bbr outside its own netns (%s), and the test keeps to its own netns: %v", allowed, err)
	}
	testenv.RequireDriver(t, "BBR congestion control (tcp_bbr)", "5.10", err)
	require.NoError(t, err)
	assert.Equal(t, "bbr", got, "the netns' default")
	assert.Equal(t, "bbr", sock, "a new socket's congestion control")
	after, err := bandwidth.CongestionControl()
	require.NoError(t, err)
	assert.Equal(t, host, after, "the test's own netns is untouched")
}

// Without sch_fq, EnsureFQ fails naming it and leaves a multi-queue
// device's qdiscs as they were, though it had to put mq at the root first.
func TestEnsureFQWithoutFQLeavesDevice(t *testing.T) {
	testenv.RequireRoot(t)
	topo := topology.NewForTest(t, topology.Spec{Name: "nofq"})
	var before, after []netlink.Qdisc
	var ensure error
	require.NoError(t, topo.Node.Do(func() error {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "nofq", NumTxQueues: 4, NumRxQueues: 4}, PeerName: "nofqpeer"}); err != nil {
			return err
		}
		l, err := netlink.LinkByName("nofq")
		if err != nil {
			return err
		}
		if before, err = netlink.QdiscList(l); err != nil {
			return err
		}
		ensure = bandwidth.EnsureFQ(l)
		after, err = netlink.QdiscList(l)
		return err
	}))
	if ensure == nil {
		t.Skip("the kernel has sch_fq (TestEnsureFQ covers it)")
	}
	require.ErrorIs(t, ensure, bandwidth.ErrNoFQ)
	assert.ErrorContains(t, ensure, "sch_fq", "the error names what is missing")
	assert.Equal(t, before, after, "the device's qdiscs are as they were")
}
