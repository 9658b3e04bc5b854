// Command servicepath-demo shows servicepath doing its job: a client pod
// and three backend pods on a node (all network namespaces of its own),
// the datapath loaded and a Service + EndpointSlice manifest applied with
// the servicepath CLI, then thousands of real TCP and UDP exchanges
// through the VIP, per packet and then at the socket. Then north-south: two
// nodes, each with the node-device programs on its wire, and an external
// client using a NodePort Service at either node's address. It prints the
// spread over backends and fails unless every reply came from the address
// the client used.
package main

import (
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/cmd/internal/demo"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/metrics"
	"github.com/servicepath/servicepath/datapath/mounts"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/topology"
)

func main() {
	bin := flag.String("servicepath", "bin/servicepath", "the servicepath binary")
	manifest := flag.String("manifest", "deploy/examples/demo.yaml", "Service + EndpointSlice manifest (its endpoints must be the demo pods' addresses)")
	nodePortManifest := flag.String("nodeport-manifest", "deploy/examples/nodeport.yaml", "NodePort Service + EndpointSlices for the two-node part")
	n := flag.Int("n", 2000, "exchanges per protocol and address family")
	flag.Parse()
	err := run(*bin, *manifest, *n)
	if err == nil {
		err = northSouth(*bin, *nodePortManifest, *n/4)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo failed: %v\n", err)
		os.Exit(1)
	}
}

func run(bin, manifest string, n int) error {
	bed, err := demo.Start("demo", bin, manifest)
	if err != nil {
		return err
	}
	defer bed.Close()

	demo.Step("loading the datapath and applying " + manifest)
	if err := bed.SP("load", "--bpffs", bed.BPFFS, "--device", strings.Join(bed.Devices, ",")); err != nil {
		return err
	}
	defer bed.SP("unload", "--bpffs", bed.BPFFS)
	if err := bed.SP("apply", "--bpffs", bed.BPFFS, "-f", manifest); err != nil {
		return err
	}
	if err := bed.SP("services", "--bpffs", bed.BPFFS); err != nil {
		return err
	}

	demo.Step("per-packet load balancing: the tc programs on the pod devices")
	failed := demo.Exchanges(bed.Client, bed.Services, demo.Backends, n)

	// Socket-level load balancing: the hooks of a cgroup this demo creates
	// and joins, so its own sockets are translated at connect and sendmsg.
	// The cgroup2 hierarchy is mounted again under the demo's directory:
	// `ip netns exec` replaces /sys, hiding the usual mount point.
	root := filepath.Join(bed.Dir, "cgroup")
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
	demo.Step("socket-level load balancing: the same exchanges from a cgroup with the socket hooks")
	if err := bed.SP("load", "--bpffs", bed.BPFFS, "--device", strings.Join(bed.Devices, ","), "--cgroup", cg); err != nil {
		return err
	}
	before, err := counters(bed.BPFFS)
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
	failed = demo.Exchanges(bed.Client, bed.Services, demo.Backends, n/2) || failed
	if err := mounts.JoinCgroup(home); err != nil {
		return err
	}
	after, err := counters(bed.BPFFS)
	if err != nil {
		return err
	}
	xlate, perPacket := after["sock_xlate"]-before["sock_xlate"], after["lb_new"]-before["lb_new"]
	fmt.Printf("\n  socket hooks translated %d connects and sends; the per-packet path load-balanced %d new flows\n", xlate, perPacket)
	if xlate == 0 || perPacket != 0 {
		fmt.Println("  FAILED: the socket layer should have done all the work")
		failed = true
	}

	demo.Step("datapath counters")
	if err := bed.SP("stats", "--bpffs", bed.BPFFS); err != nil {
		return err
	}
	if failed {
		return errors.New("some exchanges failed or were not spread uniformly (see above)")
	}
	fmt.Println("\nper-node demo passed: every exchange went through the VIP to a backend and came back from the VIP")
	return nil
}

// northSouth runs an external client against a NodePort Service on two
// nodes, each running servicepath with its wire as the node device.
func northSouth(bin, manifest string, n int) error {
	bed, err := demo.StartNorthSouth("demons", bin, manifest)
	if err != nil {
		return err
	}
	defer bed.Close()

	demo.Step("loading each node's datapath, with its wire as the node device, and applying " + manifest)
	for _, node := range bed.Nodes {
		if err := bed.SPOn(node, "load", "--bpffs", node.BPFFS, "--device", strings.Join(node.Devices, ","),
			"--node-device", topology.WireIfName); err != nil {
			return err
		}
		defer bed.SPOn(node, "unload", "--bpffs", node.BPFFS)
		if err := bed.SPOn(node, "apply", "--bpffs", node.BPFFS, "-f", manifest); err != nil {
			return err
		}
	}

	demo.Step("an external client uses the NodePort at each node's address")
	want := demo.Backends[:2]
	failed := false
	for _, node := range bed.Nodes {
		for _, s := range bed.Services {
			if s.Frontend.Kind != service.NodePort {
				continue
			}
			addr := node.WireIPv4
			if s.Frontend.Addr.Is6() {
				addr = node.WireIPv6
			}
			dst := netip.AddrPortFrom(addr, s.Frontend.Port)
			failed = demo.ExchangesTo(bed.Topo.External, "the external client", dst, s.Frontend.Protocol, s.Name, want, n) || failed
		}
	}

	demo.Step("node 0's counters: flows to its own backend, and SNATed flows to node 1's")
	if err := bed.SP("stats", "--bpffs", bed.BPFFS); err != nil {
		return err
	}
	if failed {
		return errors.New("some north-south exchanges failed or were not spread uniformly (see above)")
	}
	fmt.Println("\ndemo passed: every exchange reached a backend on either node and came back from the address the client used")
	return nil
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
