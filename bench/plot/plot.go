// Package plot writes small, dependency-free SVG charts for benchmark
// reports: line charts (optionally log-scaled axes, error bars) and
// grouped bar charts. Axes, ticks, labels and a legend are always drawn.
package plot

import (
	"fmt"
	"html"
	"io"
	"math"
	"strconv"
	"strings"
)

// Palette colours series in order (Okabe-Ito, readable by colour-blind
// readers).
var Palette = []string{"#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"}

const (
	width, height = 760, 440
	left, right   = 80, 200
	top, bottom   = 50, 60
)

// Point is one measurement; Lo and Hi bound its spread (equal to Y when
// there is none).
type Point struct{ X, Y, Lo, Hi float64 }

// Series is a named line.
type Series struct {
	Name   string
	Points []Point
}

// Line is a line chart.
type Line struct {
	Title, XLabel, YLabel string
	LogX, LogY            bool
	Series                []Series
}

type scale struct {
	min, max float64
	log      bool
	from, to float64 // pixels
}

func (s scale) at(v float64) float64 {
	a, b, x := s.min, s.max, v
	if s.log {
		a, b, x = math.Log10(a), math.Log10(b), math.Log10(v)
	}
	if b == a {
		return (s.from + s.to) / 2
	}
	return s.from + (x-a)/(b-a)*(s.to-s.from)
}

// ticks returns tick values: powers of ten on log axes, 1-2-5 steps on
// linear ones.
func (s scale) ticks() []float64 {
	var out []float64
	if s.log {
		for e := math.Floor(math.Log10(s.min)); e <= math.Ceil(math.Log10(s.max)); e++ {
			if v := math.Pow(10, e); v >= s.min*0.999 && v <= s.max*1.001 {
				out = append(out, v)
			}
		}
		return out
	}
	span := s.max - s.min
	step := math.Pow(10, math.Floor(math.Log10(span/5)))
	for _, m := range []float64{1, 2, 5, 10} {
		if span/(step*m) <= 7 {
			step *= m
			break
		}
	}
	for v := math.Ceil(s.min/step) * step; v <= s.max+step*1e-9; v += step {
		out = append(out, v)
	}
	return out
}

// bounds widens [lo, hi] for display: decades on log axes, zero-based and
// padded on linear ones.
func bounds(lo, hi float64, log bool) (float64, float64) {
	if log {
		return math.Pow(10, math.Floor(math.Log10(lo))), math.Pow(10, math.Ceil(math.Log10(hi)))
	}
	if lo > 0 {
		lo = 0
	}
	if hi == lo {
		hi = lo + 1
	}
	return lo, hi * 1.08
}

// Label formats a tick value compactly: 1k, 50k, 0.5, 1.2M.
func Label(v float64) string {
	a := math.Abs(v)
	switch {
	case a >= 1e6:
		return trim(v/1e6) + "M"
	case a >= 1e3:
		return trim(v/1e3) + "k"
	}
	return trim(v)
}

func trim(v float64) string {
	s := strconv.FormatFloat(v, 'f', 3, 64)
	s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	if s == "-0" {
		return "0"
	}
	return s
}

type svg struct{ b strings.Builder }

func (s *svg) f(format string, args ...any) { fmt.Fprintf(&s.b, format, args...) }

func (s *svg) text(x, y float64, anchor, size, extra, t string) {
	s.f(`<text x="%.1f" y="%.1f" text-anchor="%s" font-size="%s"%s>%s</text>`+"\n", x, y, anchor, size, extra, html.EscapeString(t))
}

func (s *svg) open(title string) {
	s.f(`<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="Helvetica, Arial, sans-serif">`+"\n", width, height, width, height)
	s.f(`<rect width="100%%" height="100%%" fill="white"/>` + "\n")
	s.text(float64(left+(width-left-right)/2), 28, "middle", "16", ` font-weight="bold"`, title)
}

func (s *svg) axes(xs, ys scale, xl, yl string, xTicks []float64, xLabels []string) {
	x0, x1, y0, y1 := float64(left), float64(width-right), float64(height-bottom), float64(top)
	for _, v := range ys.ticks() {
		y := ys.at(v)
		s.f(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", x0, y, x1, y)
		s.text(x0-6, y+4, "end", "12", "", Label(v))
	}
	for i, v := range xTicks {
		x := xs.at(v)
		s.f(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#eee"/>`+"\n", x, y0, x, y1)
		s.text(x, y0+18, "middle", "12", "", xLabels[i])
	}
	s.f(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`+"\n", x0, y0, x1, y0)
	s.f(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`+"\n", x0, y0, x0, y1)
	s.text((x0+x1)/2, float64(height-15), "middle", "13", "", xl)
	s.text(20, (y0+y1)/2, "middle", "13", fmt.Sprintf(` transform="rotate(-90 20 %.1f)"`, (y0+y1)/2), yl)
}

func (s *svg) legend(names []string, marker func(i int, x, y float64)) {
	x := float64(width - right + 15)
	for i, n := range names {
		y := float64(top + 10 + i*22)
		marker(i, x, y)
		s.text(x+28, y+4, "start", "12", "", n)
	}
}

// Write renders the chart. Non-positive values are left out on log axes.
func (l Line) Write(w io.Writer) error {
	xmin, xmax, ymin, ymax := math.Inf(1), math.Inf(-1), math.Inf(1), math.Inf(-1)
	for _, s := range l.Series {
		for _, p := range s.Points {
			if (l.LogX && p.X <= 0) || (l.LogY && p.Lo <= 0) || math.IsNaN(p.Y) {
				continue
			}
			xmin, xmax = math.Min(xmin, p.X), math.Max(xmax, p.X)
			ymin, ymax = math.Min(ymin, math.Min(p.Y, p.Lo)), math.Max(ymax, math.Max(p.Y, p.Hi))
		}
	}
	if math.IsInf(xmin, 0) {
		xmin, xmax, ymin, ymax = 1, 10, 1, 10
	}
	xlo, xhi := xmin, xmax
	if l.LogX {
		xlo, xhi = bounds(xmin, xmax, true)
	} else if xlo == xhi {
		xlo, xhi = xlo-1, xhi+1
	}
	ylo, yhi := bounds(ymin, ymax, l.LogY)
	xs := scale{min: xlo, max: xhi, log: l.LogX, from: left + 10, to: width - right - 10}
	ys := scale{min: ylo, max: yhi, log: l.LogY, from: height - bottom, to: top}
	var s svg
	s.open(l.Title)
	// The measured Xs come first, so their labels win over decade ticks
	// that would overlap them.
	var ticks []float64
	seen := map[float64]bool{}
	for _, se := range l.Series {
		for _, p := range se.Points {
			if !seen[p.X] && (!l.LogX || p.X > 0) {
				seen[p.X] = true
				ticks = append(ticks, p.X)
			}
		}
	}
	for _, t := range xs.ticks() {
		if !seen[t] {
			seen[t] = true
			ticks = append(ticks, t)
		}
	}
	labels := make([]string, len(ticks))
	for i, t := range ticks {
		labels[i] = Label(t)
	}
	// Drop labels that would overlap a neighbour.
	for i := range ticks {
		for j := range i {
			if labels[j] != "" && math.Abs(xs.at(ticks[i])-xs.at(ticks[j])) < 28 {
				labels[i] = ""
			}
		}
	}
	s.axes(xs, ys, l.XLabel, l.YLabel, ticks, labels)
	var names []string
	for i, se := range l.Series {
		c := Palette[i%len(Palette)]
		var pts []string
		for _, p := range se.Points {
			if (l.LogX && p.X <= 0) || (l.LogY && p.Lo <= 0) || math.IsNaN(p.Y) {
				continue
			}
			x, y := xs.at(p.X), ys.at(p.Y)
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", x, y))
			if p.Hi != p.Lo {
				s.f(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s"/>`+"\n", x, ys.at(p.Lo), x, ys.at(p.Hi), c)
				for _, v := range []float64{p.Lo, p.Hi} {
					s.f(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s"/>`+"\n", x-4, ys.at(v), x+4, ys.at(v), c)
				}
			}
			s.f(`<circle cx="%.1f" cy="%.1f" r="3.5" fill="%s"/>`+"\n", x, y, c)
		}
		if len(pts) > 1 {
			s.f(`<polyline points="%s" fill="none" stroke="%s" stroke-width="2"/>`+"\n", strings.Join(pts, " "), c)
		}
		names = append(names, se.Name)
	}
	s.legend(names, func(i int, x, y float64) {
		c := Palette[i%len(Palette)]
		s.f(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="2"/>`+"\n", x, y, x+22, y, c)
		s.f(`<circle cx="%.1f" cy="%.1f" r="3.5" fill="%s"/>`+"\n", x+11, y, c)
	})
	s.f("</svg>\n")
	_, err := io.WriteString(w, s.b.String())
	return err
}

// Bars is a grouped bar chart: one group per category, one bar per series.
type Bars struct {
	Title, YLabel string
	Categories    []string
	Series        []Series // Points[i] belongs to Categories[i]; X unused
}

// Write renders the chart; a NaN value leaves its bar out.
func (b Bars) Write(w io.Writer) error {
	ymax := 0.0
	for _, se := range b.Series {
		for _, p := range se.Points {
			if !math.IsNaN(p.Y) {
				ymax = math.Max(ymax, math.Max(p.Y, p.Hi))
			}
		}
	}
	ylo, yhi := bounds(0, ymax, false)
	ys := scale{min: ylo, max: yhi, from: height - bottom, to: top}
	var s svg
	s.open(b.Title)
	n := len(b.Categories)
	groupW := float64(width-left-right) / float64(max(n, 1))
	xs := scale{min: 0, max: float64(max(n, 1)), from: left, to: width - right}
	s.axes(ys0(xs), ys, "", b.YLabel, nil, nil)
	for i, cat := range b.Categories {
		cx := left + groupW*(float64(i)+0.5)
		for k, line := range wrap(cat, 22) {
			s.text(cx, float64(height-bottom+16+14*k), "middle", "11", "", line)
		}
	}
	barW := groupW * 0.8 / float64(max(len(b.Series), 1))
	var names []string
	for j, se := range b.Series {
		c := Palette[j%len(Palette)]
		for i, p := range se.Points {
			if i >= n || math.IsNaN(p.Y) {
				continue
			}
			x := left + groupW*float64(i) + groupW*0.1 + barW*float64(j)
			y := ys.at(p.Y)
			s.f(`<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"/>`+"\n", x, y, barW-2, ys.at(0)-y, c)
			if p.Hi != p.Lo {
				mx := x + (barW-2)/2
				s.f(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`+"\n", mx, ys.at(p.Lo), mx, ys.at(p.Hi))
			}
			s.text(x+(barW-2)/2, y-4, "middle", "10", "", Label(p.Y))
		}
		names = append(names, se.Name)
	}
	s.legend(names, func(i int, x, y float64) {
		s.f(`<rect x="%.1f" y="%.1f" width="22" height="10" fill="%s"/>`+"\n", x, y-5, Palette[i%len(Palette)])
	})
	s.f("</svg>\n")
	_, err := io.WriteString(w, s.b.String())
	return err
}

// ys0 is the x scale of a bar chart, which draws no x ticks.
func ys0(s scale) scale { return s }

// wrap splits s into lines of at most n characters at spaces.
func wrap(s string, n int) []string {
	var out []string
	line := ""
	for _, w := range strings.Fields(s) {
		if line != "" && len(line)+1+len(w) > n {
			out = append(out, line)
			line = w
			continue
		}
		if line != "" {
			line += " "
		}
		line += w
	}
	return append(out, line)
}
