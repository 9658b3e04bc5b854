// Package stats gives tests statistical bounds, so load-balancing tests
// assert "spread evenly, within chance" instead of exact counts.
package stats

import "math"

// ChiSquareUniform is Pearson's goodness-of-fit statistic of counts against
// an even spread over len(counts) bins, with df = len(counts)-1. With no
// observations stat is NaN, which fails every comparison.
func ChiSquareUniform(counts []int) (stat float64, df int) {
	if len(counts) < 2 {
		return 0, 0
	}
	total := 0
	for _, c := range counts {
		total += c
	}
	if total == 0 {
		return math.NaN(), len(counts) - 1
	}
	expected := float64(total) / float64(len(counts))
	for _, c := range counts {
		d := float64(c) - expected
		stat += d * d / expected
	}
	return stat, len(counts) - 1
}

// ChiSquareCritical returns x with P(X > x) = alpha for X ~ chi-square(df),
// by inverting the exact survival function. Invalid arguments give NaN.
func ChiSquareCritical(df int, alpha float64) float64 {
	if df < 1 || !(alpha > 0 && alpha < 1) {
		return math.NaN()
	}
	lo, hi := 0.0, float64(df)+1
	for chiSquareSurvival(df, hi) > alpha {
		lo, hi = hi, 2*hi
	}
	// The survival function is monotone, so bisection converges; 100
	// halvings reach float64 resolution for any bracket reached above.
	for range 100 {
		mid := (lo + hi) / 2
		if chiSquareSurvival(df, mid) > alpha {
			lo = mid
		} else {
			hi = mid
		}
	}
	return (lo + hi) / 2
}

// chiSquareSurvival is P(X > x) = Q(df/2, x/2), the regularized upper
// incomplete gamma function.
func chiSquareSurvival(df int, x float64) float64 {
	if x <= 0 {
		return 1
	}
	return gammaQ(float64(df)/2, x/2)
}

// gammaQ computes Q(a, x) by the power series below a+1 and the continued
// fraction above it, where each converges fast (Numerical Recipes 6.2).
func gammaQ(a, x float64) float64 {
	lg, _ := math.Lgamma(a)
	prefix := math.Exp(a*math.Log(x) - x - lg)
	if x < a+1 {
		sum, term := 1/a, 1/a
		for n := 1; n < 1000; n++ {
			term *= x / (a + float64(n))
			sum += term
			if math.Abs(term) < math.Abs(sum)*1e-16 {
				break
			}
		}
		return 1 - sum*prefix
	}
	// Modified Lentz evaluation of the continued fraction.
	const tiny = 1e-300
	b := x + 1 - a
	c := 1 / tiny
	d := 1 / b
	h := d
	for i := 1; i < 1000; i++ {
		an := -float64(i) * (float64(i) - a)
		b += 2
		d = an*d + b
		if math.Abs(d) < tiny {
			d = tiny
		}
		c = b + an/c
		if math.Abs(c) < tiny {
			c = tiny
		}
		d = 1 / d
		delta := d * c
		h *= delta
		if math.Abs(delta-1) < 1e-16 {
			break
		}
	}
	return prefix * h
}

// SpreadAlpha is the significance level for "connections spread over the
// backends" checks. Suites run dozens of such checks, so a fair spread must
// almost never fail one (at 1e-6 it fails once in a million); a real skew,
// such as every flow on one backend, still exceeds the bound many times
// over at the sample sizes used.
const SpreadAlpha = 1e-6
