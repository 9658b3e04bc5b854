package bench

import (
	"math"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

func TestSpreadOf(t *testing.T) {
	assert.Equal(t, Spread{Median: 3, Min: 1, Max: 9, N: 3}, SpreadOf([]float64{9, 1, 3}), "odd count: middle value")
	assert.Equal(t, Spread{Median: 2.5, Min: 1, Max: 4, N: 4}, SpreadOf([]float64{4, 1, 3, 2}), "even count: mean of the middle two")
	assert.True(t, math.IsNaN(SpreadOf(nil).Median), "no samples: NaN")
	assert.Zero(t, SpreadOf(nil).N, "no samples: N=0")
}

func TestLoadProjection(t *testing.T) {
	var h loadHistory
	_, ok := h.projected(1000)
	assert.False(t, ok, "nothing to project from")
	h = loadHistory{ns: []int{1}, times: []time.Duration{5 * time.Millisecond}}
	_, ok = h.projected(1000)
	assert.False(t, ok, "a load of one service says nothing about scaling")
	h = loadHistory{ns: []int{1, 1000}, times: []time.Duration{time.Millisecond, time.Second}}
	est, ok := h.projected(10000)
	assert.True(t, ok, "one load of 1000 projects")
	assert.Equal(t, 100*time.Second, est, "quadratic from a single large load")
	h = loadHistory{ns: []int{1000, 10000}, times: []time.Duration{time.Second, 10 * time.Second}}
	est, _ = h.projected(50000)
	assert.InDelta(t, 50, est.Seconds(), 1e-6, "linear when the last two loads were linear")
	h = loadHistory{ns: []int{1000, 10000}, times: []time.Duration{time.Second, time.Second}}
	est, _ = h.projected(50000)
	assert.InDelta(t, 5, est.Seconds(), 1e-6, "never projected better than linear")
}

func TestHeadlineTable(t *testing.T) {
	r := &Results{
		Settings:   Profile{Ns: []int{1, 1000}},
		Contenders: []ContenderInfo{{Name: "floor"}, {Name: "iptables-legacy"}, {Name: "servicepath-socket", Pending: "later"}},
		Connect: []ConnectResult{
			{Contender: "floor", N: 1, Rounds: []Round{{}}, P50: Spread{Median: 70, N: 1}},
			{Contender: "floor", N: 1000, Rounds: []Round{{}}, P50: Spread{Median: 71, N: 1}},
			{Contender: "iptables-legacy", N: 1, Rounds: []Round{{}}, P50: Spread{Median: 90, N: 1}, RatioP50: 1.29},
			{Contender: "iptables-legacy", N: 1000, Skipped: "too slow"},
		},
	}
	got := HeadlineTable(r)
	assert.Equal(t, strings.Join([]string{
		"| contender | N=1 | N=1k |",
		"|---|---|---|",
		"| floor | 70.0 µs | 71.0 µs |",
		"| iptables-legacy | 90.0 µs (1.29×) | not run¹ |",
		"| servicepath-socket | pending | pending |",
		"",
	}, "\n"), got, "headline table")
	md := Markdown(r, nil)
	assert.Contains(t, md, "not run: too slow", "the reason a contender did not run is in the report")
	assert.Contains(t, md, "**not measured**: later", "a pending contender is named with its reason, not a number")
}

func TestEndpointsMatchTopologyNumbering(t *testing.T) {
	eps := Endpoints()
	assert.Equal(t, "198.18.0.11:8080", eps[0].String(), "first backend pod follows the client at .10")
	assert.Len(t, eps, len(backendNames), "one endpoint per backend pod")
}

func TestContendersList(t *testing.T) {
	names := map[string]bool{}
	for _, c := range Contenders() {
		assert.False(t, names[c.Name], "unique name %s", c.Name)
		names[c.Name] = true
		if c.Pending == "" {
			assert.NotNil(t, c.Setup, "%s can be set up", c.Name)
		}
	}
	for _, want := range []string{"floor", "iptables-legacy", "iptables-nft", "nftables", "servicepath-tc", "servicepath-socket"} {
		assert.True(t, names[want], "contender %s listed", want)
	}
}

func TestProgramCostTable(t *testing.T) {
	r := &Results{
		Settings:   Profile{Ns: []int{1}, Samples: 100},
		Contenders: []ContenderInfo{{Name: "floor"}, {Name: "servicepath-tc"}},
		Connect: []ConnectResult{
			{Contender: "floor", N: 1, Rounds: []Round{{}}, P50: Spread{Median: 50, N: 1}},
			{Contender: "servicepath-tc", N: 1, Rounds: []Round{{}}, P50: Spread{Median: 60, N: 1}, Programs: []ProgramCost{
				{Program: "sp_from_pod", RunsPerConn: 5, NsPerRun: 200},
				{Program: "sp_to_pod", RunsPerConn: 5, NsPerRun: 100},
			}},
		},
	}
	got := programCostTable(r)
	assert.Contains(t, got, "| servicepath-tc | 1 | sp_from_pod | 5.0 | 200 | | |\n", "a program's runs and cost")
	assert.Contains(t, got, "| servicepath-tc | 1 | all | | | 1.50 | 2.5% |\n", "a connection's BPF time and its share of the p50")
	assert.NotContains(t, got, "| floor |", "a contender without BPF has no rows")
	assert.Empty(t, programCostTable(&Results{Settings: r.Settings, Contenders: r.Contenders, Connect: r.Connect[:1]}), "no table without BPF contenders")
}
