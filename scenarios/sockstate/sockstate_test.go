package sockstate_test

import (
	"fmt"
	"math"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/bench/plot"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/harness/stats"
	"github.com/servicepath/servicepath/scenarios"
	"github.com/servicepath/servicepath/scenarios/sockstate"
)

// The client, its CRR servers and softirq share one CPU, as netperf's CRR
// does here: wall time per connection is then all the work a connection
// costs, hooks included.
const cpu = 0

// row is one way a connection is made in the CRR comparison.
type row struct {
	Name string
	Mode loader.SockState
	// Direct dials the servers' own addresses: the hooks look the
	// destination up and leave it alone (the floor).
	Direct bool
	// Prep sets sp_sock_revnat up before the row's run.
	Prep func(*sockstate.Bed) error
}

var rows = []row{
	{Name: "direct (no translation)", Mode: loader.SockStateMap, Direct: true},
	{Name: "map", Mode: loader.SockStateMap, Prep: (*sockstate.Bed).ClearRevNAT},
	// The steady state of a busy node: closed sockets' entries are never
	// deleted, so the LRU is full and every connect evicts.
	{Name: "map, full LRU", Mode: loader.SockStateMap, Prep: (*sockstate.Bed).FillRevNAT},
	{Name: "storage", Mode: loader.SockStateStorage},
}

// crrPlan is the CRR part of a form.
type crrPlan struct {
	Concurrency []int
	Rounds, N   int
	// Warmup connections precede each run, at least one per concurrent one.
	Warmup int
}

// cell is one row at one concurrency over the rounds.
type cell struct {
	Row         string                `json:"row"`
	Concurrency int                   `json:"concurrency"`
	Runs        []sockstate.CRRResult `json:"runs"`
	NsPerConn   spread                `json:"ns_per_conn"`
	ClientCPU   spread                `json:"client_cpu_ns_per_conn"`
	Connect     spread                `json:"connect_p50_ns"`
	Hook        spread                `json:"connect4_hook_ns"`
	Errors      int                   `json:"errors"`
}

// spread is the median over rounds and the range around it.
type spread struct{ Median, Min, Max float64 }

func spreadOf(xs []float64) spread {
	s := slices.Clone(xs)
	slices.Sort(s)
	return spread{Median: stats.Percentile(s, 50), Min: s[0], Max: s[len(s)-1]}
}

// runCRR runs every row at every concurrency, round after round, the rows'
// order rotated each round so that drift spreads over all of them.
func runCRR(t *testing.T, p crrPlan) []*cell {
	bed := sockstate.NewBed(t, loader.DefaultConfig().SockRevNATMapSize, cpu)
	vip := []netip.AddrPort{netip.AddrPortFrom(sockstate.VIP, 80)}
	cells := map[string]*cell{}
	var order []*cell
	for round := range p.Rounds {
		for _, conc := range p.Concurrency {
			for i := range rows {
				r := rows[(i+round)%len(rows)]
				require.NoError(t, bed.Use(r.Mode), "%s: attach the %s hooks", r.Name, r.Mode)
				if r.Prep != nil {
					require.NoError(t, r.Prep(bed), "%s: set sp_sock_revnat up", r.Name)
				}
				dsts := vip
				if r.Direct {
					dsts = bed.Direct
				}
				var res sockstate.CRRResult
				hook, err := bed.HookNs(r.Mode, "connect4", func() error {
					var err error
					res, err = sockstate.CRR(bed.C.Client, dsts, sockstate.CRROptions{CPU: cpu, Concurrency: conc, Warmup: max(conc, p.Warmup), N: p.N})
					return err
				})
				require.NoError(t, err, "%s at %d concurrent: CRR", r.Name, conc)
				res.ConnectHookNs = hook
				key := fmt.Sprintf("%s/%d", r.Name, conc)
				if cells[key] == nil {
					cells[key] = &cell{Row: r.Name, Concurrency: conc}
				}
				cells[key].Runs = append(cells[key].Runs, res)
			}
		}
	}
	for _, conc := range p.Concurrency {
		for _, r := range rows {
			c := cells[fmt.Sprintf("%s/%d", r.Name, conc)]
			var ns, cpuNs, conn, hook []float64
			for _, run := range c.Runs {
				ns = append(ns, run.NsPerConn)
				cpuNs = append(cpuNs, run.ClientCPUNsPerConn)
				conn = append(conn, run.ConnectP50Ns)
				hook = append(hook, run.ConnectHookNs)
				c.Errors += run.Errors
			}
			c.NsPerConn, c.ClientCPU, c.Connect, c.Hook = spreadOf(ns), spreadOf(cpuNs), spreadOf(conn), spreadOf(hook)
			order = append(order, c)
		}
	}
	return order
}

// pressure opens 2x sp_sock_revnat's size of long-lived connected UDP
// sockets in each mode, and measures each mode's memory with them open.
func pressure(t *testing.T, mapSize uint32, memSockets int) ([]sockstate.PressureResult, sockstate.Memory) {
	bed := sockstate.NewBed(t, mapSize, cpu)
	udp := netip.AddrPortFrom(sockstate.VIP, 53)
	var out []sockstate.PressureResult
	var err error
	for _, mode := range []loader.SockState{loader.SockStateMap, loader.SockStateStorage} {
		require.NoError(t, bed.Use(mode), "attach the %s hooks", mode)
		require.NoError(t, bed.ClearRevNAT(), "start %s mode with an empty sp_sock_revnat", mode)
		var before [2]ebpf.ProgramStats
		for i, hook := range []string{"recvmsg4", "getpeername4"} {
			before[i], err = bed.HookStats(mode, hook)
			require.NoError(t, err, "%s stats", hook)
		}
		r, err := sockstate.Pressure(bed.C.Client, udp, 2*int(mapSize))
		require.NoError(t, err, "%s mode: %d connected UDP sockets", mode, 2*mapSize)
		for i, dst := range []*float64{&r.RecvmsgHookNs, &r.GetpeernameHookNs} {
			after, err := bed.HookStats(mode, []string{"recvmsg4", "getpeername4"}[i])
			require.NoError(t, err, "hook stats")
			if runs := after.RunCount - before[i].RunCount; runs > 0 {
				*dst = float64((after.Runtime - before[i].Runtime).Nanoseconds()) / float64(runs)
			}
		}
		r.Mode, r.MapSize = string(mode), int(mapSize)
		r.RevNATEntries, err = bed.RevNATEntries()
		require.NoError(t, err, "count sp_sock_revnat")
		out = append(out, r)
	}

	mem, err := sockstate.MapMemory()
	require.NoError(t, err, "map memory")
	delta := map[loader.SockState]int64{}
	grew := map[loader.SockState]map[string]int64{}
	for _, mode := range []loader.SockState{loader.SockStateMap, loader.SockStateStorage} {
		require.NoError(t, bed.Use(mode), "attach the %s hooks", mode)
		before, err := sockstate.ReadSlab()
		require.NoError(t, err, "read /proc/slabinfo")
		err = sockstate.HoldSockets(bed.C.Client, udp, memSockets, func() error {
			after, err := sockstate.ReadSlab()
			grew[mode], delta[mode] = after.Delta(before)
			return err
		})
		require.NoError(t, err, "%s mode: hold %d sockets", mode, memSockets)
	}
	mem.MeasuredSockets = memSockets
	mem.MeasuredPerSocket = float64(delta[loader.SockStateStorage]-delta[loader.SockStateMap]) / float64(memSockets)
	mem.GrewCaches = topGrowth(grew[loader.SockStateStorage], grew[loader.SockStateMap], memSockets)
	return out, mem
}

// topGrowth names the caches that grew most in storage mode beyond what
// they grew in map mode, per socket.
func topGrowth(storage, mapMode map[string]int64, n int) string {
	type g struct {
		name string
		b    int64
	}
	var gs []g
	for k, v := range storage {
		if d := v - mapMode[k]; d > 0 {
			gs = append(gs, g{k, d})
		}
	}
	slices.SortFunc(gs, func(a, b g) int { return int(b.b - a.b) })
	var parts []string
	for _, x := range gs[:min(3, len(gs))] {
		parts = append(parts, fmt.Sprintf("%s +%.0f B/socket", x.name, float64(x.b)/float64(n)))
	}
	return strings.Join(parts, ", ")
}

// The small form: CRR at 1 and 64 concurrent connections, one round; 512
// connected UDP sockets against a 256-entry sp_sock_revnat.
func TestSockStateSmall(t *testing.T) {
	t.Run("crr", func(t *testing.T) {
		plan := crrPlan{Concurrency: []int{1, 64}, Rounds: 1, N: 300, Warmup: 100}
		if testing.Short() {
			plan.N, plan.Warmup = 100, 20 // vmtest's TCG guests: ms per connection
		}
		cells := runCRR(t, plan)
		for _, c := range cells {
			t.Logf("%-24s conc %4d: %6.0f ns/conn, client CPU %6.0f ns/conn, connect() p50 %5.0f ns, connect4 hook %4.0f ns", c.Row, c.Concurrency, c.NsPerConn.Median, c.ClientCPU.Median, c.Connect.Median, c.Hook.Median)
			assert.Zero(t, c.Errors, "%s at %d concurrent: every connection completed", c.Row, c.Concurrency)
		}
	})
	t.Run("pressure", func(t *testing.T) {
		res, mem := pressure(t, 256, 512)
		for _, r := range res {
			t.Logf("%+v", r)
			assert.Zero(t, r.Errors, "%s mode: every socket got its reply", r.Mode)
			if r.Mode == string(loader.SockStateStorage) {
				assert.Zero(t, r.NotRewritten, "storage mode: every reply reads as the VIP's, however many sockets")
				assert.Zero(t, r.PeerNotVIP, "storage mode: getpeername is the VIP on every socket")
				assert.Zero(t, r.RevNATEntries, "storage mode writes nothing to sp_sock_revnat")
			} else {
				assert.Positive(t, r.NotRewritten, "map mode: with 2x its size of live sockets the LRU evicted some, whose replies keep the backend's address")
				assert.LessOrEqual(t, r.RevNATEntries, r.MapSize, "map mode: the LRU holds at most its size")
			}
		}
		t.Logf("memory: %+v", mem)
		assert.Positive(t, mem.StoragePerSocket, "the per-socket storage cost is computed from the kernel's BTF")
		assert.Positive(t, mem.RevNATMemlock, "the map's memlock is read")
	})
}

// The full form: CRR at 1, 64 and 1,024 concurrent connections, 7 rounds,
// every row in each; 8,192 connected UDP sockets against a 4,096-entry
// sp_sock_revnat; memory with 4,096 sockets open.
func TestSockStateFull(t *testing.T) {
	scenarios.SkipUnlessFull(t)
	start := time.Now()
	plan := crrPlan{Concurrency: []int{1, 64, 1024}, Rounds: 7, N: 6000, Warmup: 200}
	const mapSize, memSockets = 4096, 4096
	var cells []*cell
	var press []sockstate.PressureResult
	var mem sockstate.Memory
	t.Run("crr", func(t *testing.T) { cells = runCRR(t, plan) })
	t.Run("pressure", func(t *testing.T) { press, mem = pressure(t, mapSize, memSockets) })
	require.NotEmpty(t, cells, "CRR ran")
	require.Len(t, press, 2, "pressure ran in both modes")

	pass := true
	var md strings.Builder
	md.WriteString("## Cost per connection (CRR)\n\n")
	fmt.Fprintf(&md, "One thread drives TCP connect, %d-byte request, response, server close, close, with *concurrency* connections open at once "+
		"(non-blocking sockets, epoll); client, the three backends' CRR servers and softirq share CPU %d. Every row runs in each of %d rounds, "+
		"in rotated order, %d connections a run after a warm-up; median over rounds, [min–max] across them. "+
		"*direct*: the hooks run but the destination is a backend's own address (a service lookup that misses; no state). "+
		"*map*: sp_sock_revnat emptied before the run. *map, full LRU*: sp_sock_revnat filled to its %d entries first, "+
		"as it stands on a busy node (closed sockets' entries are never deleted), so each connect evicts. *storage*: loader.SockStateStorage.\n\n",
		sockstate.RequestSize, cpu, plan.Rounds, plan.N, loader.DefaultConfig().SockRevNATMapSize)
	md.WriteString("| row | concurrency | ns/connection | client CPU ns/connection | connect() p50 ns | connect4 hook ns | errors |\n|---|---|---|---|---|---|---|\n")
	charts := map[string]plot.Line{}
	wall := plot.Line{Title: "CRR cost per connection", XLabel: "concurrent connections", YLabel: "ns/connection (wall, one CPU)", LogX: true}
	cpuChart := plot.Line{Title: "Client CPU per connection", XLabel: "concurrent connections", YLabel: "client thread CPU ns/connection", LogX: true}
	hookChart := plot.Line{Title: "connect4 hook run time (BPF stats)", XLabel: "concurrent connections", YLabel: "ns per connect", LogX: true}
	series := map[string]*[3]plot.Series{}
	var names []string
	for _, c := range cells {
		fmt.Fprintf(&md, "| %s | %d | %s | %s | %s | %s | %d |\n", c.Row, c.Concurrency, fmtSpread(c.NsPerConn), fmtSpread(c.ClientCPU), fmtSpread(c.Connect), fmtSpread(c.Hook), c.Errors)
		if c.Errors > 0 {
			pass = false
		}
		if series[c.Row] == nil {
			series[c.Row] = &[3]plot.Series{{Name: c.Row}, {Name: c.Row}, {Name: c.Row}}
			names = append(names, c.Row)
		}
		s := series[c.Row]
		x := float64(c.Concurrency)
		s[0].Points = append(s[0].Points, plot.Point{X: x, Y: c.NsPerConn.Median, Lo: c.NsPerConn.Min, Hi: c.NsPerConn.Max})
		s[1].Points = append(s[1].Points, plot.Point{X: x, Y: c.ClientCPU.Median, Lo: c.ClientCPU.Min, Hi: c.ClientCPU.Max})
		s[2].Points = append(s[2].Points, plot.Point{X: x, Y: c.Hook.Median, Lo: c.Hook.Min, Hi: c.Hook.Max})
	}
	for _, n := range names {
		wall.Series = append(wall.Series, series[n][0])
		cpuChart.Series = append(cpuChart.Series, series[n][1])
		hookChart.Series = append(hookChart.Series, series[n][2])
	}
	charts["crr-ns-per-conn.svg"], charts["crr-client-cpu.svg"], charts["connect4-hook-ns.svg"] = wall, cpuChart, hookChart

	md.WriteString("\n## Correctness under pressure\n\n")
	fmt.Fprintf(&md, "sp_sock_revnat sized %d; %d connected UDP sockets to the VIP opened first (long-lived sockets of a busy node), "+
		"then each sends a datagram, reads the reply with recvfrom and asks getpeername.\n\n", mapSize, 2*mapSize)
	md.WriteString("| mode | sockets | replies not from the VIP | getpeername not the VIP | errors | sp_sock_revnat entries | recvmsg4 hook ns | getpeername4 hook ns |\n|---|---|---|---|---|---|---|---|\n")
	var lostMap, lostStorage int
	for _, r := range press {
		fmt.Fprintf(&md, "| %s | %d | %d | %d | %d | %d | %.0f | %.0f |\n", r.Mode, r.Sockets, r.NotRewritten, r.PeerNotVIP, r.Errors, r.RevNATEntries, r.RecvmsgHookNs, r.GetpeernameHookNs)
		if r.Mode == string(loader.SockStateStorage) {
			lostStorage = r.NotRewritten + r.PeerNotVIP + r.Errors
		} else {
			lostMap = r.NotRewritten
		}
	}
	if lostStorage != 0 || lostMap == 0 {
		pass = false
	}

	md.WriteString("\n## Memory\n\n")
	fmt.Fprintf(&md, "| | map mode | storage mode |\n|---|---|---|\n")
	fmt.Fprintf(&md, "| paid up front | sp_sock_revnat: %.1f MiB memlock at its default %d entries (preallocated LRU, %.0f B/entry) | sp_sock_ctx: %d B memlock (the map alone; elements are per socket) |\n",
		float64(mem.RevNATMemlock)/(1<<20), mem.RevNATEntries, mem.RevNATPerEntry, mem.SockCtxMemlock)
	fmt.Fprintf(&md, "| per socket | none beyond the entry (one per socket and backend) | %d B: element (%d B header + %d B value, in its kmalloc class) + struct bpf_local_storage (%d B, first storage of a socket), from this kernel's BTF; measured in /proc/slabinfo (accounted kmalloc caches, storage mode less map mode): %.0f B/socket over %d sockets (%s) |\n",
		mem.StoragePerSocket, mem.ElemHeader, mem.SockCtxValue, mem.LocalStorage, mem.MeasuredPerSocket, mem.MeasuredSockets, mem.GrewCaches)
	fmt.Fprintf(&md, "| capacity | %d sockets×backends, then LRU eviction | none: one element per live socket, freed with it |\n", mem.RevNATEntries)
	breakEven := float64(mem.RevNATMemlock) / float64(max(mem.StoragePerSocket, 1))
	fmt.Fprintf(&md, "\nStorage costs less than the default map while fewer than %.0f sockets hold state at once.\n", breakEven)

	verdict := verdictText(cells, press, mem, breakEven)
	r := scenarios.Report{Name: "sockstate", Title: "Socket-storage flow state", Stamp: scenarios.Stamp(), Pass: pass, Verdict: verdict,
		WallSeconds: time.Since(start).Seconds(),
		Settings: map[string]any{"concurrency": "1,64,1024", "rounds": plan.Rounds, "connections_per_run": plan.N, "request_bytes": sockstate.RequestSize,
			"cpu": cpu, "pressure_revnat_size": mapSize, "pressure_sockets": 2 * mapSize, "memory_sockets": memSockets},
		Data: map[string]any{"crr": cells, "pressure": press, "memory": mem}}
	dir, err := scenarios.Write(r, md.String(), charts)
	require.NoError(t, err, "write results")
	t.Logf("wrote %s: %s", dir, verdict)
}

func fmtSpread(s spread) string {
	return fmt.Sprintf("%.0f [%.0f–%.0f]", s.Median, s.Min, s.Max)
}

// verdictText sums the run up: the loss bound, the hooks' own cost per
// mode, whether wall-clock CRR tells the modes apart, and memory.
func verdictText(cells []*cell, press []sockstate.PressureResult, mem sockstate.Memory, breakEven float64) string {
	var parts []string
	for _, r := range press {
		parts = append(parts, fmt.Sprintf("%s mode left %d of %d replies unrewritten", r.Mode, r.NotRewritten, r.Sockets))
	}
	s := strings.Join(parts, ", ") + fmt.Sprintf(" with 2x sp_sock_revnat's size (%d) of live connected UDP sockets.", press[0].MapSize)
	hooks := map[string][]float64{}
	wall := map[string]map[int]spread{}
	var concs []int
	for _, c := range cells {
		hooks[c.Row] = append(hooks[c.Row], c.Hook.Median)
		if wall[c.Row] == nil {
			wall[c.Row] = map[int]spread{}
		}
		wall[c.Row][c.Concurrency] = c.NsPerConn
		if !slices.Contains(concs, c.Concurrency) {
			concs = append(concs, c.Concurrency)
		}
	}
	var hk []string
	for _, r := range rows {
		h := slices.Clone(hooks[r.Name])
		slices.Sort(h)
		hk = append(hk, fmt.Sprintf("%s %.0f–%.0f", r.Name, h[0], h[len(h)-1]))
	}
	s += " connect4's own run time (medians across concurrencies), ns: " + strings.Join(hk, ", ") + "."
	var apart []string
	for _, conc := range concs {
		m, st := wall["map"][conc], wall["storage"][conc]
		if st.Max < m.Min || m.Max < st.Min {
			apart = append(apart, fmt.Sprintf("%d", conc))
		}
	}
	if len(apart) == 0 {
		share := 100 * slices.Max(hooks["map, full LRU"]) / wall["map"][concs[0]].Median
		s += fmt.Sprintf(" Whole-connection CRR cost does not tell map and storage apart: their ranges over rounds overlap at every concurrency (the hook is under %.0f%% of a connection here).", math.Ceil(share))
	} else {
		s += " Whole-connection CRR cost separates map and storage at concurrency " + strings.Join(apart, ", ") + "."
	}
	s += fmt.Sprintf(" Memory: the default map preallocates %.1f MiB; storage costs %d B per live socket (%.0f measured), so it is smaller below about %.0f sockets.",
		float64(mem.RevNATMemlock)/(1<<20), mem.StoragePerSocket, mem.MeasuredPerSocket, breakEven)
	return s
}
