package nodeport

import (
	"context"
	"math"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/ct"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
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
			now, err := ct.Now()
			require.NoError(t, err)
			n, err := ct.GCNAT(e.DP.Maps, now)
			require.NoError(t, err)
			assert.Zero(t, n, "a live flow keeps its mappings")

			_, err = ct.GC(e.DP.Maps.NorthSouthCT(), math.MaxUint64)
			require.NoError(t, err, "expire the flow")
			n, err = ct.GCNAT(e.DP.Maps, now)
			require.NoError(t, err)
			assert.Equal(t, 2, n, "both mappings deleted with the flow")
			assert.Zero(t, natEntries(t, e), "the NAT map is empty")
		})
	}
}

// gcEnv loads a datapath on the bed's node with cfg's edits, the node
// registered.
func gcEnv(t *testing.T, b *Bed, dev *inject.Device, edits ...func(*loader.Config)) *inject.Env {
	cfg := loader.DefaultConfig()
	stackRouting(&cfg)
	for _, ed := range edits {
		ed(&cfg)
	}
	e, err := inject.NewEnv(cfg)
	require.NoError(t, err, "load datapath")
	t.Cleanup(func() { e.Close() })
	require.NoError(t, b.node(dev)(e), "register the node")
	return e
}

// GCNAT frees the mapping of a flow that expired but that no conntrack
// pass has deleted yet, and of a flow gone, only its own halves: a reply
// half evicted and claimed since by another client stays that client's.
func TestGCNATFreesExpiredFlowsOwnHalvesOnly(t *testing.T) {
	testenv.RequireRoot(t)
	b := NewBed(t)
	dev := b.wire()
	f := b.Families()[0]
	in := packet.Opts{}
	other := netip.AddrPortFrom(f.Client.Addr().Next(), ClientPort)

	t.Run("expired-not-yet-collected", func(t *testing.T) {
		e := gcEnv(t, b, dev)
		require.NoError(t, inject.Steps(inject.Upsert(f.nodePortSvc(service.UDP, []netip.Addr{f.Remote})),
			inject.Send(dev, inject.FromNetdev, udp(f.Client, f.nodePort(), in)))(e), "SNAT one UDP flow")
		n, err := ct.GCNAT(e.DP.Maps, math.MaxUint64)
		require.NoError(t, err)
		assert.Equal(t, 2, n, "the flow's lifetime passed: both halves go, without waiting for the conntrack pass")
		assert.Zero(t, natEntries(t, e), "the NAT map is empty")
	})

	t.Run("reply-half-of-another-client", func(t *testing.T) {
		e := gcEnv(t, b, dev, natPorts(ClientPort, ClientPort+1))
		require.NoError(t, inject.Steps(inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote})),
			inject.Send(dev, inject.FromNetdev, tcp(f.Client, f.nodePort(), packet.SYN, in)),
			evictReplyHalf(f.at(f.Remote), f.snat(ClientPort)),
			inject.Send(dev, inject.FromNetdev, tcp(other, f.nodePort(), packet.SYN, in)))(e), "a flow whose port another client took")
		// The first client's flow ends (its conntrack entries gone).
		var k maps.CTKey
		var v maps.CTEntry
		var mine []maps.CTKey
		client, _ := maps.AddrFrom(f.Client.Addr())
		it := e.DP.Maps.NorthSouthCT().Iterate()
		for it.Next(&k, &v) {
			if k.SAddr == client {
				mine = append(mine, k)
			}
		}
		require.NoError(t, it.Err())
		require.Len(t, mine, 2, "the first client's service and flow entries")
		for _, k := range mine {
			require.NoError(t, e.DP.Maps.NorthSouthCT().Delete(&k))
		}
		now, err := ct.Now()
		require.NoError(t, err)
		n, err := ct.GCNAT(e.DP.Maps, now)
		require.NoError(t, err)
		assert.Equal(t, 1, n, "only the gone flow's out half goes")
		assert.Equal(t, 2, natEntries(t, e), "the other client keeps both halves of its mapping")
	})
}

// Packets that find no free SNAT port put the north-south GC under
// pressure: a shorter interval, whole-map passes.
func TestNATExhaustionIsGCPressure(t *testing.T) {
	testenv.RequireRoot(t)
	b := NewBed(t)
	dev := b.wire()
	f := b.Families()[0]
	e := gcEnv(t, b, dev, natPorts(ClientPort, ClientPort))
	other := netip.AddrPortFrom(f.Client.Addr().Next(), ClientPort)
	require.NoError(t, inject.Steps(inject.Upsert(f.nodePortSvc(service.TCP, []netip.Addr{f.Remote})),
		inject.Send(dev, inject.FromNetdev, tcp(other, f.nodePort(), packet.SYN, packet.Opts{})))(e), "take the only port")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var passes []ct.LoopPass
	l := &ct.Loop{Maps: e.DP.Maps, Base: 200 * time.Millisecond, Min: 50 * time.Millisecond, Report: func(p ct.LoopPass) {
		if !p.NorthSouth {
			return
		}
		passes = append(passes, p)
		if len(passes) == 1 {
			// Between this pass and the next: a client finds no port.
			v, _, err := e.InjectOn(dev, inject.FromNetdev, tcp(f.Client, f.nodePort(), packet.SYN, packet.Opts{}))
			assert.NoError(t, err, "send a SYN")
			assert.True(t, v.Dropped(), "no SNAT port for it")
		} else {
			cancel()
		}
	}}
	require.NoError(t, l.Run(ctx))
	require.Len(t, passes, 2)
	assert.Empty(t, passes[0].Decision.Pressure, "calm before")
	assert.Contains(t, passes[1].Decision.Pressure, "no free SNAT port", "exhaustion is pressure")
	assert.Equal(t, 50*time.Millisecond, passes[1].Decision.Interval, "the interval shortens")
	assert.Zero(t, passes[1].Decision.Budget, "the pass after reads the whole map")
}

// On the backend's node, DSR flows learned from the option have no
// service entry there: the GC sees no orphan.
func TestLearnedDSRFlowsAreNoOrphans(t *testing.T) {
	testenv.RequireRoot(t)
	b := NewBed(t)
	dev := b.wire()
	f := b.Families()[0]
	e := gcEnv(t, b, dev)
	for i := range 3 {
		c := netip.AddrPortFrom(f.Client.Addr(), uint16(ClientPort+i))
		require.NoError(t, inject.Send(dev, inject.FromNetdev, tcp(c, f.at(f.Local), packet.SYN, packet.Opts{DSR: f.lb()}))(e), "learn a DSR flow")
	}
	now, err := ct.Now()
	require.NoError(t, err)
	res, err := ct.NewCollector(e.DP.Maps.NorthSouthCT()).Pass(now, 0)
	require.NoError(t, err)
	assert.Equal(t, 3, res.Scanned, "three learned flows")
	assert.Zero(t, res.Orphans, "none is an orphan")
	p, err := ct.ReadPressure(e.DP.Maps.NorthSouthCT(), now)
	require.NoError(t, err)
	assert.Zero(t, p.Orphans, "nor to ReadPressure")
}
