package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/endpoints"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/metrics"
	"github.com/servicepath/servicepath/datapath/netdev"
	"github.com/servicepath/servicepath/datapath/nodeaddrs"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
	"github.com/servicepath/servicepath/harness/traffic"
)

const testNode = "node-a"

func TestPodIPs(t *testing.T) {
	for _, c := range []struct {
		name string
		pod  corev1.Pod
		want []string
	}{
		{"running dual-stack", pod("a", testNode, corev1.PodRunning, "10.1.0.1", "fd00::1"), []string{"10.1.0.1", "fd00::1"}},
		{"pending with an IP", pod("a", testNode, corev1.PodPending, "10.1.0.1"), []string{"10.1.0.1"}},
		{"only status.podIP", func() corev1.Pod {
			p := pod("a", testNode, corev1.PodRunning)
			p.Status.PodIP = "10.1.0.2"
			return p
		}(), []string{"10.1.0.2"}},
		{"no IP yet", pod("a", testNode, corev1.PodPending), nil},
		{"succeeded", pod("a", testNode, corev1.PodSucceeded, "10.1.0.1"), nil},
		{"failed", pod("a", testNode, corev1.PodFailed, "10.1.0.1"), nil},
		{"host network", func() corev1.Pod {
			p := pod("a", testNode, corev1.PodRunning, "192.0.2.2")
			p.Spec.HostNetwork = true
			return p
		}(), nil},
	} {
		var got []string
		for _, a := range podIPs(&c.pod) {
			got = append(got, a.String())
		}
		assert.Equal(t, c.want, got, c.name)
	}
}

// pod is a Pod of testNode's namespace "default" in phase with ips.
func pod(name, node string, phase corev1.PodPhase, ips ...string) corev1.Pod {
	p := corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec:       corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "c", Image: "agnhost"}}},
		Status:     corev1.PodStatus{Phase: phase},
	}
	for _, ip := range ips {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip})
	}
	if len(ips) > 0 {
		p.Status.PodIP = ips[0]
	}
	return p
}

func withHostPort(p corev1.Pod, proto corev1.Protocol, hostPort, containerPort int32) corev1.Pod {
	c := &p.Spec.Containers[0]
	c.Ports = append(c.Ports, corev1.ContainerPort{Protocol: proto, HostPort: hostPort, ContainerPort: containerPort})
	return p
}

// fakeKube is a fake clientset whose Pod watch is known to have started:
// the fake tracker replays nothing, so a Pod created between an
// informer's list and its watch would never be seen.
type fakeKube struct {
	*fake.Clientset
	watching chan struct{}
}

func newFakeKube() *fakeKube {
	c := &fakeKube{Clientset: fake.NewClientset(), watching: make(chan struct{})}
	var once sync.Once
	c.PrependWatchReactor("pods", func(action k8stesting.Action) (bool, watch.Interface, error) {
		var opts metav1.ListOptions
		if w, ok := action.(k8stesting.WatchActionImpl); ok {
			opts = w.ListOptions
		}
		w, err := c.Tracker().Watch(action.GetResource(), action.GetNamespace(), opts)
		if err == nil {
			once.Do(func() { close(c.watching) })
		}
		return true, w, err
	})
	return c
}

func (c *fakeKube) waitWatching(t *testing.T) {
	t.Helper()
	select {
	case <-c.watching:
	case <-time.After(waitTimeout):
		t.Fatal("the agent never watched Pods")
	}
}

func (c *fakeKube) create(t *testing.T, p corev1.Pod) {
	t.Helper()
	_, err := c.CoreV1().Pods(p.Namespace).Create(context.Background(), &p, metav1.CreateOptions{})
	require.NoError(t, err, "create Pod %s", p.Name)
}

func (c *fakeKube) update(t *testing.T, p corev1.Pod) {
	t.Helper()
	_, err := c.CoreV1().Pods(p.Namespace).Update(context.Background(), &p, metav1.UpdateOptions{})
	require.NoError(t, err, "update Pod %s", p.Name)
}

func (c *fakeKube) delete(t *testing.T, name string) {
	t.Helper()
	require.NoError(t, c.CoreV1().Pods("default").Delete(context.Background(), name, metav1.DeleteOptions{}), "delete Pod %s", name)
}

// TestHostPortsFromPods programs the hostPorts of this node's Pods from
// the API, as `apply` does from manifests, and removes them with the Pod;
// other nodes' Pods and host-network Pods get none.
func TestHostPortsFromPods(t *testing.T) {
	dp, _ := loadDatapath(t, loader.DefaultConfig())
	c := newFakeKube()
	a := startAgent(t, c, dp.Maps, Config{NodeName: testNode, Pods: &PodNetwork{Endpoints: dp.Endpoints}})
	c.waitWatching(t)
	a.waitHealthy(t)

	web := withHostPort(pod("web", testNode, corev1.PodRunning, "10.1.0.5", "fd00:10:1::5"), corev1.ProtocolTCP, 18080, 8080)
	web = withHostPort(web, corev1.ProtocolUDP, 18053, 53)
	web.Spec.Containers[0].Ports[1].HostIP = "192.0.2.10"
	c.create(t, web)
	other := withHostPort(pod("other", "node-b", corev1.PodRunning, "10.1.1.5"), corev1.ProtocolTCP, 18081, 8080)
	c.create(t, other)
	hostNet := withHostPort(pod("hostnet", testNode, corev1.PodRunning, "192.0.2.2"), corev1.ProtocolTCP, 18082, 18082)
	hostNet.Spec.HostNetwork = true
	c.create(t, hostNet)

	waitProgrammed(t, dp.Maps, "pod:default/web", map[string][]string{
		"0.0.0.0:18080/TCP":    {"10.1.0.5:8080"},
		"[::]:18080/TCP":       {"[fd00:10:1::5]:8080"},
		"192.0.2.10:18053/UDP": {"10.1.0.5:53"},
	})
	view, err := readMaps(dp.Maps)
	require.NoError(t, err, "read maps")
	assert.Empty(t, ownedBy(view, "pod:default/other"), "another node's Pod gets no hostPort")
	assert.Empty(t, ownedBy(view, "pod:default/hostnet"), "a host-network Pod binds its hostPort itself")

	// A changed hostPort moves; a finished Pod has none.
	web.Spec.Containers[0].Ports = web.Spec.Containers[0].Ports[:1]
	web.Spec.Containers[0].Ports[0].HostPort = 18090
	c.update(t, web)
	waitProgrammed(t, dp.Maps, "pod:default/web", map[string][]string{
		"0.0.0.0:18090/TCP": {"10.1.0.5:8080"},
		"[::]:18090/TCP":    {"[fd00:10:1::5]:8080"},
	})
	web.Status.Phase = corev1.PodSucceeded
	c.update(t, web)
	waitProgrammed(t, dp.Maps, "pod:default/web", map[string][]string{})

	// A Pod deleted while it has hostPorts loses them.
	db := withHostPort(pod("db", testNode, corev1.PodRunning, "10.1.0.6"), corev1.ProtocolTCP, 15432, 5432)
	c.create(t, db)
	waitProgrammed(t, dp.Maps, "pod:default/db", map[string][]string{
		"0.0.0.0:15432/TCP": {"10.1.0.6:5432"},
	})
	c.delete(t, "db")
	waitProgrammed(t, dp.Maps, "pod:default/db", map[string][]string{})
	ok, why := a.Ready()
	assert.True(t, ok, "ready throughout: %s", why)
}

// hooks lists the programs at dev's ingress and egress, in its netns: its
// tcx programs, or on a kernel without tcx its cls_bpf filters'.
func hooks(n *topology.Node, dev string) (ingress, egress []ebpf.ProgramID, err error) {
	err = n.Do(func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		for _, q := range []struct {
			at     ebpf.AttachType
			parent uint32
			ids    *[]ebpf.ProgramID
		}{{ebpf.AttachTCXIngress, netlink.HANDLE_MIN_INGRESS, &ingress}, {ebpf.AttachTCXEgress, netlink.HANDLE_MIN_EGRESS, &egress}} {
			res, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: q.at})
			if errors.Is(err, unix.EINVAL) {
				filters, err := netlink.FilterList(l, q.parent)
				if err != nil {
					return fmt.Errorf("no tcx, and no tc filters: %w", err)
				}
				for _, f := range filters {
					if bf, ok := f.(*netlink.BpfFilter); ok {
						*q.ids = append(*q.ids, ebpf.ProgramID(bf.Id))
					}
				}
				continue
			}
			if err != nil {
				return err
			}
			for _, p := range res.Programs {
				*q.ids = append(*q.ids, p.ID)
			}
		}
		return nil
	})
	return ingress, egress, err
}

// waitHooked waits until dev carries from-pod at ingress and to-pod at
// egress.
func waitHooked(t *testing.T, n *topology.Node, dp *loader.Datapath, dev string) {
	t.Helper()
	from, to := testenv.ProgramID(t, dp.FromPod), testenv.ProgramID(t, dp.ToPod)
	waitFor(t, "pod programs on "+dev, func() (bool, string) {
		in, eg, err := hooks(n, dev)
		if err != nil {
			return false, err.Error()
		}
		return slices.Contains(in, from) && slices.Contains(eg, to), fmt.Sprintf("ingress %v, egress %v", in, eg)
	})
}

// waitUnpinned waits until dev's pinned links are gone.
func waitUnpinned(t *testing.T, linkDir, dev string) {
	t.Helper()
	waitFor(t, "pins of "+dev+" removed", func() (bool, string) {
		var left []string
		for _, suffix := range pinSuffixes {
			if _, err := os.Stat(filepath.Join(linkDir, dev+suffix)); !errors.Is(err, os.ErrNotExist) {
				left = append(left, suffix)
			}
		}
		return len(left) == 0, fmt.Sprint(left)
	})
}

func macIn(t *testing.T, do func(func() error) error, dev string) net.HardwareAddr {
	t.Helper()
	var mac net.HardwareAddr
	require.NoError(t, do(func() error {
		l, err := netlink.LinkByName(dev)
		if err == nil {
			mac = l.Attrs().HardwareAddr
		}
		return err
	}), "MAC of %s", dev)
	return mac
}

// waitEndpoint waits until sp_endpoints says want of ip (nil: nothing).
func waitEndpoint(t *testing.T, m *ebpf.Map, ip netip.Addr, want *endpoints.Info) {
	t.Helper()
	waitFor(t, fmt.Sprintf("sp_endpoints[%s] = %+v", ip, want), func() (bool, string) {
		var got endpoints.Info
		err := m.Lookup(endpoints.KeyOf(ip), &got)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return want == nil, "absent"
		}
		if err != nil {
			return false, err.Error()
		}
		return want != nil && got == *want, fmt.Sprintf("%+v", got)
	})
}

func infoOf(ifindex int, mac, nodeMAC net.HardwareAddr) *endpoints.Info {
	i := &endpoints.Info{Ifindex: uint32(ifindex), Flags: endpoints.TCIngress}
	copy(i.MAC[:], mac)
	copy(i.NodeMAC[:], nodeMAC)
	return i
}

// waitBigTCP waits for the agent to raise dev's limits as far as the
// kernel lets a veth have them: as far as it lets peer, the other end,
// raised here.
func waitBigTCP(t *testing.T, node *topology.Node, dev, peer string) {
	t.Helper()
	var want, got netdev.BigTCP
	require.NoError(t, node.Do(func() (err error) {
		want, err = netdev.SetBigTCP(peer, netdev.BigTCPSize)
		return err
	}), "big tcp on %s", peer)
	if !assert.Eventually(t, func() bool {
		require.NoError(t, node.Do(func() (err error) {
			got, err = netdev.ReadBigTCP(dev)
			return err
		}), "limits of %s", dev)
		return got.IPv6() == want.IPv6() && got.IPv4() == want.IPv4()
	}, 5*time.Second, 20*time.Millisecond, "%s: want BIG TCP as on %s (%v)", dev, peer, want) {
		t.Fatalf("%s has %v", dev, got)
	}
}

// TestPodNetwork runs the agent's pod side in a node netns: it attaches to
// pod devices there before it starts and as they appear, detaches as they
// go, keeps sp_endpoints equal to the node's Pods (an IP registered once
// its route through a pod device exists), and a Pod's hostPort answers from
// outside the node through the node's address, delivered into the pod by
// BPF host routing from that entry. With BigTCP it raises the GSO/GRO
// limits of the devices it attaches to.
// newPodNetBed is spec's node with an external client and pod web serving
// on 8080, and the datapath loaded with the node-device programs on the
// wire, for the pod-network tests.
func newPodNetBed(t *testing.T, spec topology.Spec) (*topology.Topology, *loader.Datapath, string) {
	t.Helper()
	spec.External, spec.Pods = true, []topology.PodSpec{{Name: "web"}}
	topo := topology.NewForTest(t, spec)
	dp, pin := loadDatapath(t, loader.DefaultConfig())
	require.NoError(t, topo.Node.Do(func() error {
		if err := nodeaddrs.SyncLocal(dp.Maps.NodeAddrs); err != nil {
			return err
		}
		_, err := netdev.Attach(&attach.Attacher{LinkDir: filepath.Join(pin, "netdev")}, dp, topology.WireIfName, attach.XDPOff)
		return err
	}), "node addresses, and the node-device programs on the wire")
	srv, err := traffic.Serve(topo.Pod("web"), "web", 8080)
	require.NoError(t, err, "serve in pod web")
	t.Cleanup(func() { srv.Close() })
	return topo, dp, pin
}

func TestPodNetwork(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireFeature(t, "BPF host routing (bpf_fib_lookup, bpf_redirect_neigh, bpf_redirect_peer)", "5.10", loader.ProbeHostRouting())
	topo, dp, pin := newPodNetBed(t, topology.Spec{Name: "podnet"})
	node, web := topo.Node, topo.Pod("web")
	require.Equal(t, loader.HostRoutingBPF, dp.HostRouting, "BPF host routing in effect")

	pattern, err := ParseDevicePattern("h[0-9]*")
	require.NoError(t, err, "pattern")
	linkDir := filepath.Join(pin, "links")
	c := newFakeKube()
	// Pods the agent must leave out of sp_endpoints: host-network, and
	// another node's with web's IP (which would outlive web if taken).
	hostNet := pod("hostnet", testNode, corev1.PodRunning, node.WireIPv4.String())
	hostNet.Spec.HostNetwork = true
	c.create(t, hostNet)
	c.create(t, withHostPort(pod("elsewhere", "node-b", corev1.PodRunning, web.IPv4.String()), corev1.ProtocolTCP, 18090, 8080))
	a := startAgent(t, c, dp.Maps, Config{NodeName: testNode, Pods: &PodNetwork{
		Devices: pattern, NodeDevices: []string{topology.WireIfName},
		Attacher: &attach.Attacher{LinkDir: linkDir, Mode: attach.Auto},
		FromPod:  dp.FromPod, ToPod: dp.ToPod, Endpoints: dp.Endpoints, Do: node.Do, BigTCP: true,
	}})
	c.waitWatching(t)
	a.waitHealthy(t)

	// A pod device that was there before the agent.
	waitHooked(t, node, dp, web.HostIf)

	// A Pod whose IP has no route yet waits for it; a veth appearing with
	// that route is attached to and the IP registered; its removal undoes
	// both.
	lateIP := netip.MustParseAddr("198.18.0.99")
	c.create(t, pod("late", testNode, corev1.PodRunning, lateIP.String()))
	time.Sleep(300 * time.Millisecond)
	waitEndpoint(t, dp.Endpoints, lateIP, nil)
	const dev, peer = "h9-late", "q9-late"
	require.NoError(t, node.Do(func() error {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: dev}, PeerName: peer}); err != nil {
			return err
		}
		for _, n := range []string{dev, peer} {
			l, err := netlink.LinkByName(n)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
		}
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Scope: netlink.SCOPE_LINK,
			Dst: &net.IPNet{IP: lateIP.AsSlice(), Mask: net.CIDRMask(32, 32)}})
	}), "add veth %s with a route to %s", dev, lateIP)
	waitHooked(t, node, dp, dev)
	waitBigTCP(t, node, dev, peer)
	var lateIdx int
	require.NoError(t, node.Do(func() error {
		l, err := netlink.LinkByName(dev)
		if err == nil {
			lateIdx = l.Attrs().Index
		}
		return err
	}), "ifindex of %s", dev)
	waitEndpoint(t, dp.Endpoints, lateIP, infoOf(lateIdx, macIn(t, node.Do, peer), macIn(t, node.Do, dev)))
	require.NoError(t, node.Do(func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		return netlink.LinkDel(l)
	}), "delete veth %s", dev)
	waitUnpinned(t, linkDir, dev)
	waitEndpoint(t, dp.Endpoints, lateIP, nil)

	// Pod web: both IPs registered on its device (its MAC read across
	// netns), its hostPort programmed and answering through the node.
	c.create(t, withHostPort(pod("web", testNode, corev1.PodRunning, web.IPv4.String(), web.IPv6.String()), corev1.ProtocolTCP, 18080, 8080))
	want := infoOf(web.HostIfIndex, macIn(t, web.Do, web.IfName), macIn(t, node.Do, web.HostIf))
	waitEndpoint(t, dp.Endpoints, web.IPv4, want)
	waitEndpoint(t, dp.Endpoints, web.IPv6, want)
	waitEndpoint(t, dp.Endpoints, node.WireIPv4, nil)
	waitProgrammed(t, dp.Maps, "pod:default/web", map[string][]string{
		"0.0.0.0:18080/TCP": {netip.AddrPortFrom(web.IPv4, 8080).String()},
		"[::]:18080/TCP":    {netip.AddrPortFrom(web.IPv6, 8080).String()},
	})
	view, err := readMaps(dp.Maps)
	require.NoError(t, err, "read maps")
	assert.Empty(t, ownedBy(view, "pod:default/elsewhere"), "another node's Pod gets no hostPort")
	before, err := metrics.Read(dp.Maps.Metrics)
	require.NoError(t, err, "read datapath counters")
	for _, addr := range []netip.Addr{node.WireIPv4, node.WireIPv6} {
		r, err := traffic.TCPExchange(topo.External, netip.AddrPortFrom(addr, 18080), []byte("hostport"), 5*time.Second)
		require.NoError(t, err, "TCP from outside to the hostPort on %s", addr)
		assert.Equal(t, "web", r.Identity, "pod web answers its hostPort on %s", addr)
	}
	after, err := metrics.Read(dp.Maps.Metrics)
	require.NoError(t, err, "read datapath counters")
	assert.Greater(t, after["redirect_peer"], before["redirect_peer"], "delivered into the pod by its sp_endpoints entry")

	// Pod web gone: its entries and hostPort with it.
	c.delete(t, "web")
	waitEndpoint(t, dp.Endpoints, web.IPv4, nil)
	waitEndpoint(t, dp.Endpoints, web.IPv6, nil)
	waitProgrammed(t, dp.Maps, "pod:default/web", map[string][]string{})
	_, err = traffic.TCPExchange(topo.External, netip.AddrPortFrom(node.WireIPv4, 18080), []byte("hostport"), 2*time.Second)
	assert.Error(t, err, "the hostPort no longer answers once its Pod is gone")
	// The device stays a pod device: the programs are still on it.
	waitHooked(t, node, dp, web.HostIf)
}

// A Pod's hostPort and a Service's NodePort on one port of this node: the
// older claim keeps the frontend, the other is programmed without it and
// gets a FrontendInUse Event naming the owner, and the agent stays ready.
// Once the owner goes, the other gets the frontend.
func TestHostPortMeetsNodePort(t *testing.T) {
	dp, _ := loadDatapath(t, loader.DefaultConfig())
	c := newFakeKube()
	t0 := metav1.NewTime(time.Now().Add(-time.Hour).Truncate(time.Second))
	t1 := metav1.NewTime(t0.Add(time.Minute))
	nodePort := func(name, ip string, port int32, created metav1.Time) *corev1.Service {
		sp := svcPort("", corev1.ProtocolTCP, 80)
		sp.NodePort = port
		svc := clusterIPService(name, ip, "", sp)
		svc.Namespace, svc.CreationTimestamp, svc.Spec.Type = "default", created, corev1.ServiceTypeNodePort
		return svc
	}
	hostPort := func(name, ip string, port int32, created metav1.Time) corev1.Pod {
		p := withHostPort(pod(name, testNode, corev1.PodRunning, ip), corev1.ProtocolTCP, port, 8080)
		p.CreationTimestamp = created
		return p
	}
	// 30080: the Service is older; 30081: the Pod is.
	for _, svc := range []*corev1.Service{nodePort("np-old", "10.96.0.80", 30080, t0), nodePort("np-new", "10.96.0.81", 30081, t1)} {
		_, err := c.CoreV1().Services("default").Create(context.Background(), svc, metav1.CreateOptions{})
		require.NoError(t, err, "create Service %s", svc.Name)
	}
	c.create(t, hostPort("hp-new", "10.1.0.7", 30080, t1))
	c.create(t, hostPort("hp-old", "10.1.0.8", 30081, t0))
	a := startAgent(t, c, dp.Maps, Config{NodeName: testNode, Pods: &PodNetwork{Endpoints: dp.Endpoints}})
	c.waitWatching(t)
	a.waitHealthy(t)

	waitProgrammed(t, dp.Maps, "default/np-old", map[string][]string{"10.96.0.80:80/TCP": {}, "0.0.0.0:30080/TCP": {}})
	waitProgrammed(t, dp.Maps, "pod:default/hp-new", map[string][]string{})
	waitProgrammed(t, dp.Maps, "pod:default/hp-old", map[string][]string{"0.0.0.0:30081/TCP": {"10.1.0.8:8080"}})
	waitProgrammed(t, dp.Maps, "default/np-new", map[string][]string{"10.96.0.81:80/TCP": {}})
	for obj, owner := range map[string]string{"hp-new": "Service default/np-old", "np-new": "Pod default/hp-old"} {
		waitFor(t, "a FrontendInUse Event on "+obj, func() (bool, string) {
			evs, err := c.CoreV1().Events("default").List(context.Background(), metav1.ListOptions{})
			if err != nil {
				return false, err.Error()
			}
			var seen []string
			for _, ev := range evs.Items {
				if ev.InvolvedObject.Name == obj && ev.Reason == "FrontendInUse" {
					if strings.Contains(ev.Message, owner) {
						return true, ev.Message
					}
					seen = append(seen, ev.Message)
				}
			}
			return false, fmt.Sprint(seen)
		})
	}
	ok, why := a.Ready()
	assert.True(t, ok, "ready over the conflicts: %s", why)

	// The older Pod gone, the newer Service gets its NodePort.
	c.delete(t, "hp-old")
	waitProgrammed(t, dp.Maps, "default/np-new", map[string][]string{"10.96.0.81:80/TCP": {}, "0.0.0.0:30081/TCP": {}})
}
