package inject

import (
	"fmt"

	"github.com/servicepath/servicepath/datapath/loader"
)

// Timing is one fixture's cost as Measure saw it.
type Timing struct {
	Name string
	// PacketNs is the fixture's program less the empty program, per run;
	// EmptyNs is what was subtracted.
	PacketNs, EmptyNs float64
	Runs              int
}

// MeasureOptions adjust Measure.
type MeasureOptions struct {
	// Runs per fixture.
	Runs int
	// Config adjusts every fixture's load-time settings after the
	// fixture's own (map sizes, for example).
	Config func(*loader.Config)
	// Prepare runs after the maps are reset and before the fixture's
	// Setup: for example, to program N other services first.
	Prepare func(*Env) error
}

// Measure is Bench for programs that are not tests (the bench driver): the
// same per-run method (a fresh copy of the input each run, flow state put
// back, the empty program's time subtracted), with a Prepare step so a
// fixture can be timed with the maps already holding other state.
func Measure(fixtures []Fixture, o MeasureOptions) ([]Timing, error) {
	if o.Runs <= 0 {
		return nil, fmt.Errorf("runs %d", o.Runs)
	}
	empty := emptyPrograms{}
	defer empty.close()
	envs := map[loader.Config]*Env{}
	defer func() {
		for _, e := range envs {
			e.Close()
		}
	}()
	var out []Timing
	for _, f := range fixtures {
		cfg := f.config()
		benchSizes(&cfg)
		if o.Config != nil {
			o.Config(&cfg)
		}
		e, ok := envs[cfg]
		if !ok {
			var err error
			if e, err = NewEnv(cfg); err != nil {
				return nil, fmt.Errorf("%s: load datapath: %w", f.Name, err)
			}
			envs[cfg] = e
		}
		if err := e.Reset(); err != nil {
			return nil, fmt.Errorf("%s: reset maps: %w", f.Name, err)
		}
		if o.Prepare != nil {
			if err := o.Prepare(e); err != nil {
				return nil, fmt.Errorf("%s: prepare: %w", f.Name, err)
			}
		}
		if f.Setup != nil {
			if err := f.Setup(e); err != nil {
				return nil, fmt.Errorf("%s: fixture setup: %w", f.Name, err)
			}
		}
		state, err := snapshotFlows(e)
		if err != nil {
			return nil, fmt.Errorf("%s: snapshot flow state: %w", f.Name, err)
		}
		prog, base, err := timeRuns(e, empty, f, state, o.Runs)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f.Name, err)
		}
		out = append(out, Timing{
			Name:     f.Name,
			PacketNs: float64((prog - base).Nanoseconds()) / float64(o.Runs),
			EmptyNs:  float64(base.Nanoseconds()) / float64(o.Runs),
			Runs:     o.Runs,
		})
	}
	return out, nil
}
