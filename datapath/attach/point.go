package attach

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
)

// Point is where on a device a program runs. Which point carries which
// direction of a pod's traffic depends on the device kind, and the
// topology says so (harness/topology: Pod.Hooks).
type Point string

const (
	// TCIngress and TCEgress are the device's tc hooks, tcx or clsact.
	TCIngress Point = "tc-ingress"
	TCEgress  Point = "tc-egress"
	// NetkitPeer runs inside netkit's xmit for what the peer (pod-side)
	// device sends; NetkitPrimary for what the primary (host-side) device
	// sends into the pod. Both are attached through the primary device.
	NetkitPeer    Point = "netkit-peer"
	NetkitPrimary Point = "netkit-primary"
)

// Netkit is the mode reported for programs in netkit's own slots.
const Netkit Mode = "netkit"

// AttachPoint attaches prog at dev's point, replacing an earlier
// servicepath program there atomically, and reports how it was attached:
// tcx or tc (per a.Mode) for the tc points, netkit for netkit's slots.
func (a *Attacher) AttachPoint(prog *ebpf.Program, dev string, p Point) (Mode, error) {
	switch p {
	case TCIngress:
		return a.Attach(prog, dev, Ingress)
	case TCEgress:
		return a.Attach(prog, dev, Egress)
	case NetkitPeer, NetkitPrimary:
		return Netkit, a.attachNetkit(prog, dev, p)
	}
	return "", fmt.Errorf("unknown attach point %q", p)
}

// DetachPoint removes servicepath's program from dev's point; absent is
// not an error.
func (a *Attacher) DetachPoint(dev string, p Point) error {
	switch p {
	case TCIngress:
		return a.Detach(dev, Ingress)
	case TCEgress:
		return a.Detach(dev, Egress)
	case NetkitPeer, NetkitPrimary:
		return detachPinned(a.netkitPin(dev, p))
	}
	return fmt.Errorf("unknown attach point %q", p)
}

func (a *Attacher) netkitPin(dev string, p Point) string {
	return filepath.Join(a.LinkDir, fmt.Sprintf("%s-%s", dev, p))
}

// attachNetkit puts prog in one of the netkit device's two program slots.
// netkit programs return NETKIT_PASS, NETKIT_DROP and NETKIT_REDIRECT,
// which are TC_ACT_OK, TC_ACT_SHOT and TC_ACT_REDIRECT, so the tc programs
// run there unchanged.
func (a *Attacher) attachNetkit(prog *ebpf.Program, dev string, p Point) error {
	l, err := netlink.LinkByName(dev)
	if err != nil {
		return fmt.Errorf("device %s: %w", dev, err)
	}
	if _, ok := l.(*netlink.Netkit); !ok {
		return fmt.Errorf("attach %s to %s: a %s device, not netkit", p, dev, l.Type())
	}
	ifindex := l.Attrs().Index
	pin := a.netkitPin(dev, p)
	if old, err := link.LoadPinnedLink(pin, nil); err == nil {
		info, ierr := old.Info()
		if ierr == nil && info.Netkit() != nil && int(info.Netkit().Ifindex) == ifindex {
			err := old.Update(prog)
			old.Close()
			if err != nil {
				return fmt.Errorf("replace %s on %s: %w", p, dev, err)
			}
			return nil
		}
		// The device was recreated under the same name.
		old.Close()
		if err := detachPinned(pin); err != nil {
			return err
		}
	}
	at := ebpf.AttachNetkitPeer
	if p == NetkitPrimary {
		at = ebpf.AttachNetkitPrimary
	}
	nl, err := link.AttachNetkit(link.NetkitOptions{Interface: ifindex, Program: prog, Attach: at})
	if err != nil {
		return fmt.Errorf("attach %s to %s: %w", p, dev, err)
	}
	defer nl.Close()
	if err := os.MkdirAll(a.LinkDir, 0o755); err != nil {
		return err
	}
	if err := nl.Pin(pin); err != nil {
		return errors.Join(nl.Detach(), fmt.Errorf("pin %s link: %w", p, err))
	}
	return nil
}
