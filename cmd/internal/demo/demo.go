// Package demo is what make demo and make demo-agent share: a node with a
// client pod and three backend pods (or two nodes with a backend each and
// an external client) serving every port a manifest's endpoints use, a
// bpffs of the demo's own per node, the servicepath CLI run in a node, and
// exchanges through each frontend with their spread checked.
package demo

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/mounts"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/stats"
	"github.com/servicepath/servicepath/harness/topology"
	"github.com/servicepath/servicepath/harness/traffic"
	"github.com/servicepath/servicepath/k8s"
)

// Backends names the backend pods; the manifest's endpoints must be theirs.
var Backends = []string{"backend-1", "backend-2", "backend-3"}

// Step prints a heading.
func Step(s string) { fmt.Printf("\n== %s\n", s) }

// Bed is a running demo: one node, or two with an external client.
type Bed struct {
	Topo     *topology.Topology
	Client   *topology.Pod // nil in a north-south bed
	Services []service.Service
	// Objects are the manifest's Kubernetes objects.
	Objects *k8s.Objects
	// Devices and BPFFS are the first node's pod devices and bpffs;
	// Nodes has every node's.
	Devices []string
	Nodes   []*Node
	// Dir is the demo's temporary directory, BPFFS a bpffs mounted in
	// it, Bin the servicepath binary.
	Dir, BPFFS string
	Bin        string
	closers    []func()
}

// Node is one demo node: its pods' host devices and its own bpffs.
type Node struct {
	*topology.Node
	Devices []string
	BPFFS   string
}

// Start builds the one-node bed for manifest, whose endpoints must be the
// backend pods' addresses, with bin the servicepath binary.
func Start(name, bin, manifest string) (*Bed, error) {
	Step("building a node with a client pod and three backend pods")
	return start(name, bin, manifest, topology.Spec{Name: name, Pods: []topology.PodSpec{
		{Name: "client"}, {Name: Backends[0]}, {Name: Backends[1]}, {Name: Backends[2]},
	}})
}

// StartNorthSouth builds two nodes joined by a wire, backend-1 on the
// first and backend-2 on the second, and an external client on the wire.
func StartNorthSouth(name, bin, manifest string) (*Bed, error) {
	Step("building two nodes with a backend pod each, and an external client on their wire")
	return start(name, bin, manifest, topology.Spec{Name: name, Nodes: 2, External: true, Pods: []topology.PodSpec{
		{Name: Backends[0]}, {Name: Backends[1], Node: 1},
	}})
}

func start(name, bin, manifest string, spec topology.Spec) (*Bed, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("needs root: it creates network namespaces and loads BPF programs")
	}
	b := &Bed{}
	var err error
	if b.Bin, err = filepath.Abs(bin); err != nil {
		return nil, err
	}
	if b.Objects, err = k8s.ReadManifests(manifest); err != nil {
		return nil, err
	}
	res, err := k8s.Translate(b.Objects.Services, b.Objects.EndpointSlices)
	if err != nil {
		return nil, err
	}
	b.Services = res.Services

	topo, err := topology.New(spec)
	if err != nil {
		return nil, err
	}
	b.Topo = topo
	b.closers = append(b.closers, func() { topo.Close() })
	for _, p := range topo.Pods {
		if p.Name == "client" {
			b.Client = p
		}
	}
	for _, n := range topo.Nodes {
		b.Nodes = append(b.Nodes, &Node{Node: n})
	}
	identity := map[netip.Addr]string{}
	for _, p := range topo.Pods {
		fmt.Printf("  %-10s %-14s %-14s node %d, host device %s\n", p.Name, p.IPv4, p.IPv6, p.Node.Index, p.HostIf)
		identity[p.IPv4], identity[p.IPv6] = p.Name, p.Name
		n := b.Nodes[p.Node.Index]
		n.Devices = append(n.Devices, p.HostIf)
	}
	if e := topo.External; e != nil {
		fmt.Printf("  %-10s %-14s %-14s outside the nodes\n", "external", e.IPv4, e.IPv6)
		for _, n := range topo.Nodes {
			fmt.Printf("  node %d     %-14s %-14s on the wire (%s)\n", n.Index, n.WireIPv4, n.WireIPv6, topology.WireIfName)
		}
	}
	b.Devices = b.Nodes[0].Devices
	if err := b.serve(manifest, identity); err != nil {
		b.Close()
		return nil, err
	}
	if err := b.mountBPFFS(name); err != nil {
		b.Close()
		return nil, err
	}
	return b, nil
}

// serve starts, in every backend, a server on each port the endpoints use.
func (b *Bed) serve(manifest string, identity map[netip.Addr]string) error {
	ports := map[uint16]bool{}
	for _, s := range b.Services {
		for _, be := range s.Backends {
			if identity[be.Addr] == "" || identity[be.Addr] == "client" {
				return fmt.Errorf("%s: endpoint %s is not a demo backend pod", manifest, be.Addr)
			}
			ports[be.Port] = true
		}
	}
	for _, p := range b.Topo.Pods {
		if p == b.Client {
			continue
		}
		for port := range ports {
			srv, err := traffic.Serve(p, p.Name, port)
			if err != nil {
				return err
			}
			b.closers = append(b.closers, func() { srv.Close() })
		}
	}
	return nil
}

// mountBPFFS mounts bpffs in the host mount namespace: `ip netns exec`
// gives each command a mount namespace of its own that dies with it.
func (b *Bed) mountBPFFS(name string) error {
	dir, err := os.MkdirTemp("", "servicepath-"+name+"-")
	if err != nil {
		return err
	}
	b.Dir = dir
	b.closers = append(b.closers, func() { os.RemoveAll(dir) })
	for _, n := range b.Nodes {
		n.BPFFS = filepath.Join(dir, fmt.Sprintf("bpffs-node%d", n.Index))
		if err := mounts.EnsureBPFFS(n.BPFFS); err != nil {
			return err
		}
		b.closers = append(b.closers, func() { unix.Unmount(n.BPFFS, unix.MNT_DETACH) })
	}
	b.BPFFS = b.Nodes[0].BPFFS
	return nil
}

// Close tears everything down, newest first.
func (b *Bed) Close() {
	for i := len(b.closers) - 1; i >= 0; i-- {
		b.closers[i]()
	}
	b.closers = nil
}

// SP runs the servicepath CLI inside the first node, echoing the command.
func (b *Bed) SP(args ...string) error {
	return b.SPOn(b.Nodes[0], args...)
}

// SPOn runs the servicepath CLI inside node n.
func (b *Bed) SPOn(n *Node, args ...string) error {
	return b.RunOn(n, append([]string{b.Bin}, args...)...)
}

// Run runs a command inside the first node; the first servicepath
// argument is shown as `servicepath`.
func (b *Bed) Run(args ...string) error { return b.RunOn(b.Nodes[0], args...) }

// RunOn runs a command inside node n.
func (b *Bed) RunOn(n *Node, args ...string) error {
	shown := append([]string{filepath.Base(args[0])}, args[1:]...)
	fmt.Printf("\n[node %d] $ %s\n", n.Index, strings.Join(shown, " "))
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.Name}, args...)...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	return cmd.Run()
}

// Exchanges runs n exchanges from the client pod through each frontend;
// ExchangesTo says what fails.
func Exchanges(client *topology.Pod, services []service.Service, want []string, n int) (failed bool) {
	for _, s := range services {
		vip := netip.AddrPortFrom(s.Frontend.Addr, s.Frontend.Port)
		failed = ExchangesTo(client, "the client pod", vip, s.Frontend.Protocol, s.Name, want, n) || failed
	}
	return failed
}

// ExchangesTo runs n exchanges from client to dst, prints the spread, and
// says whether anything failed: an error, a reply not from dst, an answer
// from a backend not in want, or a spread over want that is not uniform.
func ExchangesTo(client traffic.Doer, from string, dst netip.AddrPort, proto service.Protocol, name string, want []string, n int) (failed bool) {
	fmt.Printf("\n  %d %s exchanges from %s to %s (%s)\n", n, proto, from, dst, name)
	start := time.Now()
	tally, err := traffic.Run(n, func(i int) (traffic.Reply, error) {
		payload := []byte(fmt.Sprintf("demo %d", i))
		var r traffic.Reply
		var err error
		if proto == service.UDP {
			r, err = traffic.UDPExchange(client, dst, payload, 3*time.Second)
		} else {
			r, err = traffic.TCPExchange(client, dst, payload, 3*time.Second)
		}
		if err == nil && r.Peer != dst {
			err = fmt.Errorf("reply came from %s, not from %s", r.Peer, dst)
		}
		return r, err
	})
	if err != nil {
		fmt.Printf("  FAILED: %v\n", err)
		return true
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	for _, name := range want {
		fmt.Fprintf(tw, "  %s\t%d\t%s\n", name, tally[name], strings.Repeat("#", tally[name]*40/n))
	}
	tw.Flush()
	counts := tally.Counts(want...)
	chi, df := stats.ChiSquareUniform(counts)
	crit := stats.ChiSquareCritical(df, stats.SpreadAlpha)
	others := n
	for _, c := range counts {
		others -= c
	}
	verdict := "uniform"
	if chi >= crit || others > 0 {
		verdict, failed = "NOT uniform over "+strings.Join(want, ", "), true
	}
	fmt.Printf("  every reply came from %s; %.0f exchanges/s; chi-square %.2f (%s: bound %.2f at alpha %g)\n",
		dst, float64(n)/time.Since(start).Seconds(), chi, verdict, crit, stats.SpreadAlpha)
	return failed
}
