package maglev

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func names(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("10.0.%d.%d:8080", i/250, i%250+1)
	}
	return out
}

func shares(table []int, n int) []int {
	c := make([]int, n)
	for _, b := range table {
		c[b]++
	}
	return c
}

// moved is the share of slots whose backend changed, comparing backends
// by name.
func moved(before, after []int, namesBefore, namesAfter []string) float64 {
	n := 0
	for i := range before {
		if namesBefore[before[i]] != namesAfter[after[i]] {
			n++
		}
	}
	return float64(n) / float64(len(before))
}

func TestBalanced(t *testing.T) {
	for _, m := range []int{Small, Large} {
		for _, n := range []int{1, 3, 10, 100} {
			table, err := Build(names(n), m)
			require.NoError(t, err, "build m=%d n=%d", m, n)
			for b, c := range shares(table, n) {
				// Maglev's turns keep every share within one slot of
				// the others until the table is full.
				assert.InDelta(t, float64(m)/float64(n), float64(c), float64(m)/float64(n)*0.02+1,
					"m=%d n=%d: backend %d has %d slots", m, n, b, c)
			}
		}
	}
}

// Removing or adding one of n backends moves close to the minimal 1/n
// (or 1/(n+1)) share of the slots: that much must move, and at most one
// percent of all slots more does (Maglev trades a little disruption for
// balance; the excess shrinks as m/n grows, so m should exceed 100 n).
func TestMinimalDisruption(t *testing.T) {
	for _, tc := range []struct{ n, m int }{{3, Small}, {10, Small}, {50, Large}, {100, Large}} {
		n := tc.n
		all := names(n + 1)
		before, err := Build(all[:n], tc.m)
		require.NoError(t, err, "build %d", n)

		fewer := append(append([]string(nil), all[:n/2]...), all[n/2+1:n]...)
		after, err := Build(fewer, tc.m)
		require.NoError(t, err, "build without one")
		got := moved(before, after, all[:n], fewer)
		t.Logf("n=%d: removing one backend moved %.2f%% of slots (minimum %.2f%%)", n, got*100, 100/float64(n))
		assert.GreaterOrEqual(t, got, 1/float64(n)*0.98, "n=%d: at least the removed backend's slots move", n)
		assert.LessOrEqual(t, got-1/float64(n), 0.01, "n=%d: removal moves close to the minimal share", n)

		grown, err := Build(all, tc.m)
		require.NoError(t, err, "build with one more")
		got = moved(before, grown, all[:n], all)
		t.Logf("n=%d: adding one backend moved %.2f%% of slots (minimum %.2f%%)", n, got*100, 100/float64(n+1))
		assert.GreaterOrEqual(t, got, 1/float64(n+1)*0.98, "n=%d: the new backend takes its share", n)
		assert.LessOrEqual(t, got-1/float64(n+1), 0.01, "n=%d: addition moves close to the minimal share", n)
	}
}

func TestDeterministic(t *testing.T) {
	a, err := Build(names(7), Small)
	require.NoError(t, err, "build")
	b, err := Build(names(7), Small)
	require.NoError(t, err, "build again")
	assert.Equal(t, a, b, "the same backends give the same table, in any process")
}

func TestBadInput(t *testing.T) {
	for _, tc := range []struct {
		name     string
		backends []string
		m        int
		want     string
	}{
		{"not prime", names(3), 16384, "not a prime"},
		{"no backends", nil, Small, "at least one backend"},
		{"too many", names(10), 7, "do not fit"},
		{"duplicate", []string{"a", "a"}, Small, "listed twice"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Build(tc.backends, tc.m)
			require.Error(t, err, "refused")
			assert.Contains(t, err.Error(), tc.want, "the error says why")
		})
	}
}

func BenchmarkBuild(b *testing.B) {
	for _, m := range []int{Small, Large} {
		b.Run(fmt.Sprint(m), func(b *testing.B) {
			n := names(100)
			for range b.N {
				if _, err := Build(n, m); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
