package agent

import (
	"net"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/servicepath/servicepath/harness/topology"
)

func TestParseDevicePattern(t *testing.T) {
	p, err := ParseDevicePattern(DefaultPodDevices)
	require.NoError(t, err, "the default pattern parses")
	for name, want := range map[string]bool{
		"veth1a2b3c4d": true, "cali12345": true, "lxc0f": true, "eni9": true, "gke3": true,
		"eth0": false, "cni0": false, "wire0": false, "": false,
	} {
		assert.Equal(t, want, p.Match(name), "default pattern on %q", name)
	}
	p, err = ParseDevicePattern(" h[0-9]*, tap? ,")
	require.NoError(t, err, "globs with spaces and an empty item")
	assert.Equal(t, DevicePattern{"h[0-9]*", "tap?"}, p, "parsed globs")
	assert.True(t, p.Match("h0-web"), "h[0-9]* matches h0-web")
	assert.False(t, p.Match("tap10"), "tap? matches one character")

	p, err = ParseDevicePattern("")
	require.NoError(t, err, "empty pattern")
	assert.False(t, p.Match("veth0"), "the empty pattern selects nothing")

	_, err = ParseDevicePattern("veth*,[x")
	require.Error(t, err, "a bad glob is refused")
	assert.Contains(t, err.Error(), `"[x"`, "the error names the bad glob")
}

// TestDetectNodeDevices finds the node devices of a node netns by its
// default routes, and refuses to guess without one.
func TestDetectNodeDevices(t *testing.T) {
	topo := topology.NewForTest(t, topology.Spec{Name: "nodedev", External: true, Pods: []topology.PodSpec{{Name: "web"}}})
	node := topo.Node
	var got []string
	err := node.Do(func() (err error) {
		got, err = DetectNodeDevices()
		return err
	})
	require.Error(t, err, "no default route, no guess: %v", got)
	assert.Contains(t, err.Error(), "no default route", "the error says why")

	require.NoError(t, node.Do(func() error {
		wire, err := netlink.LinkByName(topology.WireIfName)
		if err != nil {
			return err
		}
		for _, gw := range []net.IP{topo.External.IPv4.AsSlice(), topo.External.IPv6.AsSlice()} {
			if err := netlink.RouteAdd(&netlink.Route{LinkIndex: wire.Attrs().Index, Gw: gw}); err != nil {
				return err
			}
		}
		return nil
	}), "default routes of both families via the wire")
	require.NoError(t, node.Do(func() (err error) {
		got, err = DetectNodeDevices()
		return err
	}), "detect with default routes")
	assert.Equal(t, []string{topology.WireIfName}, got, "the wire holds both default routes, named once")
}
