package plot

import (
	"encoding/xml"
	"math"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestLabel(t *testing.T) {
	for v, want := range map[float64]string{1: "1", 1000: "1k", 50000: "50k", 100000: "100k", 2.5e6: "2.5M", 0.5: "0.5", 0: "0", 12.25: "12.25"} {
		assert.Equal(t, want, Label(v), "label of %v", v)
	}
}

func TestTicks(t *testing.T) {
	assert.Equal(t, []float64{1, 10, 100, 1000, 10000, 100000}, scale{min: 1, max: 1e5, log: true}.ticks(), "decades on a log axis")
	assert.Equal(t, []float64{0, 20, 40, 60, 80, 100}, scale{min: 0, max: 100}.ticks(), "1-2-5 steps on a linear axis")
	lo, hi := bounds(3, 70000, true)
	assert.Equal(t, []float64{1, 100000}, []float64{lo, hi}, "log bounds widen to decades")
}

func wellFormed(t *testing.T, s string) {
	d := xml.NewDecoder(strings.NewReader(s))
	for {
		_, err := d.Token()
		if err != nil {
			require.Equal(t, "EOF", err.Error(), "SVG is well-formed XML")
			return
		}
	}
}

func TestLineAndBarsRender(t *testing.T) {
	var b strings.Builder
	l := Line{Title: "latency <p50>", XLabel: "services", YLabel: "us", LogX: true, Series: []Series{
		{Name: "a", Points: []Point{{1, 10, 9, 11}, {1000, 12, 12, 12}, {50000, 13, 12, 15}}},
		{Name: "b & c", Points: []Point{{1, 20, 20, 20}, {1000, math.NaN(), 0, 0}}},
	}}
	require.NoError(t, l.Write(&b), "render line chart")
	out := b.String()
	wellFormed(t, out)
	assert.Contains(t, out, "latency &lt;p50&gt;", "title escaped")
	assert.Contains(t, out, ">50k<", "measured N labelled on the axis")
	assert.Contains(t, out, "b &amp; c", "legend escaped")
	assert.Equal(t, 1, strings.Count(out, "<polyline"), "series with one drawable point get no line")

	b.Reset()
	bars := Bars{Title: "throughput", YLabel: "Gbit/s", Categories: []string{"host baseline", "veth + upper-stack forwarding"},
		Series: []Series{{Name: "Gbit/s", Points: []Point{{Y: 10, Lo: 9, Hi: 11}, {Y: 8, Lo: 8, Hi: 8}}}}}
	require.NoError(t, bars.Write(&b), "render bar chart")
	wellFormed(t, b.String())
	assert.Equal(t, 2+1, strings.Count(b.String(), "<rect")-1, "two bars, one legend swatch, plus the background")
}
