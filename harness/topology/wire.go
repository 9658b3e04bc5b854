package topology

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/servicepath/servicepath/datapath/nsexec"
)

// buildWire joins the nodes (and the external client) on a bridge in a
// netns of its own: each gets WireIfName with an address in WireCIDRv4/v6,
// and every node routes the other nodes' pod CIDRs through them.
func (t *Topology) buildWire(prefix string, external bool) error {
	t.WireNetns = prefix + "-" + wireSuffix
	var wireNS netns.NsHandle
	if err := t.newNS(t.WireNetns, &t.wireNS); err != nil {
		return err
	}
	wireNS = t.wireNS
	err := nsexec.Do(wireNS, func() error {
		if err := configurePod(); err != nil {
			return err
		}
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}
		if err := netlink.LinkAdd(br); err != nil {
			return fmt.Errorf("add bridge: %w", err)
		}
		return netlink.LinkSetUp(br)
	})
	if err != nil {
		return err
	}
	for _, n := range t.Nodes {
		n.WireIPv4 = nthAddr(WireCIDRv4, n.Index+1)
		n.WireIPv6 = v6Like(WireCIDRv6, n.Index+1)
		if err := n.Do(func() error { return t.plugWire(wireNS, fmt.Sprintf("n%d", n.Index), n.WireIPv4, n.WireIPv6) }); err != nil {
			return fmt.Errorf("node %s: %w", n.Name, err)
		}
	}
	for _, n := range t.Nodes {
		err := n.Do(func() error {
			var routes []*netlink.Route
			for _, m := range t.Nodes {
				if m != n {
					routes = append(routes, wireRoutes(m)...)
				}
			}
			return addRoutes(WireIfName, routes)
		})
		if err != nil {
			return fmt.Errorf("node %s: routes: %w", n.Name, err)
		}
	}
	if !external {
		return nil
	}
	e := &External{Name: prefix + "-" + extSuffix, IfName: WireIfName,
		IPv4: nthAddr(WireCIDRv4, externalHost), IPv6: v6Like(WireCIDRv6, externalHost)}
	if err := t.newNS(e.Name, &e.NS); err != nil {
		return err
	}
	t.External = e
	return e.Do(func() error {
		if err := configurePod(); err != nil {
			return err
		}
		if err := t.plugWire(wireNS, "ext", e.IPv4, e.IPv6); err != nil {
			return err
		}
		var routes []*netlink.Route
		for _, n := range t.Nodes {
			routes = append(routes, wireRoutes(n)...)
		}
		return addRoutes(WireIfName, routes)
	})
}

// plugWire runs in the netns getting a wire device: a veth whose peer
// (port) joins the bridge.
func (t *Topology) plugWire(wire netns.NsHandle, port string, v4, v6 netip.Addr) error {
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: WireIfName},
		PeerName:      port,
		PeerNamespace: netlink.NsFd(int(wire)),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		return fmt.Errorf("add wire device: %w", err)
	}
	l, err := netlink.LinkByName(WireIfName)
	if err != nil {
		return err
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return err
	}
	if err := configureLink(l, []netip.Prefix{
		netip.PrefixFrom(v4, WireCIDRv4.Bits()), netip.PrefixFrom(v6, WireCIDRv6.Bits()),
	}, nil); err != nil {
		return err
	}
	return nsexec.Do(wire, func() error {
		p, err := netlink.LinkByName(port)
		if err != nil {
			return err
		}
		br, err := netlink.LinkByName("br0")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetMaster(p, br); err != nil {
			return err
		}
		return netlink.LinkSetUp(p)
	})
}

// wireRoutes reach n's pods through n's wire addresses.
func wireRoutes(n *Node) []*netlink.Route {
	return []*netlink.Route{
		{Dst: ipNet(n.PodCIDRv4), Gw: n.WireIPv4.AsSlice()},
		{Dst: ipNet(n.PodCIDRv6), Gw: n.WireIPv6.AsSlice()},
	}
}

func addRoutes(dev string, routes []*netlink.Route) error {
	l, err := netlink.LinkByName(dev)
	if err != nil {
		return err
	}
	for _, r := range routes {
		r.LinkIndex = l.Attrs().Index
	}
	return configureLink(l, nil, routes)
}
