package collision

import (
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/cluster"
	"github.com/servicepath/servicepath/harness/stats"
	"github.com/servicepath/servicepath/scenarios"
)

// Case is one reuse pattern's tally.
type Case struct {
	Name     string         `json:"name"`
	Attempts int            `json:"attempts"`
	OK       int            `json:"ok"`
	Errors   map[string]int `json:"errors"`
	// Spread is connections per backend; Chi2 against Critical
	// (alpha 0.001) says whether reuse re-picks uniformly.
	Spread   []int   `json:"spread"`
	Chi2     float64 `json:"chi2"`
	Critical float64 `json:"critical"`
	// TupleReused counts connections whose tuple on the wire (as the
	// backend saw it) an earlier connection of the case had used.
	TupleReused int               `json:"tuple_reused"`
	Counters    map[string]uint64 `json:"counters"`
	WallSeconds float64           `json:"wall_seconds"`
}

func (c Case) uniform() bool { return c.Chi2 < c.Critical }

type sizes struct{ reuse, timeWait, masq int }

var small = sizes{reuse: 60, timeWait: 3, masq: 40}
var fullSizes = sizes{reuse: 900, timeWait: 20, masq: 600}

func runCases(t *testing.T, n sizes) []Case {
	// Two clients behind one address are made with an iptables SNAT rule.
	if _, err := exec.LookPath("iptables"); err != nil {
		t.Skipf("needs iptables for the masquerade case (make deps installs it): %v", err)
	}
	c := cluster.New(t, cluster.Options{PerPacket: true, Mode: attach.Auto})
	vip := netip.MustParseAddr("198.19.0.70")
	waitVIP := netip.MustParseAddr("198.19.0.71")
	c.ProgramTo(t, vip, 80, service.TCP, IdentityPort, cluster.Backends...)
	// A second service whose servers wait for the client to close first.
	for _, name := range cluster.Backends {
		srv, err := ServeIdentity(c.Topo.Pod(name), name, false)
		require.NoError(t, err, "identity server in %s", name)
		t.Cleanup(func() { srv.Close() })
	}
	waiting := map[string]*IdentityServer{}
	for _, name := range cluster.Backends {
		// Same pods, one port up, waiting for the client's close.
		srv, err := serveWaiting(c, name)
		require.NoError(t, err, "waiting identity server in %s", name)
		t.Cleanup(func() { srv.Close() })
		waiting[name] = srv
	}
	c.ProgramTo(t, waitVIP, 80, service.TCP, IdentityPort+1, cluster.Backends...)

	client := c.Topo.Pod("client")
	podAddr := client.IPv4
	run := func(name string, attempts int, pause time.Duration, next func(i int) (netip.AddrPort, netip.AddrPort, CloseHow)) Case {
		before := c.Counters(t)
		start := time.Now()
		cs := Case{Name: name, Attempts: attempts, Errors: map[string]int{}}
		tally := map[string]int{}
		seen := map[netip.AddrPort]bool{}
		for i := range attempts {
			local, dst, how := next(i)
			o := Connect(client, local, dst, how, 3*time.Second)
			if o.Err != "" {
				cs.Errors[o.Err]++
			} else {
				cs.OK++
				tally[o.Identity]++
				if seen[o.Peer] {
					cs.TupleReused++
				}
				seen[o.Peer] = true
			}
			time.Sleep(pause)
		}
		after := c.Counters(t)
		cs.Counters = map[string]uint64{}
		for _, k := range []string{"lb_new", "lb_established", "ct_reopen", "ct_tuple_reused", "backend_gone", "ct_create_failed"} {
			cs.Counters[k] = after[k] - before[k]
		}
		for _, b := range cluster.Backends {
			cs.Spread = append(cs.Spread, tally[b])
		}
		stat, df := stats.ChiSquareUniform(cs.Spread)
		cs.Chi2, cs.Critical = stat, stats.ChiSquareCritical(df, 0.001)
		cs.WallSeconds = time.Since(start).Seconds()
		return cs
	}
	const port = 41000
	fixed := netip.AddrPortFrom(podAddr, port)
	var out []Case
	out = append(out, run("port-reuse-after-server-close", n.reuse, 0, func(int) (netip.AddrPort, netip.AddrPort, CloseHow) {
		return fixed, netip.AddrPortFrom(vip, 80), AfterServer
	}))
	out = append(out, run("port-reuse-after-client-rst", n.reuse, 0, func(int) (netip.AddrPort, netip.AddrPort, CloseHow) {
		return fixed, netip.AddrPortFrom(waitVIP, 80), Reset
	}))
	require.NoError(t, SetTWReuse(client, 1), "tcp_tw_reuse=1 in the client pod")
	// tcp_tw_reuse lets a port out of TIME_WAIT once a second has passed.
	out = append(out, run("time-wait-reuse-after-client-close", n.timeWait, 1100*time.Millisecond, func(int) (netip.AddrPort, netip.AddrPort, CloseHow) {
		return fixed, netip.AddrPortFrom(waitVIP, 80), First
	}))
	sources := []netip.Addr{netip.MustParseAddr("198.18.200.1"), netip.MustParseAddr("198.18.200.2")}
	undo, err := Masquerade(client, sources)
	require.NoError(t, err, "masquerade two sources to the pod's address")
	t.Cleanup(undo)
	out = append(out, run("two-clients-masqueraded-to-one-address", n.masq, 0, func(i int) (netip.AddrPort, netip.AddrPort, CloseHow) {
		return netip.AddrPortFrom(sources[i%2], port+1), netip.AddrPortFrom(vip, 80), AfterServer
	}))
	return out
}

func serveWaiting(c *cluster.Cluster, name string) (*IdentityServer, error) {
	return serveOn(c.Topo.Pod(name), name, IdentityPort+1, true)
}

func TestCollisionSmall(t *testing.T) {
	for _, cs := range runCases(t, small) {
		t.Logf("%s: %+v", cs.Name, cs)
		assert.Equal(t, cs.Attempts, cs.OK, "%s: every connection on a reused tuple succeeds (errors %v)", cs.Name, cs.Errors)
		if cs.Attempts >= 30 {
			assert.True(t, cs.uniform(), "%s: reuse re-picks uniformly: chi2 %.1f < %.1f, spread %v", cs.Name, cs.Chi2, cs.Critical, cs.Spread)
		}
	}
}

func TestCollisionFull(t *testing.T) {
	scenarios.SkipUnlessFull(t)
	start := time.Now()
	cases := runCases(t, fullSizes)
	pass := true
	var md strings.Builder
	md.WriteString("Per-packet path (veth pods, tc at the pod device), a 3-backend TCP service. Each case connects again and again from one fixed client tuple. " +
		"*ok* connections read the backend's line; errors are resets, refusals, timeouts. Spread is connections per backend, tested for uniformity (chi-square, alpha 0.001): " +
		"a reused tuple must be re-load-balanced, not pinned. *tuple reused* counts connections whose tuple on the wire (as the backend saw it) an earlier connection had used (behind the SNAT: the other client's too). " +
		"Counters are the datapath's, grown during the case.\n\n")
	md.WriteString("| case | attempts | ok | errors | spread | chi2 (crit) | tuple reused | lb_new | ct_reopen | ct_tuple_reused | wall s |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, cs := range cases {
		fmt.Fprintf(&md, "| %s | %d | %d | %v | %v | %.1f (%.1f) | %d | %d | %d | %d | %.1f |\n", cs.Name, cs.Attempts, cs.OK, cs.Errors, cs.Spread,
			cs.Chi2, cs.Critical, cs.TupleReused, cs.Counters["lb_new"], cs.Counters["ct_reopen"], cs.Counters["ct_tuple_reused"], cs.WallSeconds)
		if cs.OK != cs.Attempts || (cs.Attempts >= 30 && !cs.uniform()) {
			pass = false
		}
	}
	md.WriteString("\n## Packet sequences\n\n`TestCollisionFixtures` (scenarios/collision/fixtures.go) pins each reuse sequence down through BPF_PROG_TEST_RUN, " +
		"including the four this scenario found failing and that are now fixed (scenarios/README.md).\n")
	verdict := "every connection on a reused tuple (port reuse after close, after RST, from TIME_WAIT, two clients behind one SNAT address) reached a backend, with no reset, and re-picked backends uniformly"
	if !pass {
		verdict = "some reused tuples failed or were not re-balanced: see the table"
	}
	r := scenarios.Report{Name: "collision", Title: "Conntrack collisions", Stamp: scenarios.Stamp(), Pass: pass, Verdict: verdict,
		WallSeconds: time.Since(start).Seconds(),
		Settings:    map[string]any{"path": "per-packet", "kind": "veth", "backends": 3, "alpha": 0.001},
		Data:        cases}
	dir, err := scenarios.Write(r, md.String(), nil)
	require.NoError(t, err, "write results")
	t.Logf("wrote %s", dir)
	assert.True(t, pass, "collision verdict holds")
}
