package bench

import (
	"cmp"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/loader"
	testbed "github.com/servicepath/servicepath/harness/cluster"
	"github.com/servicepath/servicepath/harness/netperf"
	"github.com/servicepath/servicepath/harness/topology"
)

// PodPath is one way two endpoints talk, for pod-networking throughput and
// latency.
type PodPath struct {
	Name, Describe string
	// Baseline marks the path ratios are computed against.
	Baseline bool
	Pending  string
	// Build returns the client and server netns and the server address,
	// inside t (a node with pods "a" and "b", no datapath attached).
	Build func(t *topology.Topology) (client, server netperf.Doer, addr netip.Addr)
	// Own builds a node of its own instead, for paths that attach the
	// datapath; close tears it down. An error means the path is not
	// available here (e.g. no netkit), which the report says.
	Own func(e *Env) (client, server netperf.Doer, addr netip.Addr, close func() error, err error)
}

// hostRouted is a node with pods "a" and "b" of kind, the datapath attached
// to both with BPF host routing; bigTCP raises their devices' GSO/GRO
// limits (topology.Spec.BigTCP).
func hostRouted(kind topology.Kind, bigTCP bool) func(e *Env) (netperf.Doer, netperf.Doer, netip.Addr, func() error, error) {
	return func(e *Env) (netperf.Doer, netperf.Doer, netip.Addr, func() error, error) {
		topo, err := bigTCPTopology(topology.Spec{Name: "b-hr", Kind: kind, BigTCP: bigTCP, Pods: []topology.PodSpec{{Name: "a"}, {Name: "b"}}})
		if err != nil {
			return nil, nil, netip.Addr{}, nil, err
		}
		cfg := e.DatapathConfig()
		cfg.HostRouting = loader.HostRoutingBPF
		dp, err := loader.Load(cfg)
		if err != nil {
			return nil, nil, netip.Addr{}, nil, errors.Join(err, topo.Close())
		}
		tcSeq++
		pins := filepath.Join(e.BPFFS, fmt.Sprintf("hr-%d", tcSeq))
		closeAll := func() error { return errors.Join(os.RemoveAll(pins), dp.Close(), topo.Close()) }
		if err := testbed.AttachPods(topo, dp, attach.Auto, pins); err != nil {
			return nil, nil, netip.Addr{}, nil, errors.Join(err, closeAll())
		}
		return topo.Pod("b"), topo.Pod("a"), topo.Pod("a").IPv4, closeAll, nil
	}
}

// bigTCPTopology builds spec, failing when spec.BigTCP asked for limits
// the kernel kept below netdev.BigTCPSize, which makes a path unavailable.
func bigTCPTopology(spec topology.Spec) (*topology.Topology, error) {
	topo, err := topology.New(spec)
	if err != nil {
		return nil, err
	}
	for _, p := range topo.Pods {
		for _, b := range p.BigTCP {
			if !b.IPv4() || !b.IPv6() {
				return nil, errors.Join(fmt.Errorf("BIG TCP: the kernel left %v (refused: %v)", b, b.Refused), topo.Close())
			}
		}
	}
	return topo, nil
}

// PodPaths lists the paths in report order.
func PodPaths() []PodPath {
	return []PodPath{
		{
			Name: "loopback (reference)", Describe: "client and server in one netns over 127.0.0.1; no device at all",
			Build: func(t *topology.Topology) (netperf.Doer, netperf.Doer, netip.Addr) {
				return t.Node, t.Node, netip.MustParseAddr("127.0.0.1")
			},
		},
		{
			Name: "host baseline", Baseline: true,
			Describe: "node netns to a netns one veth away, no forwarding: the stand-in for node-to-node " +
				"(our topology builder makes one node; two hosts joined by a wire is the closest honest shape)",
			Build: func(t *topology.Topology) (netperf.Doer, netperf.Doer, netip.Addr) {
				return t.Node, t.Pod("a"), t.Pod("a").IPv4
			},
		},
		{
			Name: "veth + upper-stack forwarding", Describe: "pod -> veth -> node (IP forwarding, routing) -> veth -> pod",
			Build: func(t *topology.Topology) (netperf.Doer, netperf.Doer, netip.Addr) {
				return t.Pod("b"), t.Pod("a"), t.Pod("a").IPv4
			},
		},
		{
			Name: "veth + BPF host routing", Describe: "pod -> veth, bpf_redirect_peer at the host device -> pod",
			Own: hostRouted(topology.Veth, false),
		},
		{
			Name: "netkit + BPF host routing", Describe: "pod -> netkit (BPF in the device's xmit) -> pod; needs a kernel with netkit (6.7+)",
			Own: hostRouted(topology.NetkitL3, false),
		},
		{
			Name: "host baseline + BIG TCP", Describe: "the host baseline with both ends of the veth at 192 KiB GSO/GRO: " +
				"what BIG TCP alone gives, no datapath",
			Own: func(e *Env) (netperf.Doer, netperf.Doer, netip.Addr, func() error, error) {
				topo, err := bigTCPTopology(topology.Spec{Name: "b-hb", BigTCP: true, Pods: []topology.PodSpec{{Name: "a"}}})
				if err != nil {
					return nil, nil, netip.Addr{}, nil, err
				}
				return topo.Node, topo.Pod("a"), topo.Pod("a").IPv4, topo.Close, nil
			},
		},
		{
			Name: "veth + BPF host routing + BIG TCP", Describe: "the veth path with both pods' devices at 192 KiB GSO/GRO " +
				"(IPv4 needs 6.3+): TCP hands the path GSO packets up to 192 KiB, not 64 KiB",
			Own: hostRouted(topology.Veth, true),
		},
		{
			Name: "netkit + BPF host routing + BIG TCP", Describe: "the netkit path with both pods' devices at 192 KiB GSO/GRO",
			Own: hostRouted(topology.NetkitL3, true),
		},
	}
}

type podServers struct {
	sink, rr *netperf.Server
	client   netperf.Doer
	addr     netip.Addr
}

func (r *Runner) podNetwork(res *Results) error {
	p := r.Profile
	topo, err := topology.New(topology.Spec{Name: "b-pod", Pods: []topology.PodSpec{{Name: "a"}, {Name: "b"}}})
	if err != nil {
		return err
	}
	defer topo.Close()
	paths := PodPaths()
	servers := make([]*podServers, len(paths))
	unavailable := make([]string, len(paths))
	defer func() {
		for _, s := range servers {
			if s != nil {
				s.sink.Close()
				s.rr.Close()
			}
		}
	}()
	for i, path := range paths {
		if path.Pending != "" {
			continue
		}
		var client, server netperf.Doer
		var addr netip.Addr
		if path.Own != nil {
			var closeOwn func() error
			client, server, addr, closeOwn, err = path.Own(r.Env)
			if err != nil {
				unavailable[i] = err.Error()
				r.Progress("  pod %-36s not available here: %v", path.Name, err)
				continue
			}
			defer closeOwn()
		} else {
			client, server, addr = path.Build(topo)
		}
		sink, err := netperf.Listen(server, 0, r.Env.CPU, netperf.Sink, 0)
		if err != nil {
			return fmt.Errorf("%s: sink: %w", path.Name, err)
		}
		rr, err := netperf.Listen(server, 0, r.Env.CPU, netperf.RR, 1)
		if err != nil {
			sink.Close()
			return fmt.Errorf("%s: RR server: %w", path.Name, err)
		}
		servers[i] = &podServers{sink: sink, rr: rr, client: client, addr: addr}
	}
	out := make([]PodResult, len(paths))
	for i, path := range paths {
		out[i] = PodResult{Path: path.Name, Describe: path.Describe, Pending: cmp.Or(path.Pending, unavailable[i])}
	}
	for rep := range p.PodRepeats {
		for i, path := range paths {
			s := servers[i]
			if s == nil {
				continue
			}
			st, err := netperf.RunStream(s.client, s.sink, s.sink.Addr(s.addr), netperf.StreamOptions{CPU: r.Env.CPU, Duration: p.StreamDuration})
			if err != nil {
				return fmt.Errorf("%s: stream: %w", path.Name, err)
			}
			out[i].Streams = append(out[i].Streams, StreamRepeat{
				Gbps: math.Round(st.Gbps()*1000) / 1000, CPUUsPerMB: round1(st.CPUMicrosPerMB()),
				Bytes: st.Sink.Bytes, MappedBytes: st.Sink.Mapped, CopiedBytes: st.Sink.Copied, Receive: st.Sink.Receive,
				SenderCPUus: st.SenderCPU.Microseconds(), ReceiverCPUus: st.Sink.CPU.Microseconds(),
			})
			l, err := netperf.RunRR(s.client, s.rr.Addr(s.addr), netperf.RROptions{CPU: r.Env.CPU, Size: 1, Warmup: p.RRSamples / 20, N: p.RRSamples})
			if err != nil {
				return fmt.Errorf("%s: RR: %w", path.Name, err)
			}
			us := netperf.Micros(l.Samples)
			sum := netperf.Summarize(us)
			// Raw RR samples are large; keep percentiles and the minimum.
			out[i].RRs = append(out[i].RRs, Round{P50: round1(sum.P50), P90: round1(sum.P90), P99: round1(sum.P99),
				ConnPerSec: math.Round(l.PerSecond()), SamplesUs: []float64{round1(sum.Min)}})
			r.Progress("  pod %-36s repeat %d: %.2f Gbit/s, %.0f us/MB CPU, RR p50 %.1f us", path.Name, rep+1, st.Gbps(), st.CPUMicrosPerMB(), sum.P50)
		}
	}
	var base *PodResult
	for i := range out {
		o := &out[i]
		if o.Pending != "" {
			continue
		}
		o.Gbps = SpreadOf(pick(o.Streams, func(x StreamRepeat) float64 { return x.Gbps }))
		o.CPUUsPerMB = SpreadOf(pick(o.Streams, func(x StreamRepeat) float64 { return x.CPUUsPerMB }))
		seen := map[string]bool{}
		for _, s := range o.Streams {
			if !seen[s.Receive] {
				seen[s.Receive] = true
				o.Receive = append(o.Receive, s.Receive)
			}
		}
		o.RRMin = SpreadOf(pick(o.RRs, func(x Round) float64 { return x.SamplesUs[0] }))
		o.RRP50 = SpreadOf(pick(o.RRs, func(x Round) float64 { return x.P50 }))
		o.RRP90 = SpreadOf(pick(o.RRs, func(x Round) float64 { return x.P90 }))
		o.RRP99 = SpreadOf(pick(o.RRs, func(x Round) float64 { return x.P99 }))
		if paths[i].Baseline {
			base = o
		}
	}
	if base == nil {
		return errors.New("no baseline path measured")
	}
	for i := range out {
		o := &out[i]
		if o.Pending == "" && base.Gbps.Median > 0 && base.RRP50.Median > 0 && base.RRP99.Median > 0 {
			o.RatioGbps = math.Round(o.Gbps.Median/base.Gbps.Median*100) / 100
			o.RatioRRP50 = math.Round(o.RRP50.Median/base.RRP50.Median*100) / 100
			o.RatioRRP99 = math.Round(o.RRP99.Median/base.RRP99.Median*100) / 100
		}
	}
	res.Pod = out
	return nil
}
