package netperf

import (
	"math"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/harness/topology"
)

func TestSummarize(t *testing.T) {
	xs := []float64{5, 1, 4, 2, 3}
	s := Summarize(xs)
	assert.Equal(t, Summary{N: 5, Min: 1, Max: 5, Mean: 3, P50: 3, P90: 4.6, P99: 4.96}, roundSummary(s), "summary of 1..5")
	assert.Equal(t, []float64{5, 1, 4, 2, 3}, xs, "input left unsorted")
	assert.Equal(t, Summary{}, Summarize(nil), "empty input")
	assert.Equal(t, []float64{1.5, 1000}, Micros([]time.Duration{1500 * time.Nanosecond, time.Millisecond}), "to microseconds")
}

func roundSummary(s Summary) Summary {
	r := func(x float64) float64 { return math.Round(x*1e6) / 1e6 }
	return Summary{N: s.N, Min: r(s.Min), Max: r(s.Max), Mean: r(s.Mean), P50: r(s.P50), P90: r(s.P90), P99: r(s.P99)}
}

func TestStreamResultArithmetic(t *testing.T) {
	r := StreamResult{Sink: SinkResult{Bytes: 1e9, Elapsed: time.Second, CPU: 300 * time.Millisecond}, SenderCPU: 700 * time.Millisecond}
	assert.InDelta(t, 8.0, r.Gbps(), 1e-9, "1 GB in 1 s is 8 Gbit/s")
	assert.InDelta(t, 1000.0, r.CPUMicrosPerMB(), 1e-9, "1 s of CPU for 1000 MB is 1000 us/MB")
	assert.Zero(t, StreamResult{}.Gbps(), "no time, no rate")
}

// TestAcrossPods runs each measurement once, briefly, pod to pod through
// the node: it checks that they complete and count right, not how fast.
func TestAcrossPods(t *testing.T) {
	topo := topology.NewForTest(t, topology.Spec{Name: "np", Pods: []topology.PodSpec{{Name: "a"}, {Name: "b"}}})
	a, b := topo.Pod("a"), topo.Pod("b")

	crr, err := Listen(b, 0, 0, CRR, 64)
	require.NoError(t, err, "CRR server")
	t.Cleanup(func() { assert.NoError(t, crr.Close(), "close CRR server") })
	l, err := RunCRR(a, crr.Addr(b.IPv4), CRROptions{CPU: 0, Warmup: 5, N: 50})
	require.NoError(t, err, "CRR run")
	assert.Len(t, l.Samples, 50, "one sample per transaction")
	assert.Positive(t, l.PerSecond(), "a rate")

	l, err = RunCRR(a, crr.Addr(b.IPv6), CRROptions{CPU: 0, N: 10})
	require.NoError(t, err, "CRR over IPv6")
	assert.Len(t, l.Samples, 10, "IPv6 samples")

	rr, err := Listen(b, 0, 0, RR, 1)
	require.NoError(t, err, "RR server")
	t.Cleanup(func() { assert.NoError(t, rr.Close(), "close RR server") })
	l, err = RunRR(a, rr.Addr(b.IPv4), RROptions{CPU: 0, Warmup: 10, N: 200})
	require.NoError(t, err, "RR run")
	assert.Len(t, l.Samples, 200, "one sample per request")

	s, err := Listen(b, 0, 0, Sink, 0)
	require.NoError(t, err, "sink server")
	t.Cleanup(func() { assert.NoError(t, s.Close(), "close sink") })
	res, err := RunStream(a, s, s.Addr(b.IPv4), StreamOptions{CPU: 0, Duration: 200 * time.Millisecond})
	require.NoError(t, err, "stream run")
	assert.Positive(t, res.Sink.Bytes, "bytes received")
	assert.Equal(t, res.Sink.Bytes, res.Sink.Mapped+res.Sink.Copied, "every byte either mapped or copied")
	assert.NotEmpty(t, res.Sink.Receive, "receive method recorded")
	assert.Positive(t, res.Gbps(), "throughput")
	t.Logf("stream: %.2f Gbit/s, %.0f us/MB, %s", res.Gbps(), res.CPUMicrosPerMB(), res.Sink.Receive)

	_, err = RunCRR(a, netip.AddrPortFrom(b.IPv4, 1), CRROptions{N: 1})
	assert.Error(t, err, "nothing listens on port 1: refused")
}
