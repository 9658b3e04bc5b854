package clusterip

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/packet"
	"github.com/servicepath/servicepath/harness/testenv"
)

func clearCT(m *ebpf.Map) error {
	var keys []maps.CTKey
	var k maps.CTKey
	var v maps.CTEntry
	it := m.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, k)
	}
	if err := it.Err(); err != nil {
		return err
	}
	for _, k := range keys {
		if err := m.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return err
		}
	}
	return nil
}

// The datapath's Maglev disruption, measured on packets: many distinct
// flows go through the program against a Maglev service, one backend
// changes through the manager, and the same flows (their conntrack
// cleared, as on a node that never saw them) go through again. The share
// that moved must be close to the minimum the change forces, as
// datapath/maglev's tests require of the tables themselves.
func TestMaglevDisruptionOnPackets(t *testing.T) {
	testenv.RequireRoot(t)
	const n, flows = 10, 20000
	if testing.Short() {
		t.Skip("-short: 40,000 packets per case")
	}
	backends := func(first, count int) []service.Backend {
		var out []service.Backend
		for i := first; i < first+count; i++ {
			out = append(out, service.Backend{Addr: netip.AddrFrom4([4]byte{198, 18, 1, byte(i + 1)}), Port: BackendPort})
		}
		return out
	}
	vip := netip.AddrPortFrom(V4.VIP, VIPPort)
	terminating := backends(0, n)
	terminating[3].State = service.Terminating
	for _, c := range []struct {
		name    string
		after   []service.Backend
		minimum float64 // the share that must move
		// excess is what Maglev may move beyond that: its tables' 1%, and
		// three standard deviations of the share 20,000 flows sample
		// (~0.65%).
		excess float64
	}{
		{"one of ten removed", append(backends(0, 3), backends(4, 6)...), 1.0 / n, 0.02},
		{"one of ten terminating", terminating, 1.0 / n, 0.02},
		{"one added to ten", backends(0, n+1), 1.0 / (n + 1), 0.02},
		// The old backend's flows must move; the newcomer then takes its
		// own share, from everyone: a removal and an addition, each
		// near its minimum.
		{"one of ten replaced", append(backends(0, n-1), backends(n+5, 1)...), 1.0 / n, 1.0/n + 0.02},
	} {
		t.Run(c.name, func(t *testing.T) {
			e, err := inject.NewEnv(inject.Config())
			require.NoError(t, err, "load datapath")
			t.Cleanup(func() { e.Close() })
			s := service.Service{Name: "default/maglev", Frontend: service.Frontend{Addr: vip.Addr(), Port: vip.Port(), Protocol: service.TCP},
				Backends: backends(0, n), Maglev: true}
			require.NoError(t, e.Services.Upsert(s), "program the Maglev service")

			send := func() []netip.Addr {
				got := make([]netip.Addr, flows)
				for i := range flows {
					client := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 2 + byte(i/30000), 10}), uint16(1024+i%30000))
					v, out, err := e.Inject(inject.FromPod, packet.TCP(client, vip, packet.SYN, nil, packet.Opts{}))
					require.NoError(t, err, "inject flow %d", i)
					require.Equal(t, inject.OK, v, "flow %d verdict", i)
					dst, ok := destination(out)
					require.True(t, ok, "decode flow %d", i)
					got[i] = dst
				}
				return got
			}
			before := send()
			require.NoError(t, clearCT(e.DP.Maps.CT), "clear conntrack")
			s.Backends = c.after
			require.NoError(t, e.Services.Upsert(s), "change one backend")
			after := send()

			moved := 0
			for i := range flows {
				if before[i] != after[i] {
					moved++
				}
			}
			share := float64(moved) / flows
			t.Logf("%s: %.2f%% of %d flows moved (minimum %.2f%%)", c.name, share*100, flows, c.minimum*100)
			assert.GreaterOrEqual(t, share, c.minimum*0.9, "%s: at least the share the change forces moves", c.name)
			assert.LessOrEqual(t, share, c.minimum+c.excess, "%s: little more than the minimal share moves", c.name)
		})
	}
}
