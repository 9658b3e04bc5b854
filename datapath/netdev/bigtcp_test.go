package netdev_test

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/servicepath/servicepath/datapath/netdev"
	"github.com/servicepath/servicepath/harness/topology"
)

// A driver that refuses a limit keeps it, and SetBigTCP names it and
// goes on with the rest: a bridge without ports has a tso_max_size of
// 64 KiB, so its GSO limits stay while its GRO limits, which no driver
// bounds, go up. A second call is refused alike.
func TestSetBigTCPRefused(t *testing.T) {
	topo := topology.NewForTest(t, topology.Spec{Name: "btref"})
	var b, again netdev.BigTCP
	require.NoError(t, topo.Node.Do(func() error {
		if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}); err != nil {
			return err
		}
		var err error
		if b, err = netdev.SetBigTCP("br0", netdev.BigTCPSize); err != nil {
			return err
		}
		again, err = netdev.SetBigTCP("br0", netdev.BigTCPSize)
		return err
	}), "big tcp on a bridge")
	t.Logf("%v, refused %v", b, b.Refused)
	if b.GRO == 0 || b.GSOIPv4 == 0 {
		t.Skipf("the kernel has no gro_max_size or gso_ipv4_max_size: %v", b)
	}
	assert.Equal(t, uint32(65536), b.GSO, "gso_max_size kept")
	assert.Equal(t, uint32(65536), b.GSOIPv4, "gso_ipv4_max_size kept")
	assert.Equal(t, uint32(netdev.BigTCPSize), b.GRO, "gro_max_size raised")
	assert.Equal(t, uint32(netdev.BigTCPSize), b.GROIPv4, "gro_ipv4_max_size raised")
	assert.False(t, b.IPv6() || b.IPv4(), "no BIG TCP without GSO")
	refused := errs(b.Refused)
	assert.Contains(t, refused, "gso_max_size 196608", "refusal named")
	assert.Contains(t, refused, "gso_ipv4_max_size 196608", "refusal named")
	assert.NotContains(t, refused, "gro_", "GRO limits were not refused")
	assert.Equal(t, b.Refused, again.Refused, "the same refusals again")
}

func errs(es []error) string {
	var s []string
	for _, e := range es {
		s = append(s, e.Error())
	}
	return strings.Join(s, "; ")
}
