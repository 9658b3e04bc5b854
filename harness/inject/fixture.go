package inject

import (
	"fmt"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/harness/packet"
	"github.com/servicepath/servicepath/harness/testenv"
)

// Fixture is one row of a packet table.
type Fixture struct {
	Name string
	// Config adjusts the load-time settings; fixtures sharing settings
	// share one loaded datapath.
	Config func(*loader.Config)
	// Setup programs services and may inject earlier packets of a flow.
	Setup func(e *Env) error
	// On is the device the packet is seen on; nil: loopback of the
	// caller's netns.
	On      *Device
	Hook    Hook
	Input   []byte
	Verdict Verdict
	// Output is the expected packet; nil means the input, unchanged.
	Output []byte
	// Meta is the metadata an XDP program is expected to leave ahead of
	// the packet; nil: not checked.
	Meta []byte
	// SKB is the packet's skb metadata, taken as the row runs (so it may
	// be relative to the clock); nil: none.
	SKB func() SKB
	// Tstamp is the skb->tstamp the program must leave, taken after it
	// ran; nil: not checked.
	Tstamp func() uint64
	// Counters that must have grown by exactly these amounts.
	Counters map[string]uint64
	// Check makes further assertions on the maps after the packet.
	Check func(t testing.TB, e *Env)
	// MinKernel is the kernel ("major.minor") the row's behaviour needs,
	// for what Needs says; older kernels skip the row. Empty: any.
	MinKernel, Needs string
}

// Config is the loader's default with flow maps sized for a few flows: a
// preallocated LRU of the default size costs seconds to load in an
// emulated vmtest guest, and a fixture holds a handful of entries.
func Config() loader.Config {
	cfg := loader.DefaultConfig()
	cfg.CTMapSize = fixtureMapSize
	cfg.CTNorthSouthMapSize = fixtureMapSize
	cfg.NATMapSize = fixtureMapSize
	return cfg
}

const fixtureMapSize = 16384

func (f Fixture) config() loader.Config {
	cfg := Config()
	if f.Config != nil {
		f.Config(&cfg)
	}
	return cfg
}

type envCache map[loader.Config]*Env

func (c envCache) get(t testing.TB, cfg loader.Config) *Env {
	if e, ok := c[cfg]; ok {
		return e
	}
	e, err := NewEnv(cfg)
	require.NoError(t, err, "load datapath")
	c[cfg] = e
	return e
}

func (c envCache) close() {
	for _, e := range c {
		e.Close()
	}
}

// Run runs every fixture as a subtest: fresh maps, setup, one injected
// packet, then the verdict, the output byte for byte (so every field and
// both checksums), an independent checksum check and the counters.
func Run(t *testing.T, fixtures []Fixture) {
	envs := envCache{}
	t.Cleanup(envs.close)
	for _, f := range fixtures {
		t.Run(f.Name, func(t *testing.T) {
			if f.MinKernel != "" && !testenv.KernelAtLeast(t, f.MinKernel) {
				t.Skipf("needs kernel %s: %s", f.MinKernel, f.Needs)
			}
			e := envs.get(t, f.config())
			require.NoError(t, e.Reset(), "reset maps")
			if f.Setup != nil {
				require.NoError(t, f.Setup(e), "fixture setup")
			}
			before, err := e.Counters()
			require.NoError(t, err, "read counters before")

			var skb SKB
			if f.SKB != nil {
				skb = f.SKB()
			}
			res, err := e.RunWith(f.On, f.Hook, f.Input, skb)
			require.NoError(t, err, "inject")
			if f.Tstamp != nil {
				assert.Equal(t, f.Tstamp(), res.Tstamp, "skb->tstamp after the program")
			}
			verdict, out := res.Verdict, res.Packet
			assert.Equal(t, f.Verdict, verdict, "verdict")
			if f.Meta != nil {
				assert.Equal(t, f.Meta, res.Meta, "metadata left ahead of the packet")
			}

			want := f.Output
			if want == nil {
				want = f.Input
			}
			if d := packet.Diff(want, out); d != "" {
				t.Errorf("output packet differs from expected: %s", d)
			}
			if !verdict.Dropped() && string(out) != string(f.Input) {
				assert.NoError(t, packet.VerifyChecksums(out), "checksums of the rewritten packet verify")
			}

			after, err := e.Counters()
			require.NoError(t, err, "read counters after")
			grew := map[string]uint64{}
			for name, v := range after {
				if d := v - before[name]; d != 0 {
					grew[name] = d
				}
			}
			if f.Counters != nil {
				assert.Equal(t, f.Counters, grew, "counters that grew")
			}
			if f.Check != nil {
				f.Check(t, e)
			}
		})
	}
}

// Bench reports ns/packet for each fixture as the kernel times it. The
// kernel reruns a program on the same packet when asked to repeat, so a
// rewritten packet would take another path on its second run; instead each
// iteration runs once on a fresh copy of the input, with the flow state put
// back afterwards, so every timed run is exactly the fixture. A single run
// is dominated by the kernel's own timing overhead, so an empty program of
// the same type is timed alongside and subtracted: ns/packet is the fixture's program
// less the empty one, ns/empty what was subtracted.
func Bench(b *testing.B, fixtures []Fixture) {
	envs := envCache{}
	b.Cleanup(envs.close)
	empty := emptyPrograms{}
	b.Cleanup(empty.close)
	for _, f := range fixtures {
		b.Run(f.Name, func(b *testing.B) {
			cfg := f.config()
			// Restoring flow state walks the CT map's buckets every run.
			benchSizes(&cfg)
			e := envs.get(b, cfg)
			require.NoError(b, e.Reset(), "reset maps")
			if f.Setup != nil {
				require.NoError(b, f.Setup(e), "fixture setup")
			}
			state, err := snapshotFlows(e)
			require.NoError(b, err, "snapshot flow state")
			b.ResetTimer()
			prog, base, err := timeRuns(e, empty, f, state, b.N)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64((prog-base).Nanoseconds())/float64(b.N), "ns/packet")
			b.ReportMetric(float64(base.Nanoseconds())/float64(b.N), "ns/empty")
		})
	}
}

// timeRuns runs f's packet n times, each once on a fresh copy with the
// flow state put back after it, and returns the kernel's total time for
// the fixture's program and for the empty one.
func timeRuns(e *Env, empty emptyPrograms, f Fixture, state flowState, n int) (prog, base time.Duration, err error) {
	p, err := e.prog(f.Hook)
	if err != nil {
		return 0, 0, err
	}
	none, err := empty.get(p.Type())
	if err != nil {
		return 0, 0, fmt.Errorf("load empty program: %w", err)
	}
	for range n {
		_, d0, err := none.Benchmark(f.Input, 1, nil)
		if err != nil {
			return 0, 0, fmt.Errorf("run empty program: %w", err)
		}
		ret, d, err := p.Benchmark(f.Input, 1, nil)
		if err != nil {
			return 0, 0, fmt.Errorf("run: %w", err)
		}
		if v := f.Hook.verdict(ret); v != f.Verdict {
			return 0, 0, fmt.Errorf("verdict %s, want %s", v, f.Verdict)
		}
		base += d0
		prog += d
		if err := state.restore(); err != nil {
			return 0, 0, fmt.Errorf("restore flow state: %w", err)
		}
	}
	return prog, base, nil
}

// benchSizes keeps the CT maps small, the north-south zone too when on.
func benchSizes(cfg *loader.Config) {
	cfg.CTMapSize = benchCTSize
	if cfg.CTNorthSouthMapSize > 0 {
		cfg.CTNorthSouthMapSize = benchCTSize
	}
}

// benchCTSize keeps the CT map small in benchmarks; fixtures hold a few
// entries.
const benchCTSize = 1024

// emptyPrograms do nothing but return (TC_ACT_OK, XDP_ABORTED: the value
// is never looked at), one per program type, loaded when first asked for.
type emptyPrograms map[ebpf.ProgramType]*ebpf.Program

func (ep emptyPrograms) get(typ ebpf.ProgramType) (*ebpf.Program, error) {
	if p, ok := ep[typ]; ok {
		return p, nil
	}
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "sp_empty",
		Type:         typ,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		return nil, err
	}
	ep[typ] = p
	return p, nil
}

func (ep emptyPrograms) close() {
	for _, p := range ep {
		p.Close()
	}
}

// CountersOf is a readable helper for Fixture.Counters.
func CountersOf(kv ...any) map[string]uint64 {
	out := map[string]uint64{}
	for i := 0; i+1 < len(kv); i += 2 {
		out[kv[i].(string)] = uint64(kv[i+1].(int))
	}
	return out
}
