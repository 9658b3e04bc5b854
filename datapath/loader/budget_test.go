package loader_test

import (
	"fmt"
	"maps"
	"slices"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/harness/testenv"
)

// verifierBudget is the most instructions the kernel's verifier may walk
// for each program, in the configuration that costs it most. Every load
// pays for them (tens of seconds per datapath load under emulation), and
// the kernel refuses a program past 1M: a change that goes over its budget
// makes the program cheaper to verify or raises the budget here, saying why.
// They hold on every kernel of the matrix, whose verifiers prune unlike
// each other: 6.1 walks 216k of the node-device program and 278k of the XDP
// one, 6.18 140k and 84k; of the pod program with BPF host routing 6.18
// walks 253k and 7.2 570k, the most of any, and the first to bring down.
var verifierBudget = map[string]uint32{
	"sp_from_netdev":     300_000,
	"sp_xdp_from_netdev": 350_000,
	"sp_from_pod":        650_000,
	"sp_to_pod":          10_000,
	"sp_to_netdev":       10_000,
	"socket hook":        20_000,
}

// TestVerifierBudget loads the datapath as its costliest configurations
// (host routing in BPF or not, XDP on, conntrack zones on) and checks each
// program's verified instruction count against its budget. The counts are
// logged per kernel: `make vmtest` keeps them in each kernel's test output.
func TestVerifierBudget(t *testing.T) {
	testenv.RequireRoot(t)
	for _, routing := range []loader.HostRouting{loader.HostRoutingStack, loader.HostRoutingBPF} {
		t.Run(fmt.Sprintf("routing=%s", routing), func(t *testing.T) {
			if routing == loader.HostRoutingBPF {
				testenv.RequireFeature(t, "BPF host routing", "5.10", loader.ProbeHostRouting())
			}
			cfg := smallConfig()
			cfg.HostRouting = routing
			cfg.XDP = !testenv.BuiltFeatureMissing(t, "the XDP node-device program", loader.XDPMinKernel, loader.ProbeXDP())
			dp := load(t, cfg)
			programs := map[string]*ebpf.Program{
				"sp_from_netdev": dp.FromNetdev,
				"sp_to_netdev":   dp.ToNetdev,
				"sp_from_pod":    dp.FromPod,
				"sp_to_pod":      dp.ToPod,
			}
			if dp.XDPFromNetdev != nil {
				programs["sp_xdp_from_netdev"] = dp.XDPFromNetdev
			}
			for _, h := range dp.SockHooks {
				programs["sp_"+h.Name] = h.Prog
			}
			for _, name := range slices.Sorted(maps.Keys(programs)) {
				prog := programs[name]
				info, err := prog.Info()
				require.NoError(t, err, "info of %s", name)
				verified, ok := info.VerifiedInstructions()
				if !ok {
					testenv.RequireFeature(t, "verified instruction counts", "5.16", ebpf.ErrNotSupported)
				}
				budget, found := verifierBudget[name]
				if !found {
					budget = verifierBudget["socket hook"]
				}
				t.Logf("%-22s verified %7d instructions (budget %d)", name, verified, budget)
				assert.LessOrEqual(t, verified, budget, "%s verifies more instructions than its budget", name)
			}
		})
	}
}
