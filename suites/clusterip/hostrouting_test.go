package clusterip

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket/layers"

	"github.com/servicepath/servicepath/datapath/endpoints"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/packet"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
)

// BPF host routing decides by the node's routes and its local pods, so its
// fixtures run in a node netns of a real topology: bpf_fib_lookup in
// BPF_PROG_TEST_RUN looks up in the netns of the thread running it, on the
// device named by the context's ifindex. Node 0 holds the client
// (198.18.0.10) and backend-1 (198.18.0.11), the fixture family's first
// two addresses; node 1 holds "remote" (198.18.1.10), reached over the
// wire. Local pods are registered with the fixture MACs, so a packet
// delivered into one reads as packet.Opts{FromHost: true}.

// registerPods puts the node's local pods in sp_endpoints, with the
// fixture MACs.
func registerPods(e *inject.Env, topo *topology.Topology, names ...string) error {
	for _, name := range names {
		p := topo.Pod(name)
		if err := endpoints.Upsert(e.DP.Endpoints, endpoints.Endpoint{
			Addrs: []netip.Addr{p.IPv4, p.IPv6}, Ifindex: p.HostIfIndex, Flags: endpoints.TCIngress,
			MAC: packet.PodMAC, NodeMAC: packet.HostMAC,
		}); err != nil {
			return fmt.Errorf("register %s: %w", name, err)
		}
	}
	return nil
}

type routeFixture struct {
	name    string
	routing loader.HostRouting
	// setup programs services and sends earlier packets, with send.
	setup    func(e *inject.Env, send func(pod string, pkt []byte) error) error
	from     string // the pod whose device the packet leaves by
	gsoSize  uint32 // non-zero: input is a GSO packet of such segments
	input    []byte
	verdict  inject.Verdict
	output   []byte // nil: unchanged
	counters map[string]uint64
}

func routeFixtures(f Family, remote netip.Addr, node netip.Addr) []routeFixture {
	name := func(s string) string { return f.Name + "/" + s }
	backend := f.backend(0)
	remoteBackend := netip.AddrPortFrom(remote, BackendPort)
	syn := packet.TCP(f.Client, f.vip(), packet.SYN, nil, packet.Opts{})
	// What BPF routes has its TTL / hop limit decremented, as ip_forward
	// would; what would leave with 0 goes up the stack instead, which
	// answers with time exceeded.
	forwarded := reply().Forwarded()
	lastHop := packet.Opts{Hops: 63}
	selfClient := netip.AddrPortFrom(f.Backends[0], f.Client.Port()) // backend-1 as its own client
	svc := upsertOnly(f.Service(service.TCP, f.active(0)))
	replyPkt := packet.TCP(backend, f.Client, packet.SYNACK, nil, packet.Opts{})
	remoteFlow := func(e *inject.Env, send func(string, []byte) error) error {
		if err := upsertOnly(f.Service(service.TCP, service.Backend{Addr: remote, Port: BackendPort}))(e, send); err != nil {
			return err
		}
		return send("client", syn)
	}
	// Two segments' worth, over the wire's 1500-byte MTU.
	bulk := packet.TCP(f.Client, f.vip(), packet.ACK, make([]byte, 2800), packet.Opts{})
	bulkOut := packet.TCP(f.Client, remoteBackend, packet.ACK, make([]byte, 2800), packet.Opts{})
	bulkRouted := packet.TCP(f.Client, remoteBackend, packet.ACK, make([]byte, 2800), packet.Opts{}.Forwarded())
	reqThenReply := func(e *inject.Env, send func(string, []byte) error) error {
		if err := svc(e, send); err != nil {
			return err
		}
		return send("client", syn)
	}
	return []routeFixture{{
		name:     name("request-to-local-backend-redirected-into-its-pod"),
		routing:  loader.HostRoutingBPF,
		setup:    svc,
		from:     "client",
		input:    syn,
		verdict:  inject.Redirect,
		output:   packet.TCP(f.Client, backend, packet.SYN, nil, forwarded),
		counters: inject.CountersOf("lb_new", 1, "pass", 1, "redirect_peer", 1),
	}, {
		name:     name("request-to-local-backend-ttl-expiring-up-the-stack"),
		routing:  loader.HostRoutingBPF,
		setup:    svc,
		from:     "client",
		input:    packet.TCP(f.Client, f.vip(), packet.SYN, nil, lastHop),
		verdict:  inject.OK,
		output:   packet.TCP(f.Client, backend, packet.SYN, nil, lastHop),
		counters: inject.CountersOf("lb_new", 1, "ttl_exceeded", 1),
	}, {
		// Hairpinned, it goes back into the pod one hop on, not through
		// host routing; expiring, host routing leaves it to the stack,
		// counted once.
		name:     name("hairpin-one-hop-on"),
		routing:  loader.HostRoutingBPF,
		setup:    svc,
		from:     "backend-1",
		input:    packet.TCP(selfClient, f.vip(), packet.SYN, nil, packet.Opts{}),
		verdict:  inject.Redirect,
		output:   packet.TCP(netip.AddrPortFrom(f.hairpinAddr(), selfClient.Port()), backend, packet.SYN, nil, forwarded),
		counters: inject.CountersOf("lb_new", 1, "hairpin", 1),
	}, {
		name:     name("hairpin-ttl-expiring-up-the-stack-counted-once"),
		routing:  loader.HostRoutingBPF,
		setup:    svc,
		from:     "backend-1",
		input:    packet.TCP(selfClient, f.vip(), packet.SYN, nil, lastHop),
		verdict:  inject.OK,
		output:   packet.TCP(selfClient, backend, packet.SYN, nil, lastHop),
		counters: inject.CountersOf("lb_new", 1, "ttl_exceeded", 1),
	}, {
		// redirect_peer skips the client's to-pod program: the reply must
		// leave here already carrying the VIP.
		name:     name("reply-translated-to-vip-before-redirect-into-client"),
		routing:  loader.HostRoutingBPF,
		setup:    reqThenReply,
		from:     "backend-1",
		input:    replyPkt,
		verdict:  inject.Redirect,
		output:   packet.TCP(f.vip(), f.Client, packet.SYNACK, nil, forwarded),
		counters: inject.CountersOf("pass", 1, "rev_nat", 1, "redirect_peer", 1),
	}, {
		// Untranslated: the client's to-pod program translates the stack's
		// error about it, or the reply itself had it been forwarded.
		name:     name("reply-ttl-expiring-up-the-stack-untranslated"),
		routing:  loader.HostRoutingBPF,
		setup:    reqThenReply,
		from:     "backend-1",
		input:    packet.TCP(backend, f.Client, packet.SYNACK, nil, lastHop),
		verdict:  inject.OK,
		counters: inject.CountersOf("pass", 1, "ttl_exceeded", 1),
	}, {
		name:    name("icmp-error-from-backend-rewritten-before-redirect-into-client"),
		routing: loader.HostRoutingBPF,
		setup: func(e *inject.Env, send func(string, []byte) error) error {
			if err := upsertOnly(f.Service(service.UDP, f.active(0)))(e, send); err != nil {
				return err
			}
			return send("client", udp(f.Client, f.vip()))
		},
		from:     "backend-1",
		input:    packet.ICMPError(packet.PortUnreachable, backend.Addr(), f.Client.Addr(), quote(packet.L3(layers.IPProtocolUDP, f.Client, backend, packet.TCPFlags{}, payload, packet.Opts{})), packet.Opts{}),
		verdict:  inject.Redirect,
		output:   packet.ICMPError(packet.PortUnreachable, f.VIP, f.Client.Addr(), quote(packet.L3(layers.IPProtocolUDP, f.Client, f.vip(), packet.TCPFlags{}, payload, packet.Opts{})), forwarded),
		counters: inject.CountersOf("pass", 1, "icmp_rev_nat", 1, "redirect_peer", 1),
	}, {
		name:     name("request-to-remote-backend-fib-lookup-and-redirect-neigh"),
		routing:  loader.HostRoutingBPF,
		setup:    upsertOnly(f.Service(service.TCP, service.Backend{Addr: remote, Port: BackendPort})),
		from:     "client",
		input:    syn,
		verdict:  inject.Redirect,
		output:   packet.TCP(f.Client, remoteBackend, packet.SYN, nil, packet.Opts{}.Forwarded()),
		counters: inject.CountersOf("lb_new", 1, "redirect_neigh", 1),
	}, {
		name:     name("request-to-remote-backend-ttl-expiring-up-the-stack"),
		routing:  loader.HostRoutingBPF,
		setup:    upsertOnly(f.Service(service.TCP, service.Backend{Addr: remote, Port: BackendPort})),
		from:     "client",
		input:    packet.TCP(f.Client, f.vip(), packet.SYN, nil, lastHop),
		verdict:  inject.OK,
		output:   packet.TCP(f.Client, remoteBackend, packet.SYN, nil, lastHop),
		counters: inject.CountersOf("lb_new", 1, "ttl_exceeded", 1),
	}, {
		// A BIG TCP packet's IP length field reads 0: the programs take
		// no length from it, and leave it 0.
		name:     name("big-tcp-packet-to-local-backend-dnat-and-redirect-length-field-kept-zero"),
		routing:  loader.HostRoutingBPF,
		setup:    reqThenReply,
		from:     "client",
		gsoSize:  1400,
		input:    packet.BigTCP(packet.TCP(f.Client, f.vip(), packet.ACK, make([]byte, 2800), packet.Opts{})),
		verdict:  inject.Redirect,
		output:   packet.BigTCP(packet.TCP(f.Client, backend, packet.ACK, make([]byte, 2800), forwarded)),
		counters: inject.CountersOf("lb_established", 1, "pass", 1, "redirect_peer", 1),
	}, {
		// A GSO packet over the MTU (TSO, BIG TCP: over 64 KiB in truth,
		// within a page here) leaves in segments: the FIB must not
		// measure it against the MTU, or every bulk packet of a flow
		// off the node would go up the stack.
		name:     name("gso-packet-over-the-mtu-to-remote-backend-redirect-neigh"),
		routing:  loader.HostRoutingBPF,
		setup:    remoteFlow,
		from:     "client",
		gsoSize:  1400,
		input:    bulk,
		verdict:  inject.Redirect,
		output:   bulkRouted,
		counters: inject.CountersOf("lb_established", 1, "redirect_neigh", 1),
	}, {
		name:    name("packet-over-the-mtu-to-remote-backend-left-to-the-stack"),
		routing: loader.HostRoutingBPF,
		setup:   remoteFlow, from: "client", input: bulk, verdict: inject.OK, output: bulkOut,
		counters: inject.CountersOf("lb_established", 1, "fib_pass", 1),
	}, {
		name:     name("to-the-node-itself-goes-up-the-stack"),
		routing:  loader.HostRoutingBPF,
		from:     "client",
		input:    packet.TCP(f.Client, netip.AddrPortFrom(node, 10250), packet.SYN, nil, packet.Opts{}),
		verdict:  inject.OK,
		counters: inject.CountersOf("pass", 1, "fib_pass", 1),
	}, {
		name:     name("source-not-a-local-pod-untouched"),
		routing:  loader.HostRoutingBPF,
		from:     "client",
		input:    packet.TCP(netip.AddrPortFrom(f.Other, 40000), backend, packet.SYN, nil, packet.Opts{}),
		verdict:  inject.OK,
		counters: inject.CountersOf("pass", 1),
	}, {
		name:     name("upper-stack-routing-leaves-it-to-the-stack"),
		routing:  loader.HostRoutingStack,
		setup:    svc,
		from:     "client",
		input:    syn,
		verdict:  inject.OK,
		output:   packet.TCP(f.Client, backend, packet.SYN, nil, packet.Opts{}),
		counters: inject.CountersOf("lb_new", 1),
	}}
}

func upsertOnly(s service.Service) func(e *inject.Env, _ func(string, []byte) error) error {
	return func(e *inject.Env, _ func(string, []byte) error) error { return e.Services.Upsert(s) }
}

// TestHostRoutingFixtures is the host-routing table, run as every fixture
// table is (inject.Run), on the pods' devices of a real topology.
func TestHostRoutingFixtures(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireFeature(t, "BPF host routing", "5.10", loader.ProbeHostRouting())
	topo := topology.NewForTest(t, topology.Spec{Name: "fib", Nodes: 2, Pods: []topology.PodSpec{
		{Name: "client"}, {Name: "backend-1"}, {Name: "remote", Node: 1},
	}})
	device := func(pod string) *inject.Device {
		return &inject.Device{Do: topo.Node.Do, Ifindex: topo.Pod(pod).HostIfIndex}
	}
	gsoDevice := func(pod string, gsoSize uint32) *inject.Device {
		d := device(pod)
		d.GSOSize = gsoSize
		return d
	}
	remote := topo.Pod("remote")
	var fixtures []inject.Fixture
	for _, f := range append(routeFixtures(V4, remote.IPv4, topo.Node.GatewayIPv4), routeFixtures(V6, remote.IPv6, topo.Node.IPv6)...) {
		fixtures = append(fixtures, inject.Fixture{
			Name:   f.name,
			Config: func(c *loader.Config) { c.HostRouting = f.routing },
			Setup: func(e *inject.Env) error {
				if err := registerPods(e, topo, "client", "backend-1"); err != nil || f.setup == nil {
					return err
				}
				return f.setup(e, func(pod string, pkt []byte) error {
					_, _, err := e.InjectOn(device(pod), inject.FromPod, pkt)
					return err
				})
			},
			On: gsoDevice(f.from, f.gsoSize), Hook: inject.FromPod, Input: f.input, Verdict: f.verdict, Output: f.output,
			Counters: f.counters,
		})
	}
	inject.Run(t, fixtures)
}
