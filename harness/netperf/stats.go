package netperf

import (
	"slices"
	"time"

	"github.com/servicepath/servicepath/harness/stats"
)

// Summary describes a set of samples.
type Summary struct {
	N                       int
	Min, P50, P90, P99, Max float64
	Mean                    float64
}

// Summarize sorts a copy of xs and reports its percentiles (stats.Percentile).
func Summarize(xs []float64) Summary {
	if len(xs) == 0 {
		return Summary{}
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	sum := 0.0
	for _, x := range s {
		sum += x
	}
	return Summary{
		N: len(s), Min: s[0], Max: s[len(s)-1], Mean: sum / float64(len(s)),
		P50: stats.Percentile(s, 50), P90: stats.Percentile(s, 90), P99: stats.Percentile(s, 99),
	}
}

// Micros converts durations to microseconds.
func Micros(ds []time.Duration) []float64 {
	out := make([]float64, len(ds))
	for i, d := range ds {
		out[i] = float64(d.Nanoseconds()) / 1e3
	}
	return out
}
