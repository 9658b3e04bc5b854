package nodeport

import (
	"math"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/ct"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/packet"
	"github.com/servicepath/servicepath/harness/testenv"
)

// A SNATed flow's two NAT entries live while its conntrack entries do and
// go with them, in whichever map the flow is: the north-south zone, or the
// shared map with zones off.
func TestSNATEntriesGoWithTheirFlow(t *testing.T) {
	testenv.RequireRoot(t)
	b := NewBed(t)
	dev := b.wire()
	f := b.Families()[0]
	for _, z := range zoneModes {
		t.Run(z.name, func(t *testing.T) {
			cfg := loader.DefaultConfig()
			stackRouting(&cfg)
			z.config(&cfg)
			e, err := inject.NewEnv(cfg)
			require.NoError(t, err, "load datapath")
			t.Cleanup(func() { e.Close() })
			require.NoError(t, inject.Steps(b.node(dev), inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote})),
				inject.Send(dev, inject.FromNetdev, tcp(f.Client, f.nodePort(), packet.SYN, packet.Opts{})))(e), "SNAT one flow")

			require.Equal(t, 2, natEntries(t, e), "the flow has an out and a reply mapping")
			n, err := ct.GCNAT(e.DP.Maps)
			require.NoError(t, err)
			assert.Zero(t, n, "a live flow keeps its mappings")

			_, err = ct.GC(e.DP.Maps.NorthSouthCT(), math.MaxUint64)
			require.NoError(t, err, "expire the flow")
			n, err = ct.GCNAT(e.DP.Maps)
			require.NoError(t, err)
			assert.Equal(t, 2, n, "both mappings deleted with the flow")
			assert.Zero(t, natEntries(t, e), "the NAT map is empty")
		})
	}
}
