package topology_test

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
	"github.com/servicepath/servicepath/harness/traffic"
)

const timeout = 5 * time.Second

func threePods(t *testing.T) *topology.Topology {
	t.Helper()
	return topology.NewForTest(t, topology.Spec{
		Name: "mesh",
		Pods: []topology.PodSpec{{Name: "alpha"}, {Name: "beta"}, {Name: "gamma-with-a-long-name"}},
	})
}

// Every pod reaches every other pod through the node, over TCP and UDP on
// both families, and replies come from the address that was asked.
func TestPodMesh(t *testing.T) {
	topo := threePods(t)
	const port = 8080
	for _, p := range topo.Pods {
		s, err := traffic.Serve(p, p.Name, port)
		if err != nil {
			t.Fatalf("serve in %s: %v", p.Name, err)
		}
		t.Cleanup(func() { s.Close() })
	}
	exchanges := map[string]func(traffic.Doer, netip.AddrPort, []byte, time.Duration) (traffic.Reply, error){
		"tcp": traffic.TCPExchange,
		"udp": traffic.UDPExchange,
	}
	for _, src := range topo.Pods {
		for _, dst := range topo.Pods {
			if src == dst {
				continue
			}
			for proto, exchange := range exchanges {
				for _, ip := range []netip.Addr{dst.IPv4, dst.IPv6} {
					to := netip.AddrPortFrom(ip, port)
					payload := []byte(fmt.Sprintf("%s->%s %s", src.Name, dst.Name, proto))
					r, err := exchange(src, to, payload, timeout)
					if err != nil {
						t.Errorf("%s %s -> %s: %v", proto, src.Name, to, err)
						continue
					}
					if r.Identity != dst.Name || r.Peer != to {
						t.Errorf("%s %s -> %s: answered by %q from %s", proto, src.Name, to, r.Identity, r.Peer)
					}
					if proto == "tcp" {
						want := src.IPv4
						if ip.Is6() {
							want = src.IPv6
						}
						if r.Local.Addr() != want {
							t.Errorf("tcp %s -> %s: local address %s, want %s", src.Name, to, r.Local, want)
						}
					}
				}
			}
		}
	}
}

// The node reaches pods too, as a datapath's health checks would.
func TestNodeToPod(t *testing.T) {
	topo := threePods(t)
	p := topo.Pod("beta")
	s, err := traffic.Serve(p, "beta", 80)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, ip := range []netip.Addr{p.IPv4, p.IPv6} {
		r, err := traffic.ConnectedUDPExchange(topo.Node, netip.AddrPortFrom(ip, 80), []byte("hc"), timeout)
		if err != nil || r.Identity != "beta" {
			t.Errorf("node -> %s: %+v, %v", ip, r, err)
		}
	}
}

func TestLayout(t *testing.T) {
	topo := threePods(t)
	if topo.Pod("nope") != nil {
		t.Error("Pod(nope) found something")
	}
	seen := map[string]bool{}
	for i, p := range topo.Pods {
		if topo.Pod(p.Name) != p {
			t.Errorf("Pod(%q) is not the pod", p.Name)
		}
		if want := netip.AddrFrom4([4]byte{198, 18, 0, byte(10 + i)}); p.IPv4 != want {
			t.Errorf("%s IPv4 %s, want %s", p.Name, p.IPv4, want)
		}
		if !topology.PodCIDRv6.Contains(p.IPv6) || p.IfName != "eth0" {
			t.Errorf("%s: IPv6 %s, interface %s", p.Name, p.IPv6, p.IfName)
		}
		if len(p.HostIf) > 15 || seen[p.HostIf] {
			t.Errorf("host interface %q too long or repeated", p.HostIf)
		}
		seen[p.HostIf] = true
		for _, name := range []string{p.NetnsName, topo.Node.Name} {
			if _, err := os.Stat(filepath.Join("/run/netns", name)); err != nil {
				t.Errorf("netns %s not named: %v", name, err)
			}
		}
	}
	// Host interfaces exist in the node netns, with the index reported.
	err := topo.Node.Do(func() error {
		for _, p := range topo.Pods {
			l, err := netlink.LinkByName(p.HostIf)
			if err != nil {
				return err
			}
			if l.Attrs().Index != p.HostIfIndex {
				return fmt.Errorf("%s index %d, reported %d", p.HostIf, l.Attrs().Index, p.HostIfIndex)
			}
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}

// A CLI run with `ip netns exec` sees the pod's addresses.
func TestNetnsExec(t *testing.T) {
	ip, err := exec.LookPath("ip")
	if err != nil {
		t.Skip("needs iproute2's ip:", err)
	}
	topo := threePods(t)
	p := topo.Pod("alpha")
	out, err := exec.Command(ip, "netns", "exec", p.NetnsName, ip, "-o", "addr", "show", "dev", "eth0").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns exec: %v\n%s", err, out)
	}
	for _, a := range []netip.Addr{p.IPv4, p.IPv6} {
		if !strings.Contains(string(out), a.String()+"/") {
			t.Errorf("%s missing from\n%s", a, out)
		}
	}
}

// Close removes the named namespaces and is idempotent; the test's own
// netns is never entered.
func TestCloseAndIsolation(t *testing.T) {
	testenv.RequireRoot(t)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	before, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer before.Close()
	linksBefore, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}

	topo, err := topology.New(topology.Spec{Pods: []topology.PodSpec{{Name: "a"}, {Name: "b"}}})
	if err != nil {
		t.Fatal(err)
	}
	names := []string{topo.Node.Name, topo.Pods[0].NetnsName, topo.Pods[1].NetnsName}
	if err := topo.Pods[0].Do(func() error { return nil }); err != nil {
		t.Fatal(err)
	}
	after, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer after.Close()
	if !before.Equal(after) {
		t.Error("building the topology moved the caller's thread")
	}
	linksAfter, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	if len(linksAfter) != len(linksBefore) {
		t.Errorf("caller's netns went from %d to %d links", len(linksBefore), len(linksAfter))
	}

	if err := topo.Close(); err != nil {
		t.Fatal(err)
	}
	if err := topo.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	for _, name := range names {
		if _, err := os.Stat(filepath.Join("/run/netns", name)); !os.IsNotExist(err) {
			t.Errorf("netns %s still there: %v", name, err)
		}
	}
}

func TestInvalidSpec(t *testing.T) {
	for _, spec := range []topology.Spec{
		{Name: "Bad_Name"},
		{Pods: []topology.PodSpec{{Name: "a"}, {Name: "a"}}},
		{Pods: []topology.PodSpec{{Name: ""}}},
		{Pods: []topology.PodSpec{{Name: "x/y"}}},
		{Pods: []topology.PodSpec{{Name: "node"}}},
		{Pods: make([]topology.PodSpec, topology.MaxPods+1)},
	} {
		// Rejected before anything is created, so no privilege is needed.
		if topo, err := topology.New(spec); err == nil {
			topo.Close()
			t.Errorf("spec %+v accepted", spec)
		}
	}
}

// Do re-raises panics and leaves the caller where it was.
func TestDoPanic(t *testing.T) {
	topo := topology.NewForTest(t, topology.Spec{Pods: []topology.PodSpec{{Name: "p"}}})
	defer func() {
		if v := recover(); v != "boom" {
			t.Errorf("recovered %v, want boom", v)
		}
	}()
	topo.Pods[0].Do(func() error { panic("boom") })
}
