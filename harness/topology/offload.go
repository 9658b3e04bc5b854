package topology

import (
	"fmt"
	"runtime"
	"unsafe"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/nsexec"
)

// SetChecksumOffload turns dev's transmit and receive checksum offload on
// or off (ethtool -K dev tx .. rx ..), in the calling thread's netns.
// veth offloads both by default: what it sends carries a partial checksum
// (CHECKSUM_PARTIAL), and what it receives is taken as verified. With both
// off a veth behaves like a wire: checksums are complete when sent and
// checked when received.
func SetChecksumOffload(dev string, tx, rx bool) error {
	for _, s := range []struct {
		cmd uint32
		on  bool
	}{{unix.ETHTOOL_STXCSUM, tx}, {unix.ETHTOOL_SRXCSUM, rx}} {
		if err := ethtoolSet(dev, s.cmd, s.on); err != nil {
			return fmt.Errorf("checksum offload of %s: %w", dev, err)
		}
	}
	return nil
}

// SetGRO turns dev's generic receive offload on or off (ethtool -K dev gro
// ..), in the calling thread's netns. A veth merges what it receives only
// while it runs NAPI, which an XDP program on it turns on.
func SetGRO(dev string, on bool) error {
	if err := ethtoolSet(dev, unix.ETHTOOL_SGRO, on); err != nil {
		return fmt.Errorf("GRO of %s: %w", dev, err)
	}
	return nil
}

// ethtoolSet sends one legacy ethtool set command (struct ethtool_value).
func ethtoolSet(dev string, cmd uint32, on bool) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	value := struct{ cmd, data uint32 }{cmd: cmd}
	if on {
		value.data = 1
	}
	// struct ifreq: the name, then ifr_data in its 24-byte union.
	var ifr struct {
		name [unix.IFNAMSIZ]byte
		data unsafe.Pointer
		_    [24 - unsafe.Sizeof(uintptr(0))]byte
	}
	copy(ifr.name[:], dev)
	ifr.data = unsafe.Pointer(&value)
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr)))
	runtime.KeepAlive(&value)
	if errno != 0 {
		return errno
	}
	return nil
}

// WirePorts runs fn in the wire's netns on each port of its bridge: the
// peers of the nodes' and the external client's wire devices.
func (t *Topology) WirePorts(fn func(port netlink.Link) error) error {
	if t.WireNetns == "" {
		return fmt.Errorf("the topology has no wire")
	}
	return nsexec.Do(t.wireNS, func() error {
		br, err := netlink.LinkByName("br0")
		if err != nil {
			return err
		}
		links, err := netlink.LinkList()
		if err != nil {
			return err
		}
		for _, l := range links {
			if l.Attrs().MasterIndex == br.Attrs().Index {
				if err := fn(l); err != nil {
					return fmt.Errorf("wire port %s: %w", l.Attrs().Name, err)
				}
			}
		}
		return nil
	})
}

// LinkStats reads dev's counters in the netns do runs in. A device counts
// a GSO packet once, at its full length, so bytes over packets is the
// average length of what the stack handed it.
func LinkStats(do func(fn func() error) error, dev string) (netlink.LinkStatistics, error) {
	var s netlink.LinkStatistics
	err := do(func() error {
		l, err := netlink.LinkByName(dev)
		if err == nil {
			s = *l.Attrs().Statistics
		}
		return err
	})
	if err != nil {
		return s, fmt.Errorf("counters of %s: %w", dev, err)
	}
	return s, nil
}
