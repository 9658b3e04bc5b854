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

// XDPMode is how an XDP program runs on a device.
type XDPMode string

const (
	// XDPOff attaches no XDP program.
	XDPOff XDPMode = "off"
	// XDPAuto is native where the driver takes it, else generic.
	XDPAuto XDPMode = "auto"
	// XDPNative runs in the driver, before an skb exists.
	XDPNative XDPMode = "native"
	// XDPGeneric runs on the skb, on any device: no faster than tc, for
	// devices whose driver has no XDP.
	XDPGeneric XDPMode = "generic"
)

// ParseXDPMode reads the CLI spelling.
func ParseXDPMode(s string) (XDPMode, error) {
	switch m := XDPMode(s); m {
	case XDPOff, XDPAuto, XDPNative, XDPGeneric:
		return m, nil
	}
	return "", fmt.Errorf("XDP mode %q: want off, auto, native or generic", s)
}

func (m XDPMode) flags() link.XDPAttachFlags {
	if m == XDPNative {
		return link.XDPDriverMode
	}
	return link.XDPGenericMode
}

// xdpPin names the mode: a device runs one XDP program, native or
// generic, and a link's info does not say which.
func (a *Attacher) xdpPin(dev string, m XDPMode) string {
	return filepath.Join(a.LinkDir, fmt.Sprintf("%s-xdp-%s", dev, m))
}

// AttachXDP attaches prog to dev's XDP hook with a link pinned under
// LinkDir, and reports the mode it runs in (native or generic). An earlier
// servicepath program there in a mode asked for (any, for auto) is
// replaced atomically; one in the other mode is detached first, leaving
// the device's packets to tc meanwhile.
func (a *Attacher) AttachXDP(prog *ebpf.Program, dev string, mode XDPMode) (XDPMode, error) {
	l, err := netlink.LinkByName(dev)
	if err != nil {
		return "", fmt.Errorf("device %s: %w", dev, err)
	}
	ifindex := l.Attrs().Index
	for _, m := range []XDPMode{XDPNative, XDPGeneric} {
		pin := a.xdpPin(dev, m)
		old, err := link.LoadPinnedLink(pin, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err == nil {
			info, ierr := old.Info()
			if ierr == nil && info.XDP() != nil && int(info.XDP().Ifindex) == ifindex && (mode == XDPAuto || mode == m) {
				err := old.Update(prog)
				old.Close()
				if err != nil {
					return "", fmt.Errorf("replace XDP (%s) on %s: %w", m, dev, err)
				}
				return m, nil
			}
			old.Close()
		}
		// Another mode, or the device was recreated under the same name.
		if err := detachPinned(pin); err != nil {
			return "", err
		}
	}
	try := []XDPMode{mode}
	if mode == XDPAuto {
		try = []XDPMode{XDPNative, XDPGeneric}
	}
	var errs []error
	for _, m := range try {
		err := a.attachXDP(prog, ifindex, m, a.xdpPin(dev, m))
		if err == nil {
			return m, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", m, err))
	}
	return "", fmt.Errorf("attach XDP to %s: %w", dev, errors.Join(errs...))
}

func (a *Attacher) attachXDP(prog *ebpf.Program, ifindex int, m XDPMode, pin string) error {
	l, err := link.AttachXDP(link.XDPOptions{Program: prog, Interface: ifindex, Flags: m.flags()})
	if err != nil {
		return err
	}
	// Unpinned, the link goes with its last handle: closing it detaches
	// the program on a failure below.
	defer l.Close()
	if err := os.MkdirAll(a.LinkDir, 0o755); err != nil {
		return err
	}
	if err := l.Pin(pin); err != nil {
		return fmt.Errorf("pin link: %w", err)
	}
	return nil
}

// DetachXDP removes servicepath's XDP program from dev, in whichever mode
// it runs; absent is not an error.
func (a *Attacher) DetachXDP(dev string) error {
	return errors.Join(detachPinned(a.xdpPin(dev, XDPNative)), detachPinned(a.xdpPin(dev, XDPGeneric)))
}
