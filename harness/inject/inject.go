// Package inject runs packets through the datapath's programs with
// BPF_PROG_TEST_RUN. Fixture tables (name, map setup, input, expected
// verdict, expected output) run as tests with Run and, unchanged, as
// ns/packet benchmarks with Bench.
package inject

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/metrics"
	"github.com/servicepath/servicepath/datapath/service"
)

// Verdict is a program's return code: a tc one, or an XDP one offset by
// xdpVerdicts, since the two number alike (XDP_PASS is TC_ACT_SHOT's 2).
type Verdict uint32

const (
	OK       Verdict = 0 // TC_ACT_OK
	Shot     Verdict = 2 // TC_ACT_SHOT
	Redirect Verdict = 7 // TC_ACT_REDIRECT
)

const xdpVerdicts Verdict = 1 << 16

const (
	XDPAborted  = xdpVerdicts + iota // XDP_ABORTED
	XDPDrop                          // XDP_DROP
	XDPPass                          // XDP_PASS: to tc, then the stack
	XDPTX                            // XDP_TX: back out the device it came in on
	XDPRedirect                      // XDP_REDIRECT
)

func (v Verdict) String() string {
	switch v {
	case OK:
		return "TC_ACT_OK"
	case Shot:
		return "TC_ACT_SHOT"
	case Redirect:
		return "TC_ACT_REDIRECT"
	case XDPAborted:
		return "XDP_ABORTED"
	case XDPDrop:
		return "XDP_DROP"
	case XDPPass:
		return "XDP_PASS"
	case XDPTX:
		return "XDP_TX"
	case XDPRedirect:
		return "XDP_REDIRECT"
	}
	return fmt.Sprintf("verdict(%d)", uint32(v))
}

// Dropped is whether v drops the packet, at tc or at XDP.
func (v Verdict) Dropped() bool { return v == Shot || v == XDPDrop || v == XDPAborted }

// Hook names the program a packet is injected into.
type Hook int

const (
	// FromPod is tc ingress of the pod's host-side device.
	FromPod Hook = iota
	// ToPod is tc egress of the pod's host-side device.
	ToPod
	// FromNetdev is tc ingress of a node device.
	FromNetdev
	// ToNetdev is tc egress of a node device.
	ToNetdev
	// XDPFromNetdev is XDP of a node device, ahead of FromNetdev; its
	// datapath must be loaded with loader.Config.XDP.
	XDPFromNetdev
)

func (h Hook) String() string {
	return [...]string{"from-pod", "to-pod", "from-netdev", "to-netdev", "xdp-from-netdev"}[h]
}

func (h Hook) xdp() bool { return h == XDPFromNetdev }

// verdict names a program's return code by the hook it ran at.
func (h Hook) verdict(ret uint32) Verdict {
	if h.xdp() {
		return xdpVerdicts + Verdict(ret)
	}
	return Verdict(ret)
}

// Env is a loaded, unpinned datapath with a service manager over its maps.
type Env struct {
	DP       *loader.Datapath
	Services *service.Manager
	shims    map[Hook]*queueShim
}

// NewEnv loads the datapath with cfg (pinning ignored).
func NewEnv(cfg loader.Config) (*Env, error) {
	cfg.PinPath = ""
	dp, err := loader.Load(cfg)
	if err != nil {
		return nil, err
	}
	env := &Env{DP: dp}
	if err := env.Reset(); err != nil {
		dp.Close()
		return nil, err
	}
	return env, nil
}

// Close unloads the datapath.
func (e *Env) Close() error {
	for _, s := range e.shims {
		s.close()
	}
	return e.DP.Close()
}

// ClearMap deletes every entry of m.
func ClearMap(m *ebpf.Map) error {
	var keys [][]byte
	var k []byte
	it := m.Iterate()
	var v []byte
	for it.Next(&k, &v) {
		keys = append(keys, append([]byte(nil), k...))
	}
	if err := it.Err(); err != nil {
		return err
	}
	for _, k := range keys {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return err
		}
	}
	return nil
}

// Reset empties every map and zeroes the counters, so each fixture starts
// from nothing.
func (e *Env) Reset() error {
	m := e.DP.Maps
	for _, mp := range []*ebpf.Map{m.Services, m.Backends, m.SvcMeta, m.CT, m.Frags, m.Affinity, m.SockRevNAT,
		m.NAT, m.Netdevs, m.NodeAddrs, m.Maglev, m.SrcRanges, m.CTNS, m.FrontendAddrs, m.EDTPods, m.EDTRates} {
		if mp == nil {
			continue // a map of settings not in effect (CTNS: zones off)
		}
		if err := ClearMap(mp); err != nil {
			return fmt.Errorf("reset %s: %w", mp, err)
		}
	}
	zeros := make([]uint64, ebpf.MustPossibleCPU())
	for i := range metrics.Names {
		if err := m.Metrics.Put(uint32(i), zeros); err != nil {
			return fmt.Errorf("reset counters: %w", err)
		}
	}
	mgr, err := service.NewManager(m)
	if err != nil {
		return err
	}
	e.Services = mgr
	return nil
}

func (e *Env) prog(h Hook) (*ebpf.Program, error) {
	p := [...]*ebpf.Program{e.DP.FromPod, e.DP.ToPod, e.DP.FromNetdev, e.DP.ToNetdev, e.DP.XDPFromNetdev}[h]
	if p == nil && h.xdp() {
		if e.DP.XDPMissing != nil {
			return nil, fmt.Errorf("%s not loaded: %w", h, e.DP.XDPMissing)
		}
		return nil, fmt.Errorf("%s not loaded: the datapath was loaded without Config.XDP", h)
	}
	return p, nil
}

// Device is where an injected packet is seen: a device of a netns.
// bpf_fib_lookup then sees that netns' routes, and the program the
// device's ifindex.
type Device struct {
	Do      func(fn func() error) error
	Ifindex int
	// GSOSize marks packets seen here as GSO packets of segments that
	// size (a TSO or BIG TCP packet, which a stack hands over whole):
	// BPF_PROG_TEST_RUN takes it from the context, within a page.
	GSOSize uint32
}

// skbContext is the head of struct __sk_buff up to gso_size: the fields
// BPF_PROG_TEST_RUN reads are the device the packet is on (ifindex), cb,
// the departure time (tstamp) and its GSO segment size (the kernel's
// skb_is_gso); the rest stays zero. It gives tstamp back.
type skbContext struct {
	Head    [10]uint32 // len .. ingress_ifindex
	Ifindex uint32
	TCIndex uint32
	CB      [5]uint32
	Mid     [21]uint32 // hash .. data_meta, flow_keys
	Tstamp  uint64
	WireLen uint32
	GSOSegs uint32
	SK      uint64
	GSOSize uint32
}

// skbContextOut has room for the whole of the running kernel's
// __sk_buff, which BPF_PROG_TEST_RUN gives back entire or fails (ENOSPC).
type skbContextOut struct {
	skbContext
	Newer [64]byte // tstamp_type, hwtstamp and what later kernels add
}

// SKB is metadata of an injected packet besides its device.
type SKB struct {
	// Queue is skb->queue_mapping, which BPF_PROG_TEST_RUN wants zero:
	// the program then runs behind a shim that sets it (queueShim).
	Queue uint16
	// Tstamp is skb->tstamp, the departure time (CLOCK_MONOTONIC ns).
	Tstamp uint64
}

// xdpContext is struct xdp_md. BPF_PROG_TEST_RUN (5.15+) takes
// ingress_ifindex as the device the packet arrived on (0: loopback) and
// wants data_end to be the packet's length; it gives back the offsets of
// the packet behind the metadata the program put ahead of it.
type xdpContext struct {
	Data, DataEnd, DataMeta uint32
	IngressIfindex, RxQueue uint32
	EgressIfindex           uint32
}

// Inject runs one packet through the hook and returns the verdict and
// the packet as the program left it.
func (e *Env) Inject(h Hook, pkt []byte) (Verdict, []byte, error) {
	return e.InjectOn(nil, h, pkt)
}

// InjectOn is Inject as if the packet were on dev (nil: the caller's
// netns, loopback).
func (e *Env) InjectOn(dev *Device, h Hook, pkt []byte) (Verdict, []byte, error) {
	out, err := e.RunOn(dev, h, pkt)
	return out.Verdict, out.Packet, err
}

// Output is what a program left: its verdict, the packet, from XDP the
// metadata ahead of the packet, and from tc skb->tstamp.
type Output struct {
	Verdict Verdict
	Packet  []byte
	Meta    []byte
	Tstamp  uint64
}

// RunOn runs one packet through the hook as if it were on dev (nil: the
// caller's netns, loopback).
func (e *Env) RunOn(dev *Device, h Hook, pkt []byte) (Output, error) {
	return e.run(dev, h, pkt, dev != nil, SKB{})
}

// RunWith is RunOn with skb metadata (tc hooks only).
func (e *Env) RunWith(dev *Device, h Hook, pkt []byte, skb SKB) (Output, error) {
	return e.run(dev, h, pkt, dev != nil, skb)
}

// RunHere is RunOn from inside dev.Do: on the caller's thread, already in
// dev's netns, for runs that must stay on one thread (one CPU).
func (e *Env) RunHere(dev *Device, h Hook, pkt []byte) (Output, error) {
	return e.run(dev, h, pkt, false, SKB{})
}

func (e *Env) run(dev *Device, h Hook, pkt []byte, enter bool, skb SKB) (Output, error) {
	prog, err := e.prog(h)
	if err != nil {
		return Output{}, err
	}
	if h.xdp() && skb != (SKB{}) {
		return Output{}, fmt.Errorf("run %s: skb metadata at XDP", h)
	}
	if skb.Queue != 0 {
		if prog, err = e.queueShim(h, prog); err != nil {
			return Output{}, fmt.Errorf("run %s: %w", h, err)
		}
	}
	// Room for programs that grow the packet (ICMP replies, DSR) and, at
	// XDP, for metadata.
	opts := &ebpf.RunOptions{Data: pkt, DataOut: make([]byte, len(pkt)+512)}
	var ifindex uint32
	if dev != nil {
		ifindex = uint32(dev.Ifindex)
	}
	var xctx xdpContext
	var sctx skbContextOut
	switch {
	case h.xdp():
		opts.Context = xdpContext{DataEnd: uint32(len(pkt)), IngressIfindex: ifindex}
		opts.ContextOut = &xctx
	default:
		in := skbContext{Ifindex: ifindex, Tstamp: skb.Tstamp}
		in.CB[0] = uint32(skb.Queue)
		if dev != nil {
			in.GSOSize = dev.GSOSize
		}
		opts.Context, opts.ContextOut = in, &sctx
	}
	var ret uint32
	run := func() error {
		var err error
		ret, err = prog.Run(opts)
		return err
	}
	if enter {
		err = dev.Do(run)
	} else {
		err = run()
	}
	if err != nil {
		return Output{}, fmt.Errorf("run %s: %w", h, err)
	}
	out := Output{Verdict: h.verdict(ret), Packet: opts.DataOut, Tstamp: sctx.Tstamp}
	if h.xdp() {
		if xctx.Data > xctx.DataEnd || int(xctx.DataEnd) > len(opts.DataOut) {
			return Output{}, fmt.Errorf("run %s: packet at %d-%d of %d bytes out", h, xctx.Data, xctx.DataEnd, len(opts.DataOut))
		}
		out.Meta, out.Packet = opts.DataOut[:xctx.Data], opts.DataOut[xctx.Data:xctx.DataEnd]
	}
	return out, nil
}

// Counters returns the per-reason counters summed over CPUs.
func (e *Env) Counters() (map[string]uint64, error) {
	return metrics.Read(e.DP.Maps.Metrics)
}

// CTEntries counts conntrack entries, for fixtures that check creation.
func (e *Env) CTEntries() (int, error) {
	n := 0
	var k maps.CTKey
	var v maps.CTEntry
	it := e.DP.Maps.CT.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	return n, it.Err()
}

// flowState is the content of the maps packets change (conntrack and
// fragment tracking), to put back after a timed run.
type flowState map[*ebpf.Map]map[string][]byte

func snapshotFlows(e *Env) (flowState, error) {
	st := flowState{}
	for _, m := range []*ebpf.Map{e.DP.Maps.CT, e.DP.Maps.Frags, e.DP.Maps.NorthSouthCT()} {
		entries := map[string][]byte{}
		var k, v []byte
		it := m.Iterate()
		for it.Next(&k, &v) {
			entries[string(k)] = append([]byte(nil), v...)
		}
		if err := it.Err(); err != nil {
			return nil, err
		}
		st[m] = entries
	}
	return st, nil
}

func (st flowState) restore() error {
	for m, entries := range st {
		var stale [][]byte
		var k, v []byte
		it := m.Iterate()
		for it.Next(&k, &v) {
			if want, ok := entries[string(k)]; !ok {
				stale = append(stale, append([]byte(nil), k...))
			} else if string(want) != string(v) {
				if err := m.Put(k, want); err != nil {
					return err
				}
			}
		}
		if err := it.Err(); err != nil {
			return err
		}
		for _, k := range stale {
			if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return err
			}
		}
		for k, v := range entries {
			if err := m.Update([]byte(k), v, ebpf.UpdateNoExist); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
				return err
			}
		}
	}
	return nil
}
