package loader_test

import (
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/harness/testenv"
)

// mapsOf are the state maps a program uses, by name (not its object's
// .rodata and the like), with their ids.
func mapsOf(t *testing.T, p *ebpf.Program) map[string]ebpf.MapID {
	t.Helper()
	info, err := p.Info()
	require.NoError(t, err, "program info")
	ids, ok := info.MapIDs()
	require.True(t, ok, "kernel reports a program's maps")
	out := map[string]ebpf.MapID{}
	for _, id := range ids {
		m, err := ebpf.NewMapFromID(id)
		require.NoError(t, err, "open map %d", id)
		mi, err := m.Info()
		m.Close()
		require.NoError(t, err, "map %d info", id)
		if !strings.Contains(mi.Name, ".") {
			out[mi.Name] = id
		}
	}
	return out
}

func TestLoadXDP(t *testing.T) {
	testenv.RequireRoot(t)
	cfg := loader.DefaultConfig()
	cfg.CTMapSize = 1024
	dp, err := loader.Load(cfg)
	require.NoError(t, err, "load without XDP")
	assert.Nil(t, dp.XDPFromNetdev, "no XDP program unless asked for")
	assert.NoError(t, dp.XDPMissing, "nothing missing when not asked for")
	dp.Close()

	testenv.RequireBuiltFeature(t, "the XDP node-device program", loader.XDPMinKernel, loader.ProbeXDP())
	for _, zones := range []uint32{0, 1024} {
		cfg.XDP, cfg.CTNorthSouthMapSize = true, zones
		dp, err := loader.Load(cfg)
		require.NoError(t, err, "load with XDP (north-south zone of %d)", zones)
		require.NotNil(t, dp.XDPFromNetdev, "the XDP program is loaded")
		assert.Equal(t, ebpf.XDP, dp.XDPFromNetdev.Type(), "it is an XDP program")
		// Every map the XDP program uses is the tc program's: with zones,
		// sp_ct is the north-south zone in both.
		xdp, tc := mapsOf(t, dp.XDPFromNetdev), mapsOf(t, dp.FromNetdev)
		assert.NotEmpty(t, xdp, "the XDP program uses maps")
		for name, id := range xdp {
			assert.Equal(t, tc[name], id, "XDP's %s is the node-device object's (zone of %d)", name, zones)
		}
		dp.Close()
	}
}

func TestHandoverMeta(t *testing.T) {
	testenv.RequireRoot(t)
	// The word's tag is the netns cookie (5.14), there wherever XDP is.
	testenv.RequireBuiltFeature(t, "the XDP node-device program", loader.XDPMinKernel, loader.ProbeXDP())
	a, err := loader.HandoverMeta(loader.HandoverDeliver)
	require.NoError(t, err, "hand-over word in this netns")
	b, err := loader.HandoverMeta(loader.HandoverRoute)
	require.NoError(t, err, "hand-over word in this netns")
	assert.Len(t, a, 8, "a tag and an action, 32 bits each")
	assert.Equal(t, a[:4], b[:4], "one tag per netns")
	assert.NotEqual(t, a[4:], b[4:], "the actions differ")
}
