// Command servicepath-demo shows servicepath doing its job: a client pod
// and three backend pods on a node (all network namespaces of its own),
// the datapath loaded and a Service + EndpointSlice manifest applied with
// the servicepath CLI, then thousands of real TCP and UDP exchanges
// through the VIP. It prints the spread over backends and fails unless
// every reply came from the VIP.
package main

import (
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/metrics"
	"github.com/servicepath/servicepath/datapath/mounts"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/stats"
	"github.com/servicepath/servicepath/harness/topology"
	"github.com/servicepath/servicepath/harness/traffic"
	"github.com/servicepath/servicepath/k8s"
)

var backends = []string{"backend-1", "backend-2", "backend-3"}

func main() {
	bin := flag.String("servicepath", "bin/servicepath", "the servicepath binary")
	manifest := flag.String("manifest", "deploy/examples/demo.yaml", "Service + EndpointSlice manifest (its endpoints must be the demo pods' addresses)")
	n := flag.Int("n", 2000, "exchanges per protocol and address family")
	flag.Parse()
	if err := run(*bin, *manifest, *n); err != nil {
		fmt.Fprintf(os.Stderr, "demo failed: %v\n", err)
		os.Exit(1)
	}
}

func run(bin, manifest string, n int) error {
	if os.Geteuid() != 0 {
		return errors.New("needs root: it creates network namespaces and loads BPF programs")
	}
	bin, err := filepath.Abs(bin)
	if err != nil {
		return err
	}
	objs, err := k8s.ReadManifests(manifest)
	if err != nil {
		return err
	}
	res, err := k8s.Translate(objs.Services, objs.EndpointSlices)
	if err != nil {
		return err
	}

	step("building a node with a client pod and three backend pods")
	topo, err := topology.New(topology.Spec{Name: "demo", Pods: []topology.PodSpec{
		{Name: "client"}, {Name: backends[0]}, {Name: backends[1]}, {Name: backends[2]},
	}})
	if err != nil {
		return err
	}
	defer topo.Close()
	identity := map[netip.Addr]string{}
	var devices []string
	for _, p := range topo.Pods {
		fmt.Printf("  %-10s %-14s %-14s host device %s\n", p.Name, p.IPv4, p.IPv6, p.HostIf)
		identity[p.IPv4], identity[p.IPv6] = p.Name, p.Name
		devices = append(devices, p.HostIf)
	}

	// Every backend serves each port the manifest's endpoints use.
	ports := map[uint16]bool{}
	for _, s := range res.Services {
		for _, b := range s.Backends {
			if identity[b.Addr] == "" || identity[b.Addr] == "client" {
				return fmt.Errorf("%s: endpoint %s is not a demo backend pod", manifest, b.Addr)
			}
			ports[b.Port] = true
		}
	}
	for _, name := range backends {
		for port := range ports {
			srv, err := traffic.Serve(topo.Pod(name), name, port)
			if err != nil {
				return err
			}
			defer srv.Close()
		}
	}

	dir, err := os.MkdirTemp("", "servicepath-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	// Mounted here, in the host mount namespace: each `ip netns exec` runs
	// in a mount namespace of its own that dies with the command.
	bpffs := filepath.Join(dir, "bpffs")
	if err := mounts.EnsureBPFFS(bpffs); err != nil {
		return err
	}
	defer unix.Unmount(bpffs, unix.MNT_DETACH)

	sp := func(args ...string) error {
		full := append([]string{"netns", "exec", topo.Node.Name, bin}, args...)
		fmt.Printf("\n$ servicepath %s\n", strings.Join(args, " "))
		cmd := exec.Command("ip", full...)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		return cmd.Run()
	}
	step("loading the datapath and applying " + manifest)
	if err := sp("load", "--bpffs", bpffs, "--device", strings.Join(devices, ",")); err != nil {
		return err
	}
	defer sp("unload", "--bpffs", bpffs)
	if err := sp("apply", "--bpffs", bpffs, "-f", manifest); err != nil {
		return err
	}
	if err := sp("services", "--bpffs", bpffs); err != nil {
		return err
	}

	client := topo.Pod("client")
	step("per-packet load balancing: the tc programs on the pod devices")
	failed := exchangeAll(client, res.Services, n)

	// Socket-level load balancing: the hooks of a cgroup this demo creates
	// and joins, so its own sockets are translated at connect and sendmsg.
	// The cgroup2 hierarchy is mounted again under the demo's directory:
	// `ip netns exec` replaces /sys, hiding the usual mount point.
	root := filepath.Join(dir, "cgroup")
	if err := os.Mkdir(root, 0o755); err != nil {
		return err
	}
	if err := unix.Mount("none", root, "cgroup2", 0, ""); err != nil {
		return fmt.Errorf("mount cgroup2: %w", err)
	}
	defer unix.Unmount(root, unix.MNT_DETACH)
	cg, err := os.MkdirTemp(root, "servicepath-demo-")
	if err != nil {
		return err
	}
	defer os.Remove(cg)
	step("socket-level load balancing: the same exchanges from a cgroup with the socket hooks")
	if err := sp("load", "--bpffs", bpffs, "--device", strings.Join(devices, ","), "--cgroup", cg); err != nil {
		return err
	}
	before, err := counters(bpffs)
	if err != nil {
		return err
	}
	home, err := mounts.OwnCgroup()
	if err != nil {
		return err
	}
	if err := mounts.JoinCgroup(cg); err != nil {
		return err
	}
	failed = exchangeAll(client, res.Services, n/2) || failed
	if err := mounts.JoinCgroup(home); err != nil {
		return err
	}
	after, err := counters(bpffs)
	if err != nil {
		return err
	}
	xlate, perPacket := after["sock_xlate"]-before["sock_xlate"], after["lb_new"]-before["lb_new"]
	fmt.Printf("\n  socket hooks translated %d connects and sends; the per-packet path load-balanced %d new flows\n", xlate, perPacket)
	if xlate == 0 || perPacket != 0 {
		fmt.Println("  FAILED: the socket layer should have done all the work")
		failed = true
	}

	step("datapath counters")
	if err := sp("stats", "--bpffs", bpffs); err != nil {
		return err
	}
	if failed {
		return errors.New("some exchanges failed or were not spread uniformly (see above)")
	}
	fmt.Println("\ndemo passed: every exchange went through the VIP to a backend and came back from the VIP")
	return nil
}

func step(s string) { fmt.Printf("\n== %s\n", s) }

// exchangeAll runs n exchanges per frontend from the client pod, prints
// the spread over backends and says whether anything failed.
func exchangeAll(client *topology.Pod, services []service.Service, n int) (failed bool) {
	for _, s := range services {
		vip := netip.AddrPortFrom(s.Frontend.Addr, s.Frontend.Port)
		fmt.Printf("\n  %d %s exchanges from the client pod to %s (%s)\n", n, s.Frontend.Protocol, vip, s.Name)
		start := time.Now()
		tally, err := traffic.Run(n, func(i int) (traffic.Reply, error) {
			payload := []byte(fmt.Sprintf("demo %d", i))
			if s.Frontend.Protocol == service.UDP {
				r, err := traffic.UDPExchange(client, vip, payload, 3*time.Second)
				if err == nil && r.Peer != vip {
					err = fmt.Errorf("reply came from %s, not from the VIP", r.Peer)
				}
				return r, err
			}
			r, err := traffic.TCPExchange(client, vip, payload, 3*time.Second)
			if err == nil && r.Peer != vip {
				err = fmt.Errorf("connection's peer is %s, not the VIP", r.Peer)
			}
			return r, err
		})
		if err != nil {
			fmt.Printf("  FAILED: %v\n", err)
			failed = true
			continue
		}
		counts := tally.Counts(backends...)
		chi, df := stats.ChiSquareUniform(counts)
		crit := stats.ChiSquareCritical(df, stats.SpreadAlpha)
		tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		for i, name := range backends {
			fmt.Fprintf(tw, "  %s\t%d\t%s\n", name, counts[i], strings.Repeat("#", counts[i]*40/n))
		}
		tw.Flush()
		verdict := "uniform"
		if chi >= crit {
			verdict, failed = "NOT uniform", true
		}
		fmt.Printf("  every reply came from %s; %.0f exchanges/s; chi-square %.2f (%s: bound %.2f at alpha %g)\n",
			vip, float64(n)/time.Since(start).Seconds(), chi, verdict, crit, stats.SpreadAlpha)
	}
	return failed
}

// counters reads the datapath counters from the pinned maps.
func counters(bpffs string) (map[string]uint64, error) {
	m, err := maps.OpenPinned(bpffs)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	return metrics.Read(m.Metrics)
}
