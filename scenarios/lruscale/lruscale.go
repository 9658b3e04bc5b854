// Package lruscale fills the conntrack map to 1x, 2x and 10x
// its size with new flows, as fast as BPF_PROG_TEST_RUN injects them,
// while a set of long-lived established flows keeps talking; count the
// established flows that lost their state, the kernel-timed cost per
// packet against the fill level, and what a GC pass costs, for the common
// LRU and the per-CPU LRU (BPF_F_NO_COMMON_LRU, loader.Config.CTNoCommonLRU).
package lruscale

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"sort"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/ct"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/packet"
)

// Options shape one run.
type Options struct {
	MapSize uint32
	// Fills are the checkpoints, in multiples of MapSize entries inserted
	// by new flows (each flow inserts two: service and flow entry).
	Fills []float64
	// Established flows talk (a reply, then a forward packet) once every
	// Period new-flow entries each; Period is a fraction of MapSize.
	Established int
	Period      float64
	Backends    int
	// NoCommonLRU selects the per-CPU LRU.
	NoCommonLRU bool
	// FloodCPU and EstablishedCPU pin the injecting thread (-1: unpinned).
	FloodCPU, EstablishedCPU int
	// Samples per established-packet timing checkpoint.
	Samples int
}

// Checkpoint is the state after a fill level.
type Checkpoint struct {
	Fill float64 `json:"fill"`
	// Lost established flows so far: a flow that lost either entry once.
	Lost int `json:"lost"`
	// Moved flows went to another backend (a TCP flow breaks);
	// Reselected re-picked (possibly the same backend), Unxlated saw a
	// reply leave untranslated.
	Moved      int `json:"moved"`
	Reselected int `json:"reselected"`
	Unxlated   int `json:"unxlated"`
	Entries    int `json:"entries"`
	Orphans    int `json:"orphans"`
	// NewFlowNs is the mean kernel-timed cost of the new-flow SYNs injected
	// since the previous checkpoint, EstablishedNs of an established flow's
	// packet at this fill, both less the empty program.
	NewFlowNs     float64 `json:"new_flow_ns"`
	EstablishedNs float64 `json:"established_ns"`
	// FloodRate is new flows per second of wall time while injecting.
	FloodRate    float64 `json:"flood_rate"`
	CreateFailed uint64  `json:"ct_create_failed"`
	// GCMs is a whole-map collector pass over the full map, GCCPUMs its
	// CPU time.
	GCMs    float64 `json:"gc_ms"`
	GCCPUMs float64 `json:"gc_cpu_ms"`
}

// Result is one run.
type Result struct {
	Mode        string       `json:"mode"`
	LRU         string       `json:"lru"`
	Period      float64      `json:"talk_period"`
	MapSize     uint32       `json:"map_size"`
	Established int          `json:"established"`
	Checkpoints []Checkpoint `json:"checkpoints"`
	EmptyNs     float64      `json:"empty_ns"`
}

var (
	// VIP is the east-west service the established flows (and this
	// scenario's flood) use.
	VIP        = netip.MustParseAddrPort("198.19.0.10:80")
	estClient  = netip.MustParseAddr("198.18.0.10")
	floodBase  = netip.MustParseAddr("198.18.128.0").As4()
	backendNet = netip.MustParseAddr("198.18.1.0").As4()
)

func backendAddr(i int) netip.Addr {
	a := backendNet
	a[3] = byte(10 + i)
	return netip.AddrFrom4(a)
}

// FloodClient is new flow i's client: distinct up to 60000 ports per
// address, then the next address.
func FloodClient(i int) netip.AddrPort {
	a := floodBase
	host := i / 60000
	a[2] += byte(host >> 8)
	a[3] = byte(host)
	return netip.AddrPortFrom(netip.AddrFrom4(a), uint16(1024+i%60000))
}

// ProgramVIP programs VIP over backends backends.
func ProgramVIP(env *inject.Env, backends int) error {
	svc := service.Service{Name: "default/lruscale", Frontend: service.Frontend{Addr: VIP.Addr(), Port: VIP.Port(), Protocol: service.TCP}}
	for i := range backends {
		svc.Backends = append(svc.Backends, service.Backend{Addr: backendAddr(i), Port: 8080})
	}
	return env.Services.Upsert(svc)
}

type estFlow struct {
	client  netip.AddrPort
	backend netip.Addr
	lost    bool
}

// Tally is what happened to a set of established flows so far.
type Tally struct {
	// Lost flows lost their state at least once; Moved ones went to
	// another backend (a TCP flow breaks); Reselected re-picked (possibly
	// the same backend); Unxlated saw a reply leave untranslated.
	Lost, Moved, Reselected, Unxlated int
	// Evicted counts the flows' entries found missing from sp_ct just
	// before they talked: every eviction, since only a talk re-creates
	// them.
	Evicted int
}

// Flows are long-lived flows to VIP through the pod-device programs that
// talk in turn: a reply (to-pod), then a forward packet (from-pod).
type Flows struct {
	env   *inject.Env
	flows []*estFlow
	next  int
	Tally
}

// OpenFlows opens n flows to VIP (programmed already): SYN, SYN-ACK, ACK.
func OpenFlows(env *inject.Env, n int) (*Flows, error) {
	fs := &Flows{env: env}
	for i := range n {
		c := netip.AddrPortFrom(estClient, uint16(20000+i))
		out, err := forward(env, packet.TCP(c, VIP, packet.SYN, nil, packet.Opts{}))
		if err != nil {
			return nil, err
		}
		f := &estFlow{client: c, backend: out}
		fs.flows = append(fs.flows, f)
		if _, err := reply(env, f, packet.SYNACK); err != nil {
			return nil, err
		}
		if _, err := forward(env, packet.TCP(c, VIP, packet.ACK, nil, packet.Opts{})); err != nil {
			return nil, err
		}
	}
	return fs, nil
}

// Len is the number of flows.
func (fs *Flows) Len() int { return len(fs.flows) }

// Probe is the first flow's forward packet, for timing an established
// packet (it leaves the flow as it was).
func (fs *Flows) Probe() []byte {
	return packet.TCP(fs.flows[0].client, VIP, packet.ACK, []byte("keepalive"), packet.Opts{})
}

// Talk has the next flow in turn talk, and tallies what it found.
func (fs *Flows) Talk() error {
	f := fs.flows[fs.next%len(fs.flows)]
	fs.next++
	missing, err := fs.missing(f)
	if err != nil {
		return err
	}
	fs.Evicted += missing
	before, err := fs.env.Counters()
	if err != nil {
		return err
	}
	translated, err := reply(fs.env, f, packet.ACK)
	if err != nil {
		return err
	}
	to, err := forward(fs.env, packet.TCP(f.client, VIP, packet.ACK, []byte("keepalive"), packet.Opts{}))
	if err != nil {
		return err
	}
	after, err := fs.env.Counters()
	if err != nil {
		return err
	}
	bad := false
	if !translated {
		fs.Unxlated++
		bad = true
	}
	if after["lb_new"] > before["lb_new"] {
		fs.Reselected++
		bad = true
	}
	if to != f.backend {
		fs.Moved++
		f.backend = to // the flow lives on there, broken
		bad = true
	}
	if bad && !f.lost {
		f.lost = true
		fs.Lost++
	}
	return nil
}

// Observe is the tally as the flows' next talks would find it, without
// touching them: entries now missing from sp_ct count as evicted, and
// their flows, if not lost yet, as lost.
func (fs *Flows) Observe() (Tally, error) {
	t := fs.Tally
	for _, f := range fs.flows {
		n, err := fs.missing(f)
		if err != nil {
			return t, err
		}
		t.Evicted += n
		if n > 0 && !f.lost {
			t.Lost++
		}
	}
	return t, nil
}

// missing counts f's service and flow entries absent from sp_ct. A
// lookup from user space does not mark an LRU entry used.
func (fs *Flows) missing(f *estFlow) (int, error) {
	c, fam := maps.AddrFrom(f.client.Addr())
	v, _ := maps.AddrFrom(VIP.Addr())
	b, _ := maps.AddrFrom(f.backend)
	n := 0
	for _, k := range []maps.CTKey{
		{SAddr: c, DAddr: v, SPort: maps.NewBE16(f.client.Port()), DPort: maps.NewBE16(VIP.Port()), Proto: 6, Family: fam, Flags: maps.CTFlagService},
		{SAddr: c, DAddr: b, SPort: maps.NewBE16(f.client.Port()), DPort: maps.NewBE16(8080), Proto: 6, Family: fam},
	} {
		var e maps.CTEntry
		switch err := fs.env.DP.Maps.CT.Lookup(&k, &e); {
		case errors.Is(err, ebpf.ErrKeyNotExist):
			n++
		case err != nil:
			return 0, fmt.Errorf("look up an established flow's entry: %w", err)
		}
	}
	return n, nil
}

// pinned is the CPU the run's thread is on (-1: not pinned yet).
var pinned = -1

// pin moves the calling (locked) thread to cpu.
func pin(cpu int) error {
	if cpu < 0 || cpu == pinned {
		return nil
	}
	pinned = cpu
	var set unix.CPUSet
	set.Set(cpu)
	return unix.SchedSetaffinity(0, &set)
}

// Run runs one mode. The caller's goroutine is locked to its thread for
// the run, so pinning holds.
func Run(o Options) (*Result, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var orig unix.CPUSet
	if err := unix.SchedGetaffinity(0, &orig); err != nil {
		return nil, err
	}
	defer unix.SchedSetaffinity(0, &orig)
	pinned = -1

	cfg := loader.DefaultConfig()
	cfg.CTMapSize = o.MapSize
	cfg.CTNoCommonLRU = o.NoCommonLRU
	env, err := inject.NewEnv(cfg)
	if err != nil {
		return nil, fmt.Errorf("load datapath: %w", err)
	}
	defer env.Close()
	empty, err := EmptyProgram()
	if err != nil {
		return nil, err
	}
	defer empty.Close()

	if err := ProgramVIP(env, o.Backends); err != nil {
		return nil, err
	}
	res := &Result{Mode: modeName(o), LRU: strings.SplitN(modeName(o), "/talk", 2)[0], Period: o.Period, MapSize: o.MapSize, Established: o.Established}

	if err := pin(o.EstablishedCPU); err != nil {
		return nil, err
	}
	flows, err := OpenFlows(env, o.Established)
	if err != nil {
		return nil, err
	}
	emptyNs, err := MeanNs(empty, flows.Probe(), 2000)
	if err != nil {
		return nil, err
	}
	res.EmptyNs = emptyNs

	period := max(int(o.Period*float64(o.MapSize)), 2)
	every := max(period/2/max(o.Established, 1), 1) // new flows between two talks
	next := 0
	for _, fill := range o.Fills {
		target := int(fill * float64(o.MapSize) / 2)
		var synNs time.Duration
		var syns int
		start := time.Now()
		for ; next < target; next++ {
			if err := pin(o.FloodCPU); err != nil {
				return nil, err
			}
			syn := packet.TCP(FloodClient(next), VIP, packet.SYN, nil, packet.Opts{})
			ret, d, err := env.DP.FromPod.Benchmark(syn, 1, nil)
			if err != nil {
				return nil, fmt.Errorf("inject new flow %d: %w", next, err)
			}
			if inject.Verdict(ret) != inject.OK {
				return nil, fmt.Errorf("new flow %d: verdict %s", next, inject.Verdict(ret))
			}
			synNs += d
			syns++
			if next%every == 0 && o.Established > 0 {
				if err := pin(o.EstablishedCPU); err != nil {
					return nil, err
				}
				if err := flows.Talk(); err != nil {
					return nil, err
				}
			}
		}
		wall := time.Since(start)
		t := flows.Tally
		c := Checkpoint{Fill: fill, Lost: t.Lost, Moved: t.Moved, Reselected: t.Reselected, Unxlated: t.Unxlated}
		if syns > 0 {
			c.NewFlowNs = float64(synNs.Nanoseconds())/float64(syns) - emptyNs
			c.FloodRate = float64(syns) / wall.Seconds()
		}
		if err := pin(o.EstablishedCPU); err != nil {
			return nil, err
		}
		if ns, err := MeanNs(env.DP.FromPod, flows.Probe(), o.Samples); err != nil {
			return nil, err
		} else {
			c.EstablishedNs = ns - emptyNs
		}
		counters, err := env.Counters()
		if err != nil {
			return nil, err
		}
		c.CreateFailed = counters["ct_create_failed"]
		now, err := ct.Now()
		if err != nil {
			return nil, err
		}
		p, err := ct.ReadPressure(env.DP.Maps.CT, now)
		if err != nil {
			return nil, err
		}
		c.Entries, c.Orphans = p.Entries, p.Orphans
		wallGC, cpuGC, err := timeGC(env.DP.Maps.CT, now)
		if err != nil {
			return nil, err
		}
		c.GCMs, c.GCCPUMs = ms(wallGC), ms(cpuGC)
		res.Checkpoints = append(res.Checkpoints, c)
	}
	return res, nil
}

func modeName(o Options) string {
	name := "common-lru"
	if o.NoCommonLRU {
		name = "per-cpu-lru"
	}
	if o.FloodCPU != o.EstablishedCPU {
		name += "/flood-on-other-cpu"
	}
	return fmt.Sprintf("%s/talk-every-%gx", name, o.Period)
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1e3 }

// forward injects a client packet and returns the address it was sent to.
func forward(env *inject.Env, pkt []byte) (netip.Addr, error) {
	v, out, err := env.Inject(inject.FromPod, pkt)
	if err != nil {
		return netip.Addr{}, err
	}
	if v != inject.OK {
		return netip.Addr{}, fmt.Errorf("forward packet: verdict %s", v)
	}
	return dstOf(out), nil
}

// reply injects a backend's packet to the client and says whether its
// source left as the VIP.
func reply(env *inject.Env, f *estFlow, flags packet.TCPFlags) (bool, error) {
	src := netip.AddrPortFrom(f.backend, 8080)
	v, out, err := env.Inject(inject.ToPod, packet.TCP(src, f.client, flags, nil, packet.Opts{FromHost: true}))
	if err != nil {
		return false, err
	}
	if v != inject.OK {
		return false, fmt.Errorf("reply: verdict %s", v)
	}
	return srcOf(out) == VIP.Addr(), nil
}

// IPv4 addresses of an Ethernet frame.
func dstOf(frame []byte) netip.Addr { return netip.AddrFrom4([4]byte(frame[30:34])) }
func srcOf(frame []byte) netip.Addr { return netip.AddrFrom4([4]byte(frame[26:30])) }

// MeanNs is the kernel's mean time for one run of prog on pkt, each run
// on a fresh copy (an established packet leaves the flow as it was).
func MeanNs(prog *ebpf.Program, pkt []byte, n int) (float64, error) {
	var total time.Duration
	for range n {
		_, d, err := prog.Benchmark(pkt, 1, nil)
		if err != nil {
			return 0, err
		}
		total += d
	}
	return float64(total.Nanoseconds()) / float64(n), nil
}

// timeGC times a whole-map collector pass: wall and this thread's CPU.
func timeGC(m *ebpf.Map, now uint64) (wall, cpu time.Duration, err error) {
	var r0, r1 unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &r0); err != nil {
		return 0, 0, err
	}
	start := time.Now()
	_, err = ct.NewCollector(m).Pass(now, 0)
	wall = time.Since(start)
	if err != nil {
		return 0, 0, err
	}
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &r1); err != nil {
		return 0, 0, err
	}
	cpu = time.Duration(r1.Utime.Nano()+r1.Stime.Nano()-r0.Utime.Nano()-r0.Stime.Nano()) * time.Nanosecond
	return wall, cpu, nil
}

// EmptyProgram returns TC_ACT_OK and does nothing else: what the
// scenarios subtract from a program's kernel-timed cost.
func EmptyProgram() (*ebpf.Program, error) {
	return ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "sp_empty", Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
}

// GCCost is one GC implementation on one map size.
type GCCost struct {
	Impl    string  `json:"impl"`
	Size    int     `json:"map_size"`
	Entries int     `json:"entries"`
	Deleted int     `json:"deleted"`
	WallMs  float64 `json:"wall_ms"`
	CPUMs   float64 `json:"cpu_ms"`
	// Syscalls made by the pass (lookups, batches, deletes).
	Syscalls int `json:"syscalls"`
}

// MeasureGC fills a map of each size to 90% with synthetic pairs, a third
// of them expired, and times the per-key walk GC (what `servicepath gc`
// did before: iterate, look each expired entry's partner up, delete one by
// one) against the batched collector's whole-map pass and one paced
// slice (a quarter of the entries).
func MeasureGC(sizes []uint32) ([]GCCost, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var out []GCCost
	for _, size := range sizes {
		m, err := ebpf.NewMap(&ebpf.MapSpec{Name: "sp_ct_gc", Type: ebpf.LRUHash, KeySize: uint32(sizeofKey()), ValueSize: uint32(sizeofEntry()), MaxEntries: size})
		if err != nil {
			return nil, err
		}
		for _, impl := range []string{"per-key walk", "batched whole map", "batched quarter slice"} {
			now, err := ct.Now()
			if err != nil {
				m.Close()
				return nil, err
			}
			pairs := int(float64(size) * 0.9 / 2)
			if err := fill(m, pairs, now); err != nil {
				m.Close()
				return nil, err
			}
			var r0, r1 unix.Rusage
			unix.Getrusage(unix.RUSAGE_THREAD, &r0)
			start := time.Now()
			var deleted, calls int
			switch impl {
			case "per-key walk":
				deleted, calls, err = legacyGC(m, now)
			case "batched whole map":
				var r ct.PassResult
				r, err = ct.NewCollector(m).Pass(now, 0)
				deleted, calls = r.Deleted, r.BatchCalls+r.Lookups+r.Deleted+r.PutBack
			default:
				var r ct.PassResult
				r, err = ct.NewCollector(m).Pass(now, pairs*2/4)
				deleted, calls = r.Deleted, r.BatchCalls+r.Lookups+r.Deleted+r.PutBack
			}
			wall := time.Since(start)
			unix.Getrusage(unix.RUSAGE_THREAD, &r1)
			if err != nil {
				m.Close()
				return nil, fmt.Errorf("%s on %d: %w", impl, size, err)
			}
			cpu := time.Duration(r1.Utime.Nano() + r1.Stime.Nano() - r0.Utime.Nano() - r0.Stime.Nano())
			out = append(out, GCCost{Impl: impl, Size: int(size), Entries: pairs * 2, Deleted: deleted, WallMs: ms(wall), CPUMs: ms(cpu), Syscalls: calls})
		}
		m.Close()
	}
	return out, nil
}

func sizeofKey() int   { return binary.Size(maps.CTKey{}) }
func sizeofEntry() int { return binary.Size(maps.CTEntry{}) }

// fill empties m and writes pairs synthetic flows, every third expired.
func fill(m *ebpf.Map, pairs int, now uint64) error {
	var cursor ebpf.MapBatchCursor
	keys := make([]maps.CTKey, 4096)
	vals := make([]maps.CTEntry, 4096)
	for {
		_, err := m.BatchLookupAndDelete(&cursor, keys, vals, nil)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		}
		if err != nil {
			return err
		}
	}
	vipA, fam := maps.AddrFrom(VIP.Addr())
	ks := make([]maps.CTKey, 0, 2*pairs)
	vs := make([]maps.CTEntry, 0, 2*pairs)
	for i := range pairs {
		exp := now + uint64(time.Hour)
		if i%3 == 0 {
			exp = now - uint64(time.Second)
		}
		c, _ := maps.AddrFrom(FloodClient(i).Addr())
		b, _ := maps.AddrFrom(backendAddr(i % 16))
		sp := maps.NewBE16(FloodClient(i).Port())
		ks = append(ks,
			maps.CTKey{SAddr: c, DAddr: vipA, SPort: sp, DPort: maps.NewBE16(80), Proto: 6, Family: fam, Flags: maps.CTFlagService},
			maps.CTKey{SAddr: c, DAddr: b, SPort: sp, DPort: maps.NewBE16(8080), Proto: 6, Family: fam})
		vs = append(vs,
			maps.CTEntry{Expires: exp, NATAddr: b, NATPort: maps.NewBE16(8080), BackendID: 1},
			maps.CTEntry{Expires: exp, NATAddr: vipA, NATPort: maps.NewBE16(80), BackendID: 1})
	}
	for len(ks) > 0 {
		n := min(len(ks), 8192)
		if _, err := m.BatchUpdate(ks[:n], vs[:n], nil); err != nil {
			return err
		}
		ks, vs = ks[n:], vs[n:]
	}
	return nil
}

// legacyGC is the GC `servicepath gc` ran before the collector: a per-key
// iteration, a partner lookup per expired entry, a delete per key.
func legacyGC(m *ebpf.Map, now uint64) (deleted, syscalls int, err error) {
	pair := func(k maps.CTKey, v maps.CTEntry) maps.CTKey {
		p := k
		p.DAddr, p.DPort = v.NATAddr, v.NATPort
		p.Flags ^= maps.CTFlagService
		return p
	}
	var expired []maps.CTKey
	var k maps.CTKey
	var v maps.CTEntry
	it := m.Iterate()
	for it.Next(&k, &v) {
		syscalls += 2 // next key + lookup
		if v.Expires <= now {
			var pv maps.CTEntry
			pk := pair(k, v)
			syscalls++
			if m.Lookup(&pk, &pv) == nil && pv.Expires > now {
				continue
			}
			expired = append(expired, k)
		}
	}
	if err := it.Err(); err != nil {
		return 0, syscalls, err
	}
	for i := range expired {
		syscalls++
		if err := m.Delete(&expired[i]); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return deleted, syscalls, err
		}
		deleted++
	}
	return deleted, syscalls, nil
}

// SortCosts orders GC costs by size, then implementation.
func SortCosts(c []GCCost) {
	sort.SliceStable(c, func(i, j int) bool { return c[i].Size < c[j].Size })
}
