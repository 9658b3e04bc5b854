package bench

import (
	"fmt"
	"time"
)

// Profile is how big and how long a run is. BENCH=quick|full|smoke picks
// one.
type Profile struct {
	Name string
	// Ns are the service counts, ascending.
	Ns []int
	// Rounds of new-connection latency; every contender runs once per
	// round, in a shuffled order, so noise hits them alike.
	Rounds int
	// Samples per contender per round, after Warmup unrecorded ones.
	Samples, Warmup int
	// UpdateRepeats of each control-plane operation (add, change, remove).
	UpdateRepeats int
	// LoadRepeats of the from-scratch load, made only while they fit in a
	// quarter of LoadBudget.
	LoadRepeats int
	// LoadBudget bounds one from-scratch load; a contender whose load
	// exceeds it, or is projected to, is not run at larger N.
	LoadBudget time.Duration
	// BPFRuns per fixture per repeat, BPFRepeats repeats.
	BPFRuns, BPFRepeats int
	// Pod networking: repeats of each path, stream duration, RR samples.
	PodRepeats     int
	StreamDuration time.Duration
	RRSamples      int
}

// Profiles by name.
var Profiles = map[string]Profile{
	"smoke": {
		Name: "smoke", Ns: []int{1, 50}, Rounds: 2, Samples: 50, Warmup: 10,
		UpdateRepeats: 1, LoadRepeats: 1, LoadBudget: 20 * time.Second,
		BPFRuns: 200, BPFRepeats: 1,
		PodRepeats: 1, StreamDuration: 300 * time.Millisecond, RRSamples: 500,
	},
	"quick": {
		Name: "quick", Ns: []int{1, 1000, 10000, 100000}, Rounds: 5, Samples: 1000, Warmup: 50,
		UpdateRepeats: 3, LoadRepeats: 3, LoadBudget: 100 * time.Second,
		BPFRuns: 2000, BPFRepeats: 3,
		PodRepeats: 3, StreamDuration: 2 * time.Second, RRSamples: 20000,
	},
	"full": {
		Name: "full", Ns: []int{1, 1000, 5000, 10000, 20000, 50000, 100000}, Rounds: 10, Samples: 2000, Warmup: 100,
		UpdateRepeats: 5, LoadRepeats: 5, LoadBudget: 30 * time.Minute,
		BPFRuns: 10000, BPFRepeats: 5,
		PodRepeats: 5, StreamDuration: 10 * time.Second, RRSamples: 100000,
	},
}

// ProfileByName returns the named profile.
func ProfileByName(name string) (Profile, error) {
	p, ok := Profiles[name]
	if !ok {
		return Profile{}, fmt.Errorf("profile %q: want quick, full or smoke", name)
	}
	return p, nil
}

// MaxN is the largest service count of the profile.
func (p Profile) MaxN() int { return p.Ns[len(p.Ns)-1] }
