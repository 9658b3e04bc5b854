package loader_test

import (
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/harness/testenv"
)

func TestParseSockState(t *testing.T) {
	for in, want := range map[string]loader.SockState{"map": loader.SockStateMap, "storage": loader.SockStateStorage, "auto": loader.SockStateAuto} {
		got, err := loader.ParseSockState(in)
		assert.NoError(t, err, "%q parses", in)
		assert.Equal(t, want, got, "%q parses to its mode", in)
	}
	for _, bad := range []string{"", "Storage", "lru"} {
		_, err := loader.ParseSockState(bad)
		assert.Error(t, err, "%q is refused", bad)
	}
}

func TestProbeSockStorage(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireFeature(t, "socket storage in cgroup sock_addr programs", loader.SockStateMinKernel, loader.ProbeSockStorage())
}

// Every mode loads; each resolves to what the kernel allows, and the
// hooks' socket storage is pinned beside the other maps so a reload keeps
// the state of live sockets.
func TestLoadSockState(t *testing.T) {
	testenv.RequireRoot(t)
	storage := !testenv.FeatureMissing(t, "socket storage in cgroup sock_addr programs", loader.SockStateMinKernel, loader.ProbeSockStorage())
	for _, c := range []struct {
		mode loader.SockState
		want loader.SockState
		skip bool
	}{
		{"", loader.SockStateMap, false},
		{loader.SockStateMap, loader.SockStateMap, false},
		{loader.SockStateStorage, loader.SockStateStorage, !storage},
		{loader.SockStateAuto, map[bool]loader.SockState{true: loader.SockStateStorage, false: loader.SockStateMap}[storage], false},
	} {
		name := string(c.mode)
		if name == "" {
			name = "default"
		}
		t.Run(name, func(t *testing.T) {
			if c.skip {
				t.Skip("the kernel has no socket storage for cgroup sock_addr programs")
			}
			cfg := smallConfig()
			cfg.SockState = c.mode
			cfg.PinPath = testenv.BPFFS(t)
			got, err := cfg.ResolveSockState()
			require.NoError(t, err, "resolve %q", c.mode)
			assert.Equal(t, c.want, got, "%q resolves to %s", c.mode, c.want)
			dp := load(t, cfg)
			require.NotNil(t, dp.Maps.SockCtx, "the socket storage map is loaded")
			pinned, err := ebpf.LoadPinnedMap(filepath.Join(cfg.PinPath, maps.SockCtxName), nil)
			require.NoError(t, err, "%s is pinned", maps.SockCtxName)
			assert.Equal(t, mapID(t, dp.Maps.SockCtx), mapID(t, pinned), "the pin is the hooks' map")
			pinned.Close()
		})
	}
}

// Bad socket-state settings are config errors, refused before anything
// is probed or loaded.
func TestLoadSockStateRefusals(t *testing.T) {
	cfg := smallConfig()
	cfg.SockState = "lru"
	cfg.PinPath = filepath.Join(t.TempDir(), "pins")
	_, err := loader.Load(cfg)
	assert.ErrorContains(t, err, "load config", "an unknown socket state is a config error")

	cfg = smallConfig()
	cfg.SockRevNATMapSize = 0
	_, err = loader.Load(cfg)
	assert.ErrorContains(t, err, "socket reverse-NAT map size", "a zero sp_sock_revnat size is refused")
}
