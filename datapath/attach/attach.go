// Package attach puts tc programs on devices: tcx links where the kernel
// has them, clsact + cls_bpf otherwise, chosen by trying.
package attach

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Direction is the tc hook on a device.
type Direction string

const (
	Ingress Direction = "ingress"
	Egress  Direction = "egress"
)

// Mode is how a program is attached.
type Mode string

const (
	// Auto tries tcx and falls back to tc when the kernel lacks it.
	Auto Mode = "auto"
	TCX  Mode = "tcx"
	// TC is clsact + cls_bpf in direct-action mode.
	TC Mode = "tc"
)

// ParseMode reads the CLI spelling.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case Auto, TCX, TC:
		return m, nil
	}
	return "", fmt.Errorf("attach mode %q: want auto, tcx or tc", s)
}

// filterName marks our cls_bpf filters so unload finds exactly them.
const filterName = "servicepath"

// tc filter priority and handle; one filter per hook, replaced in place.
const (
	filterPriority = 1
	filterHandle   = 0x5e
)

// Attacher attaches programs to devices of the calling thread's netns and
// pins tcx links under LinkDir so they outlive the process.
type Attacher struct {
	LinkDir string
	Mode    Mode
}

func (a *Attacher) pinPath(dev string, dir Direction) string {
	return filepath.Join(a.LinkDir, fmt.Sprintf("%s-%s", dev, dir))
}

// Attach attaches prog to dev's dir hook, replacing an earlier servicepath
// program there atomically, and reports the mode used.
func (a *Attacher) Attach(prog *ebpf.Program, dev string, dir Direction) (Mode, error) {
	l, err := netlink.LinkByName(dev)
	if err != nil {
		return "", fmt.Errorf("device %s: %w", dev, err)
	}
	ifindex := l.Attrs().Index
	mode := a.Mode
	if mode == "" {
		mode = Auto
	}
	if mode == Auto || mode == TCX {
		err := a.attachTCX(prog, dev, ifindex, dir)
		if err == nil {
			// A device moved from tc to tcx must not run both.
			return TCX, a.detachTC(l, dir)
		}
		if mode == TCX || !errors.Is(err, ebpf.ErrNotSupported) {
			return "", fmt.Errorf("attach tcx %s %s: %w", dev, dir, err)
		}
	}
	if err := a.attachTC(prog, l, dir); err != nil {
		return "", fmt.Errorf("attach tc %s %s: %w", dev, dir, err)
	}
	return TC, a.unpinTCX(dev, dir)
}

func (a *Attacher) attachTCX(prog *ebpf.Program, dev string, ifindex int, dir Direction) error {
	pin := a.pinPath(dev, dir)
	if old, err := link.LoadPinnedLink(pin, nil); err == nil {
		info, ierr := old.Info()
		if ierr == nil && info.TCX() != nil && int(info.TCX().Ifindex) == ifindex {
			err := old.Update(prog)
			old.Close()
			return err
		}
		// The device was recreated under the same name: the old link is
		// defunct.
		old.Unpin()
		old.Close()
	}
	attach := ebpf.AttachTCXIngress
	if dir == Egress {
		attach = ebpf.AttachTCXEgress
	}
	l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: attach})
	if err != nil {
		return err
	}
	defer l.Close()
	if err := os.MkdirAll(a.LinkDir, 0o755); err != nil {
		return err
	}
	if err := l.Pin(pin); err != nil {
		return fmt.Errorf("pin link: %w", err)
	}
	return nil
}

func parent(dir Direction) uint32 {
	if dir == Egress {
		return netlink.HANDLE_MIN_EGRESS
	}
	return netlink.HANDLE_MIN_INGRESS
}

func (a *Attacher) attachTC(prog *ebpf.Program, l netlink.Link, dir Direction) error {
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: l.Attrs().Index,
			Handle:    netlink.MakeHandle(0xffff, 0),
			Parent:    netlink.HANDLE_CLSACT,
		},
		QdiscType: "clsact",
	}
	if err := netlink.QdiscReplace(qdisc); err != nil {
		return fmt.Errorf("clsact qdisc: %w", err)
	}
	filter := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: l.Attrs().Index,
			Parent:    parent(dir),
			Handle:    filterHandle,
			Priority:  filterPriority,
			Protocol:  unix.ETH_P_ALL,
		},
		Fd:           prog.FD(),
		Name:         filterName,
		DirectAction: true,
	}
	return netlink.FilterReplace(filter)
}

// Detach removes servicepath's program from dev's dir hook, whichever way
// it was attached; absent is not an error.
func (a *Attacher) Detach(dev string, dir Direction) error {
	errs := []error{a.unpinTCX(dev, dir)}
	if l, err := netlink.LinkByName(dev); err == nil {
		errs = append(errs, a.detachTC(l, dir))
	}
	return errors.Join(errs...)
}

// unpinTCX detaches and unpins a pinned tcx link. Unpinning alone would
// leave the program running until the last handle closes and the kernel
// frees the link, so it is detached explicitly first.
func (a *Attacher) unpinTCX(dev string, dir Direction) error {
	return detachPinned(a.pinPath(dev, dir))
}

func detachPinned(pin string) error {
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open pinned link %s: %w", pin, err)
	}
	defer l.Close()
	if err := l.Detach(); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("detach link %s: %w", pin, err)
	}
	if err := l.Unpin(); err != nil {
		return fmt.Errorf("unpin link %s: %w", pin, err)
	}
	return nil
}

func (a *Attacher) detachTC(l netlink.Link, dir Direction) error {
	filters, err := netlink.FilterList(l, parent(dir))
	if err != nil {
		// No clsact qdisc: nothing of ours there.
		return nil
	}
	for _, f := range filters {
		if bf, ok := f.(*netlink.BpfFilter); ok && bf.Name == filterName {
			if err := netlink.FilterDel(f); err != nil {
				return fmt.Errorf("delete tc filter on %s %s: %w", l.Attrs().Name, dir, err)
			}
		}
	}
	return nil
}

// TCHooks names servicepath's tc filters in this netns "<device>-<dir>",
// as their pinned links name tcx attachments: a filter, made where the
// kernel has no tcx, pins nothing to be found by.
func TCHooks() ([]string, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, err
	}
	var hooks []string
	for _, l := range links {
		for _, dir := range []Direction{Ingress, Egress} {
			filters, err := netlink.FilterList(l, parent(dir))
			if err != nil {
				continue // no clsact qdisc
			}
			for _, f := range filters {
				if bf, ok := f.(*netlink.BpfFilter); ok && bf.Name == filterName {
					hooks = append(hooks, fmt.Sprintf("%s-%s", l.Attrs().Name, dir))
				}
			}
		}
	}
	return hooks, nil
}

// DetachAll removes every servicepath tc filter from every device of this
// netns and every pinned link: tcx, netkit and XDP.
func (a *Attacher) DetachAll() error {
	links, err := netlink.LinkList()
	if err != nil {
		return err
	}
	var errs []error
	for _, l := range links {
		for _, dir := range []Direction{Ingress, Egress} {
			errs = append(errs, a.detachTC(l, dir))
		}
	}
	pins, err := os.ReadDir(a.LinkDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	for _, p := range pins {
		errs = append(errs, detachPinned(filepath.Join(a.LinkDir, p.Name())))
	}
	errs = append(errs, os.RemoveAll(a.LinkDir))
	return errors.Join(errs...)
}
