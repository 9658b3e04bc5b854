// Package demo is what make demo and make demo-agent share: a node with a
// client pod and three backend pods serving every port a manifest's
// endpoints use, a bpffs of the demo's own, the servicepath CLI run in the
// node, and exchanges through each frontend with their spread checked.
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

// Bed is a running demo node.
type Bed struct {
	Topo     *topology.Topology
	Client   *topology.Pod
	Services []service.Service
	// Objects are the manifest's Kubernetes objects.
	Objects *k8s.Objects
	Devices []string
	// Dir is the demo's temporary directory, BPFFS a bpffs mounted in
	// it, Bin the servicepath binary.
	Dir, BPFFS string
	Bin        string
	closers    []func()
}

// Start builds the bed for manifest, whose endpoints must be the backend
// pods' addresses, with bin the servicepath binary.
func Start(name, bin, manifest string) (*Bed, error) {
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

	Step("building a node with a client pod and three backend pods")
	topo, err := topology.New(topology.Spec{Name: name, Pods: []topology.PodSpec{
		{Name: "client"}, {Name: Backends[0]}, {Name: Backends[1]}, {Name: Backends[2]},
	}})
	if err != nil {
		return nil, err
	}
	b.Topo, b.Client = topo, topo.Pod("client")
	b.closers = append(b.closers, func() { topo.Close() })
	identity := map[netip.Addr]string{}
	for _, p := range topo.Pods {
		fmt.Printf("  %-10s %-14s %-14s host device %s\n", p.Name, p.IPv4, p.IPv6, p.HostIf)
		identity[p.IPv4], identity[p.IPv6] = p.Name, p.Name
		b.Devices = append(b.Devices, p.HostIf)
	}
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
	for _, name := range Backends {
		for port := range ports {
			srv, err := traffic.Serve(b.Topo.Pod(name), name, port)
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
	b.BPFFS = filepath.Join(dir, "bpffs")
	if err := mounts.EnsureBPFFS(b.BPFFS); err != nil {
		return err
	}
	b.closers = append(b.closers, func() { unix.Unmount(b.BPFFS, unix.MNT_DETACH) })
	return nil
}

// Close tears everything down, newest first.
func (b *Bed) Close() {
	for i := len(b.closers) - 1; i >= 0; i-- {
		b.closers[i]()
	}
	b.closers = nil
}

// SP runs the servicepath CLI inside the node, echoing the command.
func (b *Bed) SP(args ...string) error {
	return b.Run(append([]string{b.Bin}, args...)...)
}

// Run runs a command inside the node; the first servicepath argument is
// shown as `servicepath`.
func (b *Bed) Run(args ...string) error {
	shown := append([]string{filepath.Base(args[0])}, args[1:]...)
	fmt.Printf("\n$ %s\n", strings.Join(shown, " "))
	cmd := exec.Command("ip", append([]string{"netns", "exec", b.Topo.Node.Name}, args...)...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	return cmd.Run()
}

// Exchanges runs n exchanges from the client pod through each frontend,
// prints the spread, and says whether anything failed: an error, a reply
// not from the VIP, an answer from a backend not in want, or a spread over
// want that is not uniform.
func Exchanges(client *topology.Pod, services []service.Service, want []string, n int) (failed bool) {
	for _, s := range services {
		vip := netip.AddrPortFrom(s.Frontend.Addr, s.Frontend.Port)
		fmt.Printf("\n  %d %s exchanges from the client pod to %s (%s)\n", n, s.Frontend.Protocol, vip, s.Name)
		start := time.Now()
		tally, err := traffic.Run(n, func(i int) (traffic.Reply, error) {
			payload := []byte(fmt.Sprintf("demo %d", i))
			var r traffic.Reply
			var err error
			if s.Frontend.Protocol == service.UDP {
				r, err = traffic.UDPExchange(client, vip, payload, 3*time.Second)
			} else {
				r, err = traffic.TCPExchange(client, vip, payload, 3*time.Second)
			}
			if err == nil && r.Peer != vip {
				err = fmt.Errorf("reply came from %s, not from the VIP", r.Peer)
			}
			return r, err
		})
		if err != nil {
			fmt.Printf("  FAILED: %v\n", err)
			failed = true
			continue
		}
		tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		for _, name := range Backends {
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
			vip, float64(n)/time.Since(start).Seconds(), chi, verdict, crit, stats.SpreadAlpha)
	}
	return failed
}
