package kubeproxy

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
	"github.com/servicepath/servicepath/harness/traffic"
)

const backendPort = 8080

// TestRulesCarryTraffic loads each tool's rules into a node netns and
// checks that a client pod really reaches a service through them, that a
// partial sync changing the backends takes effect, and that a removed
// service stops answering.
func TestRulesCarryTraffic(t *testing.T) {
	testenv.RequireRoot(t)
	for _, tool := range []Tool{IPTablesLegacy, IPTablesNFT, NFT} {
		t.Run(string(tool), func(t *testing.T) {
			if err := tool.Available(); err != nil {
				t.Skip(err)
			}
			topo := topology.NewForTest(t, topology.Spec{Name: "kp", Pods: []topology.PodSpec{
				{Name: "client"}, {Name: "backend-1"}, {Name: "backend-2"}, {Name: "backend-3"},
			}})
			var eps []netip.AddrPort
			for _, name := range []string{"backend-1", "backend-2", "backend-3"} {
				srv, err := traffic.Serve(topo.Pod(name), name, backendPort)
				require.NoError(t, err, "serve in %s", name)
				t.Cleanup(func() { srv.Close() })
				eps = append(eps, netip.AddrPortFrom(topo.Pod(name).IPv4, backendPort))
			}
			services := Synthetic(50, netip.MustParseAddr("10.96.0.1"), 80, eps)
			target := services[len(services)-1]
			vip := netip.AddrPortFrom(target.ClusterIP, target.Port)

			r := &Runner{NS: topo.Node}
			t.Cleanup(func() { r.Close() })
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			g := newGenerator(tool, DefaultConfig(topology.PodCIDRv4))
			text, err := g.full(services)
			require.NoError(t, err, "generate full sync")
			_, err = r.Apply(ctx, tool, text)
			require.NoError(t, err, "load 50 services")

			client := topo.Pod("client")
			seen := map[string]int{}
			for range 60 {
				rep, err := traffic.TCPExchange(client, vip, []byte("hello"), 3*time.Second)
				require.NoError(t, err, "TCP exchange with %s through the rules", vip)
				seen[rep.Identity]++
			}
			assert.Len(t, seen, 3, "every backend answered: %v", seen)

			changed := target
			changed.Endpoints = eps[1:2]
			text, err = g.upsert(changed)
			require.NoError(t, err, "generate change")
			_, err = r.Apply(ctx, tool, text)
			require.NoError(t, err, "apply change of backends")
			for range 10 {
				rep, err := traffic.TCPExchange(client, vip, []byte("hello"), 3*time.Second)
				require.NoError(t, err, "TCP exchange after the change")
				assert.Equal(t, "backend-2", rep.Identity, "only the remaining backend answers")
			}

			added := SyntheticService(len(services), netip.MustParseAddr("10.97.0.1"), 80, eps[:1])
			text, err = g.upsert(added)
			require.NoError(t, err, "generate add")
			_, err = r.Apply(ctx, tool, text)
			require.NoError(t, err, "apply added service")
			rep, err := traffic.TCPExchange(client, netip.AddrPortFrom(added.ClusterIP, 80), []byte("new"), 3*time.Second)
			require.NoError(t, err, "the added service answers")
			assert.Equal(t, "backend-1", rep.Identity, "the added service's one backend answers")

			text, err = g.remove(target.Key())
			require.NoError(t, err, "generate delete")
			_, err = r.Apply(ctx, tool, text)
			require.NoError(t, err, "apply delete")
			_, err = traffic.TCPExchange(client, vip, []byte("gone"), 500*time.Millisecond)
			assert.Error(t, err, "a removed service no longer answers")

			if tool != NFT {
				save := strings.TrimSuffix(string(tool), "-restore") + "-save"
				out, err := r.Output(ctx, save, "-t", "nat")
				require.NoError(t, err, "iptables-save")
				assert.NotContains(t, out, SVCChain(target), "the removed service's chain is gone")
				assert.Contains(t, out, SVCChain(services[0]), "other services stay")
			} else {
				out, err := r.Output(ctx, "nft", "list", "table", "ip", "kube-proxy")
				require.NoError(t, err, "nft list table")
				assert.NotContains(t, out, NFTServiceChain(target), "the removed service's chain is gone")
				assert.Contains(t, out, NFTServiceChain(services[0]), "other services stay")
			}
		})
	}
}

// generator unifies the two generators for the test.
type generator struct {
	full   func([]Service) (string, error)
	upsert func(Service) (string, error)
	remove func(string) (string, error)
}

func newGenerator(tool Tool, cfg Config) generator {
	if tool == NFT {
		g := NewNFTables(cfg)
		return generator{g.FullSync, g.Upsert, g.Delete}
	}
	g := NewIPTables(cfg)
	return generator{func(s []Service) (string, error) { return g.FullSync(s, true) }, g.Upsert, g.Delete}
}
