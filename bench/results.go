package bench

import (
	"math"
	"slices"
)

// Results is everything one run measured, as written to results.json.
type Results struct {
	Stamp      Stamp              `json:"stamp"`
	Settings   Profile            `json:"settings"`
	CPU        int                `json:"pinned_cpu"`
	Contenders []ContenderInfo    `json:"contenders"`
	Connect    []ConnectResult    `json:"connect"`
	Control    []ControlResult    `json:"control"`
	BPF        []BPFResult        `json:"bpf"`
	Pod        []PodResult        `json:"pod_network"`
	Notes      []string           `json:"notes"`
	Phases     map[string]float64 `json:"phase_seconds"`
	WallSecs   float64            `json:"wall_seconds"`
}

// ContenderInfo describes a contender in the results.
type ContenderInfo struct {
	Name     string `json:"name"`
	Describe string `json:"describe"`
	Pending  string `json:"pending,omitempty"`
}

// Spread is the median of repeated measurements with their range.
type Spread struct {
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	N      int     `json:"n"`
}

// SpreadOf summarizes repeats; NaN-free input expected.
func SpreadOf(xs []float64) Spread {
	if len(xs) == 0 {
		return Spread{Median: math.NaN(), Min: math.NaN(), Max: math.NaN()}
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	m := s[len(s)/2]
	if len(s)%2 == 0 {
		m = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return Spread{Median: m, Min: s[0], Max: s[len(s)-1], N: len(s)}
}

// Round is one contender's share of one latency round.
type Round struct {
	P50        float64   `json:"p50_us"`
	P90        float64   `json:"p90_us"`
	P99        float64   `json:"p99_us"`
	ConnPerSec float64   `json:"conn_per_s"`
	SamplesUs  []float64 `json:"samples_us"`
}

// ConnectResult is new-connection latency for one contender at one N.
type ConnectResult struct {
	Contender  string  `json:"contender"`
	N          int     `json:"n"`
	Skipped    string  `json:"skipped,omitempty"`
	Rounds     []Round `json:"rounds,omitempty"`
	P50        Spread  `json:"p50_us"`
	P90        Spread  `json:"p90_us"`
	P99        Spread  `json:"p99_us"`
	ConnPerSec Spread  `json:"conn_per_s"`
	// RatioP50 is this contender's median p50 over the floor's, same run.
	RatioP50 float64 `json:"ratio_p50_to_floor,omitempty"`
	// Programs is what each of a BPF contender's programs cost per run in
	// a round of its own with the kernel's run-time stats on.
	Programs []ProgramCost `json:"bpf_programs,omitempty"`
}

// ProgramCost is one BPF program's kernel run-time stats over a round of
// connections: the real per-packet (or per-call) cost, where
// BPF_PROG_TEST_RUN times a fixture packet in isolation.
type ProgramCost struct {
	Program     string  `json:"program"`
	RunsPerConn float64 `json:"runs_per_connection"`
	NsPerRun    float64 `json:"ns_per_run"`
}

// NsPerConn is the BPF time one connection costs, every program summed.
func (c ConnectResult) NsPerConn() float64 {
	var sum float64
	for _, p := range c.Programs {
		sum += p.RunsPerConn * p.NsPerRun
	}
	return sum
}

// ControlResult is one control-plane operation for one contender at one N.
type ControlResult struct {
	Contender string    `json:"contender"`
	N         int       `json:"n"`
	Op        Op        `json:"op"`
	Skipped   string    `json:"skipped,omitempty"`
	SamplesMs []float64 `json:"samples_ms,omitempty"`
	Ms        Spread    `json:"ms"`
}

// BPFResult is one fixture row's cost at one N.
type BPFResult struct {
	N           int       `json:"n"`
	Fixture     string    `json:"fixture"`
	Describe    string    `json:"describe"`
	RepeatsNs   []float64 `json:"repeats_ns_per_packet"`
	NsPerPacket Spread    `json:"ns_per_packet"`
	EmptyNs     float64   `json:"empty_program_ns"`
	Runs        int       `json:"runs_per_repeat"`
}

// PodResult is one pod-networking path.
type PodResult struct {
	Path       string         `json:"path"`
	Describe   string         `json:"describe"`
	Pending    string         `json:"pending,omitempty"`
	Streams    []StreamRepeat `json:"streams,omitempty"`
	RRs        []Round        `json:"rr,omitempty"`
	Gbps       Spread         `json:"gbps"`
	CPUUsPerMB Spread         `json:"cpu_us_per_mb"`
	Receive    []string       `json:"receive,omitempty"`
	RRMin      Spread         `json:"rr_min_us"`
	RRP50      Spread         `json:"rr_p50_us"`
	RRP90      Spread         `json:"rr_p90_us"`
	RRP99      Spread         `json:"rr_p99_us"`
	// Ratios to the host baseline, same run.
	RatioGbps  float64 `json:"ratio_gbps_to_host,omitempty"`
	RatioRRP50 float64 `json:"ratio_rr_p50_to_host,omitempty"`
	RatioRRP99 float64 `json:"ratio_rr_p99_to_host,omitempty"`
}

// StreamRepeat is one stream run's numbers.
type StreamRepeat struct {
	Gbps          float64 `json:"gbps"`
	CPUUsPerMB    float64 `json:"cpu_us_per_mb"`
	Bytes         int64   `json:"bytes"`
	MappedBytes   int64   `json:"zerocopy_bytes"`
	CopiedBytes   int64   `json:"read_bytes"`
	Receive       string  `json:"receive"`
	SenderCPUus   int64   `json:"sender_cpu_us"`
	ReceiverCPUus int64   `json:"receiver_cpu_us"`
}

// Connect returns the result for contender at n, or nil.
func (r *Results) ConnectAt(contender string, n int) *ConnectResult {
	for i := range r.Connect {
		if r.Connect[i].Contender == contender && r.Connect[i].N == n {
			return &r.Connect[i]
		}
	}
	return nil
}

// ControlAt returns the result for contender, n and op, or nil.
func (r *Results) ControlAt(contender string, n int, op Op) *ControlResult {
	for i := range r.Control {
		c := &r.Control[i]
		if c.Contender == contender && c.N == n && c.Op == op {
			return c
		}
	}
	return nil
}
