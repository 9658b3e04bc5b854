package clusterip

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/packet"
	"github.com/servicepath/servicepath/harness/stats"
	"github.com/servicepath/servicepath/harness/testenv"
)

func TestFixtures(t *testing.T) {
	testenv.RequireRoot(t)
	inject.Run(t, Fixtures())
}

// New flows spread over every active backend: a chi-square bound, not an
// exact count.
func TestNewFlowsSpreadOverBackends(t *testing.T) {
	testenv.RequireRoot(t)
	for _, f := range Families {
		t.Run(f.Name, func(t *testing.T) {
			e, err := inject.NewEnv(inject.Config())
			require.NoError(t, err, "load datapath")
			t.Cleanup(func() { e.Close() })
			require.NoError(t, e.Services.Upsert(f.Service(service.TCP, f.active(0), f.active(1), f.active(2))), "program service")

			counts := map[netip.Addr]int{}
			const flows = 3000
			for i := range flows {
				client := netip.AddrPortFrom(f.Client.Addr(), uint16(10000+i))
				v, out, err := e.Inject(inject.FromPod, packet.TCP(client, f.vip(), packet.SYN, nil, packet.Opts{}))
				require.NoError(t, err, "inject SYN %d", i)
				require.Equal(t, inject.OK, v, "SYN %d verdict", i)
				dst, ok := destination(out)
				require.True(t, ok, "decode output of SYN %d", i)
				counts[dst]++
			}
			require.Len(t, counts, 3, "every backend got flows: %v", counts)
			var c []int
			for _, b := range f.Backends {
				c = append(c, counts[b])
			}
			stat, df := stats.ChiSquareUniform(c)
			assert.Less(t, stat, stats.ChiSquareCritical(df, stats.SpreadAlpha), "spread %v is uniform", c)
		})
	}
}
