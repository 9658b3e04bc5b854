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
)

// Fixture is one row of a packet table.
type Fixture struct {
	Name string
	// Config adjusts the load-time settings; fixtures sharing settings
	// share one loaded datapath.
	Config func(*loader.Config)
	// Setup programs services and may inject earlier packets of a flow.
	Setup   func(e *Env) error
	Hook    Hook
	Input   []byte
	Verdict Verdict
	// Output is the expected packet; nil means the input, unchanged.
	Output []byte
	// Counters that must have grown by exactly these amounts.
	Counters map[string]uint64
	// Check makes further assertions on the maps after the packet.
	Check func(t testing.TB, e *Env)
}

func (f Fixture) config() loader.Config {
	cfg := loader.DefaultConfig()
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
			e := envs.get(t, f.config())
			require.NoError(t, e.Reset(), "reset maps")
			if f.Setup != nil {
				require.NoError(t, f.Setup(e), "fixture setup")
			}
			before, err := e.Counters()
			require.NoError(t, err, "read counters before")

			verdict, out, err := e.Inject(f.Hook, f.Input)
			require.NoError(t, err, "inject")
			assert.Equal(t, f.Verdict, verdict, "verdict")

			want := f.Output
			if want == nil {
				want = f.Input
			}
			if d := packet.Diff(want, out); d != "" {
				t.Errorf("output packet differs from expected: %s", d)
			}
			if verdict != Shot && string(out) != string(f.Input) {
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
// is dominated by the kernel's own timing overhead, so an empty tc program
// is timed alongside and subtracted: ns/packet is the fixture's program
// less the empty one, ns/empty what was subtracted.
func Bench(b *testing.B, fixtures []Fixture) {
	envs := envCache{}
	b.Cleanup(envs.close)
	empty, err := emptyProgram()
	require.NoError(b, err, "load empty program")
	b.Cleanup(func() { empty.Close() })
	for _, f := range fixtures {
		b.Run(f.Name, func(b *testing.B) {
			cfg := f.config()
			// Restoring flow state walks the CT map's buckets every run.
			cfg.CTMapSize = benchCTSize
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
func timeRuns(e *Env, empty *ebpf.Program, f Fixture, state flowState, n int) (prog, base time.Duration, err error) {
	for range n {
		_, d0, err := empty.Benchmark(f.Input, 1, nil)
		if err != nil {
			return 0, 0, fmt.Errorf("run empty program: %w", err)
		}
		ret, d, err := e.prog(f.Hook).Benchmark(f.Input, 1, nil)
		if err != nil {
			return 0, 0, fmt.Errorf("run: %w", err)
		}
		if Verdict(ret) != f.Verdict {
			return 0, 0, fmt.Errorf("verdict %s, want %s", Verdict(ret), f.Verdict)
		}
		base += d0
		prog += d
		if err := state.restore(); err != nil {
			return 0, 0, fmt.Errorf("restore flow state: %w", err)
		}
	}
	return prog, base, nil
}

// benchCTSize keeps the CT map small in benchmarks; fixtures hold a few
// entries.
const benchCTSize = 1024

// emptyProgram returns TC_ACT_OK and does nothing else.
func emptyProgram() (*ebpf.Program, error) {
	return ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "sp_empty",
		Type:         ebpf.SchedCLS,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
}

// CountersOf is a readable helper for Fixture.Counters.
func CountersOf(kv ...any) map[string]uint64 {
	out := map[string]uint64{}
	for i := 0; i+1 < len(kv); i += 2 {
		out[kv[i].(string)] = uint64(kv[i+1].(int))
	}
	return out
}
