package bandwidth

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ErrNoFQ is a kernel without the fq qdisc (sch_fq), which holds packets
// until the departure time EDT gives them: without it they leave at once.
var ErrNoFQ = fmt.Errorf("the kernel has no fq qdisc (sch_fq, CONFIG_NET_SCH_FQ): %w", errors.ErrUnsupported)

// EnsureFQ makes fq the qdisc of what link transmits: the root of a
// single-queue device, and under mq one per tx queue of a multi-queue one,
// so queues keep their CPUs. An fq already in place is kept, so a restart
// of the agent drops no queued packet.
func EnsureFQ(link netlink.Link) error {
	name := link.Attrs().Name
	qdiscs, err := netlink.QdiscList(link)
	if err != nil {
		return fmt.Errorf("qdiscs of %s: %w", name, err)
	}
	queues := link.Attrs().NumTxQueues
	if queues <= 1 {
		if hasFQ(qdiscs, netlink.HANDLE_ROOT) {
			return nil
		}
		return addFQ(name, netlink.NewFq(netlink.QdiscAttrs{LinkIndex: link.Attrs().Index, Parent: netlink.HANDLE_ROOT}), true)
	}
	mq, ok := rootMQ(qdiscs)
	if !ok {
		mq = netlink.MakeHandle(1, 0)
		root := &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: link.Attrs().Index, Parent: netlink.HANDLE_ROOT, Handle: mq}, QdiscType: "mq"}
		if err := netlink.QdiscReplace(root); err != nil {
			return fmt.Errorf("mq root qdisc on %s: %w", name, err)
		}
		if qdiscs, err = netlink.QdiscList(link); err != nil {
			return fmt.Errorf("qdiscs of %s: %w", name, err)
		}
	}
	major, _ := netlink.MajorMinor(mq)
	for q := 1; q <= queues; q++ {
		parent := netlink.MakeHandle(major, uint16(q))
		if hasFQ(qdiscs, parent) {
			continue
		}
		if err := addFQ(name, netlink.NewFq(netlink.QdiscAttrs{LinkIndex: link.Attrs().Index, Parent: parent}), false); err != nil {
			if !ok && errors.Is(err, ErrNoFQ) {
				// Nothing of fq can be had: the mq root goes again,
				// and the device has its default qdisc back.
				err = errors.Join(err, netlink.QdiscDel(&netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{
					LinkIndex: link.Attrs().Index, Parent: netlink.HANDLE_ROOT, Handle: mq}, QdiscType: "mq"}))
			}
			return err
		}
	}
	return nil
}

func addFQ(dev string, fq *netlink.Fq, root bool) error {
	err := netlink.QdiscReplace(fq)
	switch {
	case errors.Is(err, unix.ENOENT):
		return fmt.Errorf("fq on %s: %w", dev, ErrNoFQ)
	case err != nil && root:
		return fmt.Errorf("fq root qdisc on %s: %w", dev, err)
	case err != nil:
		return fmt.Errorf("fq on tx queue %d of %s: %w", fq.Parent&0xffff, dev, err)
	}
	return nil
}

func hasFQ(qdiscs []netlink.Qdisc, parent uint32) bool {
	for _, q := range qdiscs {
		if q.Attrs().Parent == parent && q.Type() == "fq" {
			return true
		}
	}
	return false
}

// rootMQ is the handle of the device's mq root qdisc, if it has one.
func rootMQ(qdiscs []netlink.Qdisc) (uint32, bool) {
	for _, q := range qdiscs {
		if q.Attrs().Parent == netlink.HANDLE_ROOT && q.Type() == "mq" {
			return q.Attrs().Handle, true
		}
	}
	return 0, false
}
