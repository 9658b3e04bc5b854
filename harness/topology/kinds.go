package topology

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/netdev"
)

// Kind is how a pod is plugged into its node.
type Kind string

const (
	// Veth: a veth pair, the host side routed in the node netns.
	Veth Kind = "veth"
	// NetkitL3 and NetkitL2: a netkit pair (Linux 6.7+) in its default L3
	// mode (no ARP, no MAC addresses) or in L2 mode. The primary device is
	// the host side; the peer is the pod's.
	NetkitL3 Kind = "netkit"
	NetkitL2 Kind = "netkit-l2"
	// IPvlanL3 and IPvlanL3S: an ipvlan slave of the node's uplink moved
	// into the pod. Pods on one node talk slave to slave inside ipvlan, never
	// crossing the node's stack, so there is no host-side device; the node
	// reaches its pods through an ipvlan slave of its own ("sp-host").
	IPvlanL3  Kind = "ipvlan-l3"
	IPvlanL3S Kind = "ipvlan-l3s"
	// Auto is netkit (L3) where the kernel has it, veth otherwise.
	Auto Kind = "auto"
)

// Kinds lists every concrete kind, for tests that loop over them.
var Kinds = []Kind{Veth, NetkitL3, NetkitL2, IPvlanL3, IPvlanL3S}

// ErrKindUnsupported wraps the kernel's error when it cannot create a
// kind's device (the driver is absent).
var ErrKindUnsupported = errors.New("device kind not supported by this kernel")

// ParseKind reads a kind's name.
func ParseKind(s string) (Kind, error) {
	for _, k := range append(Kinds, Auto) {
		if string(k) == s {
			return k, nil
		}
	}
	return "", fmt.Errorf("device kind %q: want one of %v or auto", s, Kinds)
}

// Driver names the kernel driver the kind needs and the first Linux
// release that has it.
func (k Kind) Driver() (name, minKernel string) {
	switch {
	case k.isNetkit():
		return "netkit", "6.7"
	case k.isIPvlan():
		return "ipvlan", "3.19"
	}
	return "veth", "2.6"
}

func (k Kind) isNetkit() bool { return k == NetkitL3 || k == NetkitL2 }
func (k Kind) isIPvlan() bool { return k == IPvlanL3 || k == IPvlanL3S }

// Hook says where a datapath attaches for one pod, whatever the kind:
// in which netns, on which device, at which points for the traffic the
// pod sends and the traffic delivered to it.
type Hook struct {
	// Name is unique in the topology (the pod's name): pins are named by it.
	Name string
	// Do runs fn in the netns that holds Dev.
	Do      func(fn func() error) error
	Dev     string
	Ifindex int
	FromPod attach.Point
	ToPod   attach.Point
	// HostSide says Dev is in the node netns: the node can redirect
	// packets to it (BPF host routing). False for ipvlan, whose hooks sit
	// on the pod's own device.
	HostSide bool
}

// Hook is where a datapath attaches for p.
//   - veth: the host-side device; tc ingress is what the pod sends, tc
//     egress what is delivered to it.
//   - netkit: the primary device; the peer slot runs inside netkit's xmit
//     for what the pod sends, the primary slot for what goes into it.
//   - ipvlan: no host-side device exists, so the pod's own slave, inside
//     the pod netns: tc egress is what the pod sends (before ipvlan
//     switches it), tc ingress what ipvlan delivers to it.
func (p *Pod) Hook() Hook {
	h := Hook{Name: p.Name, Do: p.Node.Do, Dev: p.HostIf, Ifindex: p.HostIfIndex, HostSide: true}
	switch {
	case p.Kind.isNetkit():
		h.FromPod, h.ToPod = attach.NetkitPeer, attach.NetkitPrimary
	case p.Kind.isIPvlan():
		h.Do, h.Dev, h.Ifindex, h.HostSide = p.Do, p.IfName, p.IfIndex, false
		h.FromPod, h.ToPod = attach.TCEgress, attach.TCIngress
	default:
		h.FromPod, h.ToPod = attach.TCIngress, attach.TCEgress
	}
	return h
}

func unsupported(k Kind, err error) error {
	name, _ := k.Driver()
	return fmt.Errorf("%w: %s (%s driver): %w", ErrKindUnsupported, k, name, err)
}

// resolveAuto picks netkit when a netkit pair can be made in node.
func resolveAuto(node *Node) Kind {
	err := node.Do(func() error {
		nk := &netlink.Netkit{LinkAttrs: netlink.LinkAttrs{Name: "sp-nkprobe"}, Mode: netlink.NETKIT_MODE_L3}
		nk.SetPeerAttrs(&netlink.LinkAttrs{Name: "sp-nkprobe-p"})
		if err := netlink.LinkAdd(nk); err != nil {
			return err
		}
		return netlink.LinkDel(nk)
	})
	if err != nil {
		return Veth
	}
	return NetkitL3
}

// plug creates p's device from the node side, with the pod's end born
// inside (or moved into) the pod netns, so no interface ever appears in
// the caller's namespace, then addresses and routes both ends.
func (t *Topology) plug(p *Pod, i int) error {
	if err := p.Do(configurePod); err != nil {
		return err
	}
	var err error
	switch {
	case p.Kind.isIPvlan():
		err = t.plugIPvlan(p, i)
	default:
		err = t.plugPair(p)
	}
	if err != nil {
		return err
	}
	return p.Do(func() error {
		eth, err := netlink.LinkByName(PodIfName)
		if err != nil {
			return err
		}
		p.IfIndex = eth.Attrs().Index
		if err := netlink.LinkSetUp(eth); err != nil {
			return err
		}
		return configureLink(eth,
			[]netip.Prefix{netip.PrefixFrom(p.IPv4, 32), netip.PrefixFrom(p.IPv6, 128)},
			[]*netlink.Route{
				{LinkIndex: eth.Attrs().Index, Gw: p.Node.GatewayIPv4.AsSlice(), Flags: int(netlink.FLAG_ONLINK)},
				{LinkIndex: eth.Attrs().Index, Gw: p.Node.GatewayIPv6.AsSlice(), Flags: int(netlink.FLAG_ONLINK)},
			})
	})
}

// plugPair makes a veth or netkit pair: host side in the node, carrying
// the node's gateway addresses and a route to each of the pod's.
func (t *Topology) plugPair(p *Pod) error {
	return p.Node.Do(func() error {
		var l netlink.Link
		if p.Kind.isNetkit() {
			mode := netlink.NETKIT_MODE_L3
			if p.Kind == NetkitL2 {
				mode = netlink.NETKIT_MODE_L2
			}
			nk := &netlink.Netkit{
				LinkAttrs:  netlink.LinkAttrs{Name: p.HostIf},
				Mode:       mode,
				Policy:     netlink.NETKIT_POLICY_FORWARD,
				PeerPolicy: netlink.NETKIT_POLICY_FORWARD,
			}
			nk.SetPeerAttrs(&netlink.LinkAttrs{Name: PodIfName, Namespace: netlink.NsFd(int(p.NS))})
			l = nk
		} else {
			l = &netlink.Veth{
				LinkAttrs:     netlink.LinkAttrs{Name: p.HostIf},
				PeerName:      PodIfName,
				PeerNamespace: netlink.NsFd(int(p.NS)),
			}
		}
		if err := netlink.LinkAdd(l); err != nil {
			if p.Kind.isNetkit() && isUnsupported(err) {
				return unsupported(p.Kind, err)
			}
			return fmt.Errorf("add %s %s: %w", p.Kind, p.HostIf, err)
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
			nodeAddrs(p.Node), podRoutes(host, p))
	})
}

// nodeAddrs are what the node's side of every pod device carries.
func nodeAddrs(n *Node) []netip.Prefix {
	return []netip.Prefix{
		netip.PrefixFrom(n.GatewayIPv4, 32), netip.PrefixFrom(n.GatewayIPv6, 64), netip.PrefixFrom(n.IPv6, 128),
	}
}

func podRoutes(l netlink.Link, p *Pod) []*netlink.Route {
	return []*netlink.Route{
		{LinkIndex: l.Attrs().Index, Dst: ipNet(netip.PrefixFrom(p.IPv4, 32)), Scope: netlink.SCOPE_LINK},
		{LinkIndex: l.Attrs().Index, Dst: ipNet(netip.PrefixFrom(p.IPv6, 128))},
	}
}

func ipvlanMode(k Kind) netlink.IPVlanMode {
	if k == IPvlanL3S {
		return netlink.IPVLAN_MODE_L3S
	}
	return netlink.IPVLAN_MODE_L3
}

// hostShim is the node's own ipvlan slave: ipvlan never delivers what the
// master sends to its slaves, so the node reaches its pods through one.
const hostShim = "sp-host"

// setupIPvlanNode gives node an uplink to be the ipvlan master (its wire
// device, else a veth stub) and the shim slave carrying the node's gateway
// addresses. It runs inside the node netns.
func setupIPvlanNode(n *Node, k Kind) error {
	if n.WireIPv4.IsValid() {
		n.uplink = WireIfName
	} else {
		n.uplink = "uplink"
		stub := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: n.uplink}, PeerName: "uplink-peer"}
		if err := netlink.LinkAdd(stub); err != nil {
			return fmt.Errorf("add uplink stub: %w", err)
		}
		for _, name := range []string{n.uplink, "uplink-peer"} {
			if err := linkUp(name); err != nil {
				return err
			}
		}
	}
	master, err := netlink.LinkByName(n.uplink)
	if err != nil {
		return err
	}
	shim := &netlink.IPVlan{LinkAttrs: netlink.LinkAttrs{Name: hostShim, ParentIndex: master.Attrs().Index}, Mode: ipvlanMode(k)}
	if err := netlink.LinkAdd(shim); err != nil {
		if isUnsupported(err) {
			return unsupported(k, err)
		}
		return fmt.Errorf("add ipvlan %s: %w", hostShim, err)
	}
	if err := linkUp(hostShim); err != nil {
		return err
	}
	l, err := netlink.LinkByName(hostShim)
	if err != nil {
		return err
	}
	return configureLink(l, nodeAddrs(n), nil)
}

// plugIPvlan makes p's slave of its node's uplink under a temporary name,
// moves it into the pod as PodIfName, and routes the pod's addresses to
// the node's shim.
func (t *Topology) plugIPvlan(p *Pod, i int) error {
	// ipvlan slaves share their master's MAC, hence their link-local
	// address; ipvlan refuses duplicates, so the pod gets none.
	if err := p.Do(func() error {
		return writeSysctls(map[string]string{"net/ipv6/conf/default/addr_gen_mode": "1"})
	}); err != nil {
		return err
	}
	tmp := fmt.Sprintf("ipvl%d", i)
	err := p.Node.Do(func() error {
		master, err := netlink.LinkByName(p.Node.uplink)
		if err != nil {
			return err
		}
		slave := &netlink.IPVlan{LinkAttrs: netlink.LinkAttrs{Name: tmp, ParentIndex: master.Attrs().Index}, Mode: ipvlanMode(p.Kind)}
		if err := netlink.LinkAdd(slave); err != nil {
			if isUnsupported(err) {
				return unsupported(p.Kind, err)
			}
			return fmt.Errorf("add ipvlan %s: %w", tmp, err)
		}
		l, err := netlink.LinkByName(tmp)
		if err != nil {
			return err
		}
		if err := netlink.LinkSetNsFd(l, int(p.NS)); err != nil {
			return fmt.Errorf("move %s into the pod: %w", tmp, err)
		}
		shim, err := netlink.LinkByName(hostShim)
		if err != nil {
			return err
		}
		return configureLink(shim, nil, podRoutes(shim, p))
	})
	if err != nil {
		return err
	}
	return p.Do(func() error {
		l, err := netlink.LinkByName(tmp)
		if err != nil {
			return err
		}
		return netlink.LinkSetName(l, PodIfName)
	})
}

// setBigTCP raises the limits of both ends of p's device.
func (p *Pod) setBigTCP() error {
	set := func(dev string) func() error {
		return func() error {
			b, err := netdev.SetBigTCP(dev, netdev.BigTCPSize)
			p.BigTCP = append(p.BigTCP, b)
			return err
		}
	}
	if p.HostIf != "" {
		if err := p.Node.Do(set(p.HostIf)); err != nil {
			return err
		}
	}
	return p.Do(set(p.IfName))
}

func linkUp(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return err
	}
	return netlink.LinkSetUp(l)
}

// isUnsupported says the kernel has no such device kind: rtnetlink
// answers EOPNOTSUPP for a kind no driver registered.
func isUnsupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP)
}
