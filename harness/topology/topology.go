// Package topology builds throwaway network topologies out of named network
// namespaces: nodes, each a netns that routes for its pods, and pods plugged
// into their node by one of the device kinds a CNI uses (veth, netkit,
// ipvlan). Several nodes are joined by a bridged "wire", where an external
// client can sit too. Each pod says where a datapath attaches for it
// (Pod.Hook). Everything it creates lives in namespaces it made; the
// caller's namespace is never touched.
package topology

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/netdev"
	"github.com/servicepath/servicepath/datapath/nsexec"
)

// Addressing of the routed pod network. Node n routes 198.18.n.0/24 and
// fd00:5e:n::/64 to its pods; node 0's are the variables below, so a
// single-node topology has the addresses it always had. Each node's
// gateway addresses (198.18.n.1, fe80::1) sit on its host-side devices;
// pods reach them with an onlink default route.
var (
	PodCIDRv4   = netip.MustParsePrefix("198.18.0.0/24")
	PodCIDRv6   = netip.MustParsePrefix("fd00:5e::/64")
	GatewayIPv4 = netip.MustParseAddr("198.18.0.1")
	GatewayIPv6 = netip.MustParseAddr("fe80::1")
	// The wire joining nodes: node n is .n+1 / ::n+1, the external client
	// .200 / ::200.
	WireCIDRv4 = netip.MustParsePrefix("198.18.254.0/24")
	WireCIDRv6 = netip.MustParsePrefix("fd00:5e:fe::/64")
)

const (
	// PodIfName is the pod side of each pod's device.
	PodIfName = "eth0"
	// firstPodHost is the host part of the first pod's addresses.
	firstPodHost = 10
	// MaxPods is how many pods fit on one node after firstPodHost in its /24.
	MaxPods = 255 - firstPodHost
	// MaxNodes keeps node pod CIDRs clear of the wire's.
	MaxNodes = 200
	// externalHost is the external client's host part on the wire.
	externalHost = 200

	addrWait = 5 * time.Second

	// nodeSuffix names the node netns (node 0; node n adds n); pods use
	// their own names.
	nodeSuffix = "node"
	wireSuffix = "wire"
	extSuffix  = "ext"
	// WireIfName is each node's (and the external client's) wire device.
	WireIfName = "wire0"
)

// Spec describes a topology. Names are lowercase letters, digits and '-';
// they become parts of netns and interface names.
type Spec struct {
	// Name prefixes the netns names (a random suffix keeps them unique);
	// empty means "sp".
	Name string
	// Kind is how pods are plugged into their node; empty means Veth.
	Kind Kind
	// Nodes is how many nodes to build; 0 means 1. More than one are
	// joined by a wire.
	Nodes int
	// External adds a client netns on the wire, outside every node (for
	// north-south traffic). It implies the wire.
	External bool
	// BigTCP raises the GSO and GRO limits of both ends of every pod
	// device to netdev.BigTCPSize, IPv6 and IPv4, as far as the kernel
	// lets it (Pod.BigTCP says what took).
	BigTCP bool
	Pods   []PodSpec
}

type PodSpec struct {
	Name string
	// Node is the index of the pod's node.
	Node int
}

// Topology is a set of nodes and their pods.
type Topology struct {
	// Kind is the kind the pods were plugged with (Auto resolved).
	Kind Kind
	// Node is the first node, Nodes[0].
	Node  *Node
	Nodes []*Node
	Pods  []*Pod
	// External is the client outside the nodes (Spec.External), or nil.
	External *External
	// WireNetns names the netns of the wire's bridge, empty without one.
	WireNetns string
	wireNS    netns.NsHandle

	// owned lists every netns created, in order, so Close can undo a
	// partially built topology.
	owned     []ownedNS
	closeOnce sync.Once
	closeErr  error
}

type ownedNS struct {
	name string
	ns   *netns.NsHandle
}

// Node is a netns that routes for its pods.
type Node struct {
	Name  string // netns name under /run/netns
	Index int
	NS    netns.NsHandle
	// PodCIDRv4 and PodCIDRv6 are routed to this node's pods.
	PodCIDRv4, PodCIDRv6 netip.Prefix
	// GatewayIPv4 is the node's address on its pod devices; GatewayIPv6
	// is fe80::1 on every node. IPv6 is the node's global IPv6 address
	// there (fd00:5e:n::1), its source towards its pods.
	GatewayIPv4, GatewayIPv6 netip.Addr
	IPv6                     netip.Addr
	// WireIPv4 and WireIPv6 are the node's addresses on WireIfName; zero
	// when there is no wire.
	WireIPv4, WireIPv6 netip.Addr

	// uplink is the ipvlan master (ipvlan kinds only).
	uplink string
	pods   int
}

// External is a client netns on the wire, outside every node, with routes
// to every node's pods through that node.
type External struct {
	Name       string // netns name
	NS         netns.NsHandle
	IfName     string
	IPv4, IPv6 netip.Addr
}

// Pod is a netns with one interface, PodIfName, plugged into its node.
type Pod struct {
	Name      string
	NetnsName string
	NS        netns.NsHandle
	Node      *Node
	Kind      Kind
	// HostIf is the pod's device in the node netns (veth peer, netkit
	// primary); empty for ipvlan, whose pods have no host-side device.
	HostIf      string
	HostIfIndex int
	IfName      string
	IfIndex     int // of IfName, in the pod netns
	IPv4, IPv6  netip.Addr
	// BigTCP is what Spec.BigTCP left on the pod's devices: the host side
	// (none for ipvlan) and IfName.
	BigTCP []netdev.BigTCP
}

// Do runs fn on a thread inside the node netns. Sockets fn creates stay in
// that netns after it returns.
func (n *Node) Do(fn func() error) error { return nsexec.Do(n.NS, fn) }

// Do runs fn on a thread inside the pod netns. Sockets fn creates stay in
// that netns after it returns.
func (p *Pod) Do(fn func() error) error { return nsexec.Do(p.NS, fn) }

// Do runs fn on a thread inside the external client's netns.
func (e *External) Do(fn func() error) error { return nsexec.Do(e.NS, fn) }

// Pod returns the pod called name, or nil.
func (t *Topology) Pod(name string) *Pod {
	for _, p := range t.Pods {
		if p.Name == name {
			return p
		}
	}
	return nil
}

var validName = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]*[a-z0-9])?$`)

func (s Spec) nodes() int {
	if s.Nodes == 0 {
		return 1
	}
	return s.Nodes
}

func (s Spec) validate() error {
	if s.Name != "" && !validName.MatchString(s.Name) {
		return fmt.Errorf("topology name %q: want lowercase letters, digits and '-'", s.Name)
	}
	if _, err := ParseKind(string(s.Kind)); s.Kind != "" && err != nil {
		return err
	}
	if s.Nodes < 0 || s.Nodes > MaxNodes {
		return fmt.Errorf("%d nodes: want 1 to %d", s.Nodes, MaxNodes)
	}
	seen := map[string]bool{}
	perNode := map[int]int{}
	for _, p := range s.Pods {
		if !validName.MatchString(p.Name) {
			return fmt.Errorf("pod name %q: want lowercase letters, digits and '-'", p.Name)
		}
		if seen[p.Name] {
			return fmt.Errorf("duplicate pod name %q", p.Name)
		}
		if p.Name == nodeSuffix || p.Name == wireSuffix || p.Name == extSuffix || nodeName(p.Name) {
			return fmt.Errorf("pod name %q is taken by a node's, the wire's or the external client's netns", p.Name)
		}
		if p.Node < 0 || p.Node >= s.nodes() {
			return fmt.Errorf("pod %s on node %d: there are %d nodes", p.Name, p.Node, s.nodes())
		}
		seen[p.Name] = true
		perNode[p.Node]++
		if perNode[p.Node] > MaxPods {
			return fmt.Errorf("more than %d pods on node %d: they fit in a /24", MaxPods, p.Node)
		}
	}
	return nil
}

var nodeNameRe = regexp.MustCompile(`^` + nodeSuffix + `[0-9]+$`)

func nodeName(s string) bool { return nodeNameRe.MatchString(s) }

// New builds the topology described by spec. On error everything already
// created is removed. A kind the kernel lacks fails with an error that
// wraps ErrKindUnsupported and the kernel's (testenv.RequireDriver reads
// it).
func New(spec Spec) (*Topology, error) {
	if err := spec.validate(); err != nil {
		return nil, err
	}
	prefix := spec.Name
	if prefix == "" {
		prefix = "sp"
	}
	suffix := make([]byte, 4)
	if _, err := rand.Read(suffix); err != nil {
		return nil, err
	}
	prefix += "-" + hex.EncodeToString(suffix)

	t := &Topology{}
	if err := t.build(prefix, spec); err != nil {
		return nil, errors.Join(err, t.Close())
	}
	return t, nil
}

func (t *Topology) build(prefix string, spec Spec) error {
	t.Kind = spec.Kind
	if t.Kind == "" {
		t.Kind = Veth
	}
	for i := range spec.nodes() {
		name := prefix + "-" + nodeSuffix
		if i > 0 {
			name += strconv.Itoa(i)
		}
		node := &Node{
			Name:        name,
			Index:       i,
			PodCIDRv4:   nodePodCIDRv4(i),
			PodCIDRv6:   nodePodCIDRv6(i),
			GatewayIPv6: GatewayIPv6,
		}
		node.GatewayIPv4 = nthAddr(node.PodCIDRv4, 1)
		node.IPv6 = v6Like(node.PodCIDRv6, 1)
		if err := t.newNS(node.Name, &node.NS); err != nil {
			return err
		}
		t.Nodes = append(t.Nodes, node)
		if err := node.Do(configureNode); err != nil {
			return fmt.Errorf("node %s: %w", node.Name, err)
		}
	}
	t.Node = t.Nodes[0]
	if t.Kind == Auto {
		t.Kind = resolveAuto(t.Node)
	}
	if len(t.Nodes) > 1 || spec.External {
		if err := t.buildWire(prefix, spec.External); err != nil {
			return fmt.Errorf("wire: %w", err)
		}
	}
	if t.Kind.isIPvlan() {
		for _, n := range t.Nodes {
			if err := n.Do(func() error { return setupIPvlanNode(n, t.Kind) }); err != nil {
				return fmt.Errorf("node %s: %w", n.Name, err)
			}
		}
	}
	for i, ps := range spec.Pods {
		node := t.Nodes[ps.Node]
		n := node.pods
		node.pods++
		p := &Pod{
			Name:      ps.Name,
			NetnsName: prefix + "-" + ps.Name,
			Node:      node,
			Kind:      t.Kind,
			IfName:    PodIfName,
			IPv4:      nthAddr(node.PodCIDRv4, firstPodHost+n),
			IPv6:      v6Like(node.PodCIDRv6, firstPodHost+n),
		}
		if !t.Kind.isIPvlan() {
			p.HostIf = hostIfName(i, ps.Name)
		}
		if err := t.newNS(p.NetnsName, &p.NS); err != nil {
			return err
		}
		t.Pods = append(t.Pods, p)
		if err := t.plug(p, i); err != nil {
			return fmt.Errorf("pod %s: %w", p.Name, err)
		}
		if spec.BigTCP {
			if err := p.setBigTCP(); err != nil {
				return fmt.Errorf("pod %s: %w", p.Name, err)
			}
		}
	}
	for _, o := range t.owned {
		if err := nsexec.Do(*o.ns, waitIPv6Ready); err != nil {
			return fmt.Errorf("netns %s: %w", o.name, err)
		}
	}
	return nil
}

func (t *Topology) newNS(name string, h *netns.NsHandle) error {
	ns, err := newNamedNS(name)
	if err != nil {
		return err
	}
	*h = ns
	t.owned = append(t.owned, ownedNS{name, h})
	return nil
}

func nodePodCIDRv4(n int) netip.Prefix {
	b := PodCIDRv4.Addr().As4()
	b[2] = byte(n)
	return netip.PrefixFrom(netip.AddrFrom4(b), PodCIDRv4.Bits())
}

func nodePodCIDRv6(n int) netip.Prefix {
	b := PodCIDRv6.Addr().As16()
	b[4], b[5] = byte(n>>8), byte(n)
	return netip.PrefixFrom(netip.AddrFrom16(b), PodCIDRv6.Bits())
}

// hostIfName is unique per index: "h<i>-" survives the 15-byte truncation.
func hostIfName(i int, pod string) string {
	name := fmt.Sprintf("h%d-%s", i, pod)
	if len(name) > unix.IFNAMSIZ-1 {
		name = name[:unix.IFNAMSIZ-1]
	}
	return name
}

// v6Like gives pod n the IPv6 address whose last group reads like its
// IPv4 host number (198.18.0.11 and fd00:5e::11), so people can pair them.
func v6Like(p netip.Prefix, n int) netip.Addr {
	b := p.Addr().As16()
	d := n/100*0x100 + n/10%10*0x10 + n%10
	b[14], b[15] = byte(d>>8), byte(d)
	return netip.AddrFrom16(b)
}

func nthAddr(p netip.Prefix, n int) netip.Addr {
	b := p.Addr().AsSlice()
	b[len(b)-1] = byte(n)
	a, _ := netip.AddrFromSlice(b)
	return a
}

// configureNode makes the current netns a router. IPv6 settings are written
// before any interface exists so the per-device defaults inherit them.
func configureNode() error {
	if err := writeSysctls(map[string]string{
		"net/ipv4/ip_forward":              "1",
		"net/ipv4/conf/all/rp_filter":      "0",
		"net/ipv4/conf/default/rp_filter":  "0",
		"net/ipv6/conf/all/forwarding":     "1",
		"net/ipv6/conf/all/accept_dad":     "0",
		"net/ipv6/conf/default/accept_dad": "0",
		"net/ipv6/conf/default/forwarding": "1",
	}); err != nil {
		return err
	}
	return loUp()
}

// configurePod disables DAD so addresses are usable at once.
func configurePod() error {
	if err := writeSysctls(map[string]string{
		"net/ipv6/conf/all/accept_dad":     "0",
		"net/ipv6/conf/default/accept_dad": "0",
	}); err != nil {
		return err
	}
	return loUp()
}

// writeSysctls writes /proc/sys/net entries, which resolve to the netns of
// the calling thread.
func writeSysctls(kv map[string]string) error {
	for k, v := range kv {
		if err := os.WriteFile(filepath.Join("/proc/sys", k), []byte(v), 0); err != nil {
			return fmt.Errorf("sysctl %s=%s: %w", k, v, err)
		}
	}
	return nil
}

func loUp() error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return err
	}
	return netlink.LinkSetUp(lo)
}

func configureLink(link netlink.Link, addrs []netip.Prefix, routes []*netlink.Route) error {
	for _, a := range addrs {
		if err := netlink.AddrAdd(link, &netlink.Addr{IPNet: ipNet(a)}); err != nil {
			return fmt.Errorf("add %s to %s: %w", a, link.Attrs().Name, err)
		}
	}
	for _, r := range routes {
		if err := netlink.RouteAdd(r); err != nil {
			return fmt.Errorf("add route %s on %s: %w", r, link.Attrs().Name, err)
		}
	}
	return nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// waitIPv6Ready waits until no IPv6 address in the current netns is
// tentative. DAD is off, but addresses stay tentative until the link has
// carrier, which a veth gets only once both ends are up.
func waitIPv6Ready() error {
	deadline := time.Now().Add(addrWait)
	for {
		addrs, err := netlink.AddrList(nil, netlink.FAMILY_V6)
		if errors.Is(err, netlink.ErrDumpInterrupted) && time.Now().Before(deadline) {
			// Addresses changed during the dump (the kernel is still
			// configuring them): look again.
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if err != nil {
			return err
		}
		var pending []string
		for _, a := range addrs {
			if a.Flags&unix.IFA_F_TENTATIVE != 0 {
				pending = append(pending, a.IPNet.String())
			}
		}
		if len(pending) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("IPv6 addresses still tentative after %v: %v", addrWait, pending)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Close removes every namespace the topology created, and with them their
// interfaces and routes. It is safe to call more than once.
func (t *Topology) Close() error {
	t.closeOnce.Do(func() {
		var errs []error
		for i := len(t.owned) - 1; i >= 0; i-- {
			t.owned[i].ns.Close()
			if err := deleteNamedNS(t.owned[i].name); err != nil {
				errs = append(errs, err)
			}
		}
		t.closeErr = errors.Join(errs...)
	})
	return t.closeErr
}
