// Package topology builds throwaway network topologies out of named network
// namespaces: a node netns with pods routed to it over veth pairs, the shape
// a BPF datapath attaches to (on each pod's host-side veth). Everything it
// creates lives in namespaces it made; the caller's namespace is never
// touched.
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
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/nsexec"
)

// Addressing of the routed pod network. The gateway addresses sit on every
// host-side veth; pods reach them with an onlink default route.
var (
	PodCIDRv4   = netip.MustParsePrefix("198.18.0.0/24")
	PodCIDRv6   = netip.MustParsePrefix("fd00:5e::/64")
	GatewayIPv4 = netip.MustParseAddr("198.18.0.1")
	GatewayIPv6 = netip.MustParseAddr("fe80::1")
)

const (
	// PodIfName is the pod side of each veth.
	PodIfName = "eth0"
	// firstPodHost is the host part of the first pod's addresses.
	firstPodHost = 10
	// MaxPods is how many pods fit after firstPodHost in the /24.
	MaxPods = 255 - firstPodHost

	addrWait = 5 * time.Second

	// nodeSuffix names the node netns; pods use their own names.
	nodeSuffix = "node"
)

// Spec describes a topology. Names are lowercase letters, digits and '-';
// they become parts of netns and interface names.
type Spec struct {
	// Name prefixes the netns names (a random suffix keeps them unique);
	// empty means "sp".
	Name string
	Pods []PodSpec
}

type PodSpec struct {
	Name string
}

// Topology is one node netns and its pods.
type Topology struct {
	Node *Node
	Pods []*Pod

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

// Node is the netns the pods are routed through.
type Node struct {
	Name string // netns name under /run/netns
	NS   netns.NsHandle
}

// Pod is a netns with one interface, PodIfName, whose peer HostIf is in the
// node netns.
type Pod struct {
	Name        string
	NetnsName   string
	NS          netns.NsHandle
	HostIf      string // host-side veth, in the node netns
	HostIfIndex int
	IfName      string
	IPv4, IPv6  netip.Addr
}

// Do runs fn on a thread inside the node netns. Sockets fn creates stay in
// that netns after it returns.
func (n *Node) Do(fn func() error) error { return nsexec.Do(n.NS, fn) }

// Do runs fn on a thread inside the pod netns. Sockets fn creates stay in
// that netns after it returns.
func (p *Pod) Do(fn func() error) error { return nsexec.Do(p.NS, fn) }

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

func (s Spec) validate() error {
	if s.Name != "" && !validName.MatchString(s.Name) {
		return fmt.Errorf("topology name %q: want lowercase letters, digits and '-'", s.Name)
	}
	if len(s.Pods) > MaxPods {
		return fmt.Errorf("%d pods: at most %d fit in %s", len(s.Pods), MaxPods, PodCIDRv4)
	}
	seen := map[string]bool{}
	for _, p := range s.Pods {
		if !validName.MatchString(p.Name) {
			return fmt.Errorf("pod name %q: want lowercase letters, digits and '-'", p.Name)
		}
		if seen[p.Name] {
			return fmt.Errorf("duplicate pod name %q", p.Name)
		}
		if p.Name == nodeSuffix {
			return fmt.Errorf("pod name %q is taken by the node's netns", p.Name)
		}
		seen[p.Name] = true
	}
	return nil
}

// New builds the topology described by spec. On error everything already
// created is removed.
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
	if err := t.build(prefix, spec.Pods); err != nil {
		return nil, errors.Join(err, t.Close())
	}
	return t, nil
}

func (t *Topology) build(prefix string, pods []PodSpec) error {
	node := &Node{Name: prefix + "-" + nodeSuffix}
	if err := t.newNS(node.Name, &node.NS); err != nil {
		return err
	}
	t.Node = node
	if err := node.Do(configureNode); err != nil {
		return fmt.Errorf("node %s: %w", node.Name, err)
	}
	for i, ps := range pods {
		p := &Pod{
			Name:      ps.Name,
			NetnsName: prefix + "-" + ps.Name,
			HostIf:    hostIfName(i, ps.Name),
			IfName:    PodIfName,
			IPv4:      nthAddr(PodCIDRv4, firstPodHost+i),
			IPv6:      v6Like(PodCIDRv6, firstPodHost+i),
		}
		if err := t.newNS(p.NetnsName, &p.NS); err != nil {
			return err
		}
		t.Pods = append(t.Pods, p)
		if err := t.plug(p); err != nil {
			return fmt.Errorf("pod %s: %w", p.Name, err)
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

// plug creates p's veth pair from the node side, with the peer born inside
// the pod netns so no interface ever appears in the caller's namespace.
func (t *Topology) plug(p *Pod) error {
	if err := p.Do(configurePod); err != nil {
		return err
	}
	err := t.Node.Do(func() error {
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: p.HostIf},
			PeerName:      PodIfName,
			PeerNamespace: netlink.NsFd(int(p.NS)),
		}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth %s: %w", p.HostIf, err)
		}
		host, err := netlink.LinkByName(p.HostIf)
		if err != nil {
			return err
		}
		p.HostIfIndex = host.Attrs().Index
		if err := netlink.LinkSetUp(host); err != nil {
			return err
		}
		return configureLink(host,
			[]netip.Prefix{netip.PrefixFrom(GatewayIPv4, 32), netip.PrefixFrom(GatewayIPv6, 64)},
			[]*netlink.Route{
				{LinkIndex: host.Attrs().Index, Dst: ipNet(netip.PrefixFrom(p.IPv4, 32)), Scope: netlink.SCOPE_LINK},
				{LinkIndex: host.Attrs().Index, Dst: ipNet(netip.PrefixFrom(p.IPv6, 128))},
			})
	})
	if err != nil {
		return err
	}
	return p.Do(func() error {
		eth, err := netlink.LinkByName(PodIfName)
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(eth); err != nil {
			return err
		}
		return configureLink(eth,
			[]netip.Prefix{netip.PrefixFrom(p.IPv4, 32), netip.PrefixFrom(p.IPv6, 128)},
			[]*netlink.Route{
				{LinkIndex: eth.Attrs().Index, Gw: GatewayIPv4.AsSlice(), Flags: int(netlink.FLAG_ONLINK)},
				{LinkIndex: eth.Attrs().Index, Gw: GatewayIPv6.AsSlice(), Flags: int(netlink.FLAG_ONLINK)},
			})
	})
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
