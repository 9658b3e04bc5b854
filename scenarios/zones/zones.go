// Package zones floods north-south with new flows (NodePort
// SYNs through the node-device program) of 1x, 2x and 10x the north-south
// conntrack zone, while long-lived east-west flows (ClusterIP, through the
// pod-device programs) wait; count the east-west entries evicted and the
// flows that lost their state, with zones (sp_ct and sp_ct_ns) and with
// one shared map of the same total size. The method is scenarios/lruscale's,
// whose established flows (lruscale.Flows) it reuses.
package zones

import (
	"fmt"
	"net/netip"
	"runtime"
	"time"

	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/ct"
	"github.com/servicepath/servicepath/datapath/endpoints"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/nodeaddrs"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/packet"
	"github.com/servicepath/servicepath/scenarios/lruscale"
)

// Options shape one run.
type Options struct {
	// EWSize and NSSize are the zones' sizes. Without Zones one shared
	// sp_ct of EWSize+NSSize entries holds both: the same memory.
	EWSize, NSSize uint32
	Zones          bool
	// Fills are the checkpoints, in multiples of NSSize entries inserted
	// by the flood (two per new flow).
	Fills []float64
	// Established east-west flows talk in turn during the flood, each
	// once every Period×NSSize flood entries (Period 0: idle until the
	// end), and all once more after the last checkpoint.
	Established int
	Period      float64
	Backends    int
	// Samples per established-packet timing.
	Samples int
}

// Checkpoint is the state after a fill level.
type Checkpoint struct {
	Fill float64 `json:"fill"`
	// The east-west flows' tally so far (lruscale.Tally, observed without
	// touching them): Evicted counts their entries gone from sp_ct, Lost
	// the flows that lost state; Moved, Reselected and Unxlated grow only
	// when flows talk.
	Evicted    int `json:"ew_evicted"`
	Lost       int `json:"ew_lost"`
	Moved      int `json:"ew_moved"`
	Reselected int `json:"ew_reselected"`
	Unxlated   int `json:"ew_unxlated"`
	// Entries and orphans of sp_ct (with zones off: the shared map) and
	// of sp_ct_ns.
	EWEntries int `json:"ew_entries"`
	EWOrphans int `json:"ew_orphans"`
	NSEntries int `json:"ns_entries"`
	NSOrphans int `json:"ns_orphans"`
	// Kernel-timed ns/packet less the empty program: the flood's SYNs
	// since the previous checkpoint (from-netdev), a recent flood flow's
	// ACK (from-netdev), the forward packet of an east-west flow kept for
	// timing (from-pod; not one of the tallied flows, which timing would
	// keep alive).
	NSNewFlowNs     float64 `json:"ns_new_flow_ns"`
	NSEstablishedNs float64 `json:"ns_established_ns"`
	EWEstablishedNs float64 `json:"ew_established_ns"`
	// EmptyNs is the empty program's time, measured at the checkpoint
	// and subtracted from the three.
	EmptyNs float64 `json:"empty_ns"`
	// FloodRate is new flows per second of wall time while injecting.
	FloodRate    float64 `json:"flood_rate"`
	CreateFailed uint64  `json:"ct_create_failed"`
}

// Result is one run.
type Result struct {
	Mode        string `json:"mode"` // zones or shared
	Talk        string `json:"talk"`
	EWSize      uint32 `json:"ew_size"`
	NSSize      uint32 `json:"ns_size"`
	Established int    `json:"established"`
	// Memlock is each conntrack map's kernel memory, bytes.
	Memlock     map[string]uint64 `json:"memlock"`
	Checkpoints []Checkpoint      `json:"checkpoints"`
}

var (
	nodeAddr = netip.MustParseAddr("198.18.254.1")
	probe    = netip.MustParseAddrPort("198.18.0.11:20000")
	nodePort = netip.AddrPortFrom(nodeAddr, 30080)
	podNet   = netip.MustParseAddr("198.18.2.0").As4()
)

// localPod is the address of NodePort backend i, a pod of this node.
func localPod(i int) netip.Addr {
	a := podNet
	a[3] = byte(10 + i)
	return netip.AddrFrom4(a)
}

// Name is a run's mode and talk pattern.
func (o Options) Name() string { return o.mode() + "/" + o.talk() }

func (o Options) mode() string {
	if o.Zones {
		return "zones"
	}
	return "shared"
}

func (o Options) talk() string {
	if o.Period == 0 {
		return "idle"
	}
	return fmt.Sprintf("talk-every-%gx", o.Period)
}

// Run runs one mode, on CPU 0.
func Run(o Options) (*Result, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var orig, cpu0 unix.CPUSet
	if err := unix.SchedGetaffinity(0, &orig); err != nil {
		return nil, err
	}
	defer unix.SchedSetaffinity(0, &orig)
	cpu0.Set(0)
	if err := unix.SchedSetaffinity(0, &cpu0); err != nil {
		return nil, err
	}

	cfg := loader.DefaultConfig()
	cfg.HostRouting = loader.HostRoutingStack // local backends: into the stack
	cfg.CTMapSize, cfg.CTNorthSouthMapSize = o.EWSize, o.NSSize
	if !o.Zones {
		cfg.CTMapSize, cfg.CTNorthSouthMapSize = o.EWSize+o.NSSize, 0
	}
	env, err := inject.NewEnv(cfg)
	if err != nil {
		return nil, fmt.Errorf("load datapath: %w", err)
	}
	defer env.Close()
	empty, err := lruscale.EmptyProgram()
	if err != nil {
		return nil, err
	}
	defer empty.Close()
	if err := programNode(env, o.Backends); err != nil {
		return nil, err
	}
	if err := lruscale.ProgramVIP(env, o.Backends); err != nil {
		return nil, err
	}
	flows, err := lruscale.OpenFlows(env, o.Established)
	if err != nil {
		return nil, err
	}
	if v, _, err := env.Inject(inject.FromPod, packet.TCP(probe, lruscale.VIP, packet.SYN, nil, packet.Opts{})); err != nil || v != inject.OK {
		return nil, fmt.Errorf("open the timing flow: verdict %s: %v", v, err)
	}
	res := &Result{Mode: o.mode(), Talk: o.talk(), EWSize: o.EWSize, NSSize: o.NSSize,
		Established: o.Established, Memlock: map[string]uint64{}}
	for _, z := range ct.Zones(env.DP.Maps) {
		if info, err := z.Map.Info(); err == nil {
			if b, ok := info.Memlock(); ok {
				res.Memlock[z.MapName] = b
			}
		}
	}

	every := 0 // flood flows between two talks
	if o.Period > 0 && o.Established > 0 {
		every = max(int(o.Period*float64(o.NSSize))/2/o.Established, 1)
	}
	next := 0
	for i, fill := range o.Fills {
		target := int(fill * float64(o.NSSize) / 2)
		var synNs time.Duration
		syns := 0
		start := time.Now()
		for ; next < target; next++ {
			ret, d, err := env.DP.FromNetdev.Benchmark(packet.TCP(lruscale.FloodClient(next), nodePort, packet.SYN, nil, packet.Opts{}), 1, nil)
			if err != nil {
				return nil, fmt.Errorf("inject new north-south flow %d: %w", next, err)
			}
			if inject.Verdict(ret) != inject.OK {
				return nil, fmt.Errorf("new north-south flow %d: verdict %s", next, inject.Verdict(ret))
			}
			synNs += d
			syns++
			if every > 0 && next%every == 0 {
				if err := flows.Talk(); err != nil {
					return nil, err
				}
			}
		}
		wall := time.Since(start)
		c := Checkpoint{Fill: fill}
		if c.EmptyNs, err = lruscale.MeanNs(empty, probePacket(), o.Samples); err != nil {
			return nil, err
		}
		if syns > 0 {
			c.NSNewFlowNs = float64(synNs.Nanoseconds())/float64(syns) - c.EmptyNs
			c.FloodRate = float64(syns) / wall.Seconds()
		}
		if i == len(o.Fills)-1 {
			for range flows.Len() {
				if err := flows.Talk(); err != nil {
					return nil, err
				}
			}
		}
		if err := checkpoint(env, flows, o, next, &c); err != nil {
			return nil, err
		}
		res.Checkpoints = append(res.Checkpoints, c)
	}
	return res, nil
}

func probePacket() []byte {
	return packet.TCP(probe, lruscale.VIP, packet.ACK, []byte("keepalive"), packet.Opts{})
}

// checkpoint observes the east-west flows, times both zones' packets and
// reads the maps.
func checkpoint(env *inject.Env, flows *lruscale.Flows, o Options, floodFlows int, c *Checkpoint) error {
	t, err := flows.Observe()
	if err != nil {
		return err
	}
	c.Evicted, c.Lost, c.Moved, c.Reselected, c.Unxlated = t.Evicted, t.Lost, t.Moved, t.Reselected, t.Unxlated
	ns, err := lruscale.MeanNs(env.DP.FromPod, probePacket(), o.Samples)
	if err != nil {
		return err
	}
	c.EWEstablishedNs = ns - c.EmptyNs
	ack := packet.TCP(lruscale.FloodClient(max(floodFlows-1, 0)), nodePort, packet.ACK, nil, packet.Opts{})
	if ns, err = lruscale.MeanNs(env.DP.FromNetdev, ack, o.Samples); err != nil {
		return err
	}
	c.NSEstablishedNs = ns - c.EmptyNs
	counters, err := env.Counters()
	if err != nil {
		return err
	}
	c.CreateFailed = counters["ct_create_failed"]
	now, err := ct.Now()
	if err != nil {
		return err
	}
	p, err := ct.ReadPressure(env.DP.Maps.CT, now)
	if err != nil {
		return err
	}
	c.EWEntries, c.EWOrphans = p.Entries, p.Orphans
	if env.DP.Maps.CTNS != nil {
		if p, err = ct.ReadPressure(env.DP.Maps.CTNS, now); err != nil {
			return err
		}
		c.NSEntries, c.NSOrphans = p.Entries, p.Orphans
	}
	return nil
}

// programNode makes the datapath a node with address nodeAddr, a
// NodePort over backends pods of its own: a new north-south flow is
// DNATed into the stack, no route needed.
func programNode(env *inject.Env, backends int) error {
	m := env.DP.Maps
	if err := nodeaddrs.Sync(m.NodeAddrs, []netip.Addr{nodeAddr}); err != nil {
		return err
	}
	svc := service.Service{Name: "default/zones", Frontend: service.Frontend{Addr: netip.IPv4Unspecified(), Port: nodePort.Port(),
		Protocol: service.TCP, Kind: service.NodePort}}
	for i := range backends {
		svc.Backends = append(svc.Backends, service.Backend{Addr: localPod(i), Port: 8080})
		if err := endpoints.Upsert(env.DP.Endpoints, endpoints.Endpoint{Addrs: []netip.Addr{localPod(i)}, Ifindex: 1000 + i,
			MAC: packet.PodMAC, NodeMAC: packet.HostMAC}); err != nil {
			return fmt.Errorf("register pod %s: %w", localPod(i), err)
		}
	}
	return env.Services.Upsert(svc)
}
