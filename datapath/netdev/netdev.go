// Package netdev puts servicepath on a node's own devices: the node-device
// programs (bpf/bpf_host.c) at tc ingress and egress, optionally the XDP one
// (bpf/bpf_xdp.c) ahead of tc ingress, and the device's addresses that SNAT
// of north-south flows leaving by it uses.
package netdev

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
)

// SNATAddrs picks the device's SNAT addresses: its first global unicast
// address of each family (zero when it has none).
func SNATAddrs(l netlink.Link) (v4, v6 netip.Addr, err error) {
	addrs, err := netlink.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return v4, v6, fmt.Errorf("addresses of %s: %w", l.Attrs().Name, err)
	}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok || !ip.IsGlobalUnicast() {
			continue
		}
		ip = ip.Unmap()
		if ip.Is4() && !v4.IsValid() {
			v4 = ip
		} else if ip.Is6() && !v6.IsValid() {
			v6 = ip
		}
	}
	return v4, v6, nil
}

// Register records dev's SNAT addresses in the netdevs map.
func Register(m *ebpf.Map, dev string) error {
	l, err := netlink.LinkByName(dev)
	if err != nil {
		return fmt.Errorf("node device %s: %w", dev, err)
	}
	v4, v6, err := SNATAddrs(l)
	if err != nil {
		return err
	}
	if !v4.IsValid() && !v6.IsValid() {
		return fmt.Errorf("node device %s has no global address for SNAT", dev)
	}
	var info maps.NetdevInfo
	if v4.IsValid() {
		info.V4, _ = maps.AddrFrom(v4)
	}
	if v6.IsValid() {
		info.V6, _ = maps.AddrFrom(v6)
	}
	if err := m.Put(uint32(l.Attrs().Index), info); err != nil {
		return fmt.Errorf("register node device %s: %w", dev, err)
	}
	return nil
}

// Modes are how the node-device programs went on a device.
type Modes struct {
	TC  attach.Mode
	XDP attach.XDPMode // attach.XDPOff: tc alone
}

// Attach registers dev and attaches the node-device programs to it, in
// the calling thread's netns: tc ingress and egress, then, unless xdp is
// attach.XDPOff, the XDP program ahead of tc ingress, which stays for what
// XDP passes on. XDP needs dp loaded with loader.Config.XDP; auto goes on
// without it where the kernel cannot run it. With xdp off, an XDP program
// an earlier load put on dev is taken off.
func Attach(a *attach.Attacher, dp *loader.Datapath, dev string, xdp attach.XDPMode) (Modes, error) {
	if err := Register(dp.Maps.Netdevs, dev); err != nil {
		return Modes{}, err
	}
	m := Modes{XDP: attach.XDPOff}
	var err error
	if m.TC, err = a.Attach(dp.FromNetdev, dev, attach.Ingress); err != nil {
		return Modes{}, fmt.Errorf("node device %s: %w", dev, err)
	}
	if _, err := a.Attach(dp.ToNetdev, dev, attach.Egress); err != nil {
		return Modes{}, errors.Join(fmt.Errorf("node device %s: %w", dev, err), a.Detach(dev, attach.Ingress))
	}
	if xdp == "" || xdp == attach.XDPOff {
		return m, a.DetachXDP(dev)
	}
	if dp.XDPFromNetdev == nil {
		missing := dp.XDPMissing
		if xdp == attach.XDPAuto && errors.Is(missing, ebpf.ErrNotSupported) {
			return m, a.DetachXDP(dev)
		}
		if missing == nil {
			missing = errors.New("the datapath was loaded without XDP (loader.Config.XDP)")
		}
		return m, fmt.Errorf("node device %s: XDP %s: %w", dev, xdp, missing)
	}
	if m.XDP, err = a.AttachXDP(dp.XDPFromNetdev, dev, xdp); err != nil {
		return Modes{TC: m.TC, XDP: attach.XDPOff}, fmt.Errorf("node device %s: %w", dev, err)
	}
	return m, nil
}
