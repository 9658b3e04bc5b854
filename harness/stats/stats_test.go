package stats

import (
	"math"
	"testing"
)

func TestChiSquareCritical(t *testing.T) {
	// Values from standard chi-square tables (NIST/SEMATECH).
	cases := []struct {
		df    int
		alpha float64
		want  float64
	}{
		{1, 0.05, 3.841},
		{1, 0.001, 10.828},
		{2, 0.001, 13.816},
		{3, 0.01, 11.345},
		{4, 0.001, 18.467},
		{10, 0.05, 18.307},
		{30, 0.001, 59.703},
		{100, 0.05, 124.342},
	}
	for _, c := range cases {
		got := ChiSquareCritical(c.df, c.alpha)
		if math.Abs(got-c.want) > 0.001 {
			t.Errorf("ChiSquareCritical(%d, %g) = %.4f, want %.3f", c.df, c.alpha, got, c.want)
		}
	}
}

func TestChiSquareCriticalInvalid(t *testing.T) {
	for _, c := range []struct {
		df    int
		alpha float64
	}{{0, 0.05}, {2, 0}, {2, 1}, {2, math.NaN()}} {
		if got := ChiSquareCritical(c.df, c.alpha); !math.IsNaN(got) {
			t.Errorf("ChiSquareCritical(%d, %g) = %g, want NaN", c.df, c.alpha, got)
		}
	}
}

func TestChiSquareUniform(t *testing.T) {
	cases := []struct {
		counts []int
		stat   float64
		df     int
	}{
		{[]int{10, 10, 10}, 0, 2},
		{[]int{20, 0}, 20, 1},
		{[]int{30, 20, 10}, 10, 2},
		{[]int{7}, 0, 0},
	}
	for _, c := range cases {
		stat, df := ChiSquareUniform(c.counts)
		if math.Abs(stat-c.stat) > 1e-9 || df != c.df {
			t.Errorf("ChiSquareUniform(%v) = %g, %d; want %g, %d", c.counts, stat, df, c.stat, c.df)
		}
	}
	if stat, _ := ChiSquareUniform([]int{0, 0}); !math.IsNaN(stat) {
		t.Errorf("no observations: stat = %g, want NaN", stat)
	}
}

// A skewed spread must exceed the critical value that an even one stays under.
func TestChiSquareDecision(t *testing.T) {
	crit := ChiSquareCritical(2, 0.001)
	if stat, _ := ChiSquareUniform([]int{340, 330, 330}); stat > crit {
		t.Errorf("even spread rejected: %g > %g", stat, crit)
	}
	if stat, _ := ChiSquareUniform([]int{500, 250, 250}); stat <= crit {
		t.Errorf("skewed spread accepted: %g <= %g", stat, crit)
	}
}

func TestPercentile(t *testing.T) {
	xs := []float64{1, 2, 3, 4, 5}
	for _, c := range []struct{ p, want float64 }{{0, 1}, {50, 3}, {90, 4.6}, {99, 4.96}, {100, 5}} {
		if got := Percentile(xs, c.p); math.Abs(got-c.want) > 1e-9 {
			t.Errorf("Percentile(1..5, %g) = %g, want %g", c.p, got, c.want)
		}
	}
	if got := Percentile([]float64{1, 2}, 50); got != 1.5 {
		t.Errorf("median of {1, 2} = %g, want 1.5", got)
	}
	if got := Percentile([]float64{7}, 99); got != 7 {
		t.Errorf("one sample is every percentile: got %g", got)
	}
	if got := Percentile(nil, 50); !math.IsNaN(got) {
		t.Errorf("no samples: got %g, want NaN", got)
	}
}
