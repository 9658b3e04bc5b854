// Package stats gives tests statistical bounds, so load-balancing tests
// assert "spread evenly, within chance" instead of exact counts, and
// gives benchmarks and scenarios one definition of a percentile.
package stats

import (
	"math"

	"gonum.org/v1/gonum/stat"
	"gonum.org/v1/gonum/stat/distuv"
)

// ChiSquareUniform is Pearson's goodness-of-fit statistic of counts against
// an even spread over len(counts) bins, with df = len(counts)-1. With no
// observations stat is NaN, which fails every comparison.
func ChiSquareUniform(counts []int) (statistic float64, df int) {
	if len(counts) < 2 {
		return 0, 0
	}
	observed := make([]float64, len(counts))
	total := 0.0
	for i, c := range counts {
		observed[i] = float64(c)
		total += observed[i]
	}
	if total == 0 {
		return math.NaN(), len(counts) - 1
	}
	expected := make([]float64, len(counts))
	for i := range expected {
		expected[i] = total / float64(len(counts))
	}
	return stat.ChiSquare(observed, expected), len(counts) - 1
}

// ChiSquareCritical returns x with P(X > x) = alpha for X ~ chi-square(df).
// Invalid arguments give NaN.
func ChiSquareCritical(df int, alpha float64) float64 {
	if df < 1 || !(alpha > 0 && alpha < 1) {
		return math.NaN()
	}
	return distuv.ChiSquared{K: float64(df)}.Quantile(1 - alpha)
}

// SpreadAlpha is the significance level for "connections spread over the
// backends" checks. Suites run dozens of such checks, so a fair spread must
// almost never fail one (at 1e-6 it fails once in a million); a real skew,
// such as every flow on one backend, still exceeds the bound many times
// over at the sample sizes used.
const SpreadAlpha = 1e-6

// Percentile of sorted xs, p in [0, 100], interpolating linearly between
// closest ranks (numpy's default, R's type 7), NaN without samples.
// Written here because gonum's stat.Quantile offers only the empirical
// inverse and its type-4 interpolation, whose median of {1, 2} is 1.
func Percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	r := p / 100 * float64(len(sorted)-1)
	lo := int(math.Floor(r))
	hi := int(math.Ceil(r))
	if hi >= len(sorted) {
		return sorted[len(sorted)-1]
	}
	return sorted[lo] + (sorted[hi]-sorted[lo])*(r-float64(lo))
}
