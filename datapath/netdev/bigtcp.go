package netdev

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// BigTCPSize is the GSO and GRO limit BIG TCP raises devices to: 192 KiB,
// Cilium's, three times the 64 KiB an IP length field can say.
const BigTCPSize = 196608

// legacyMax is the largest packet an IP header's length can describe, the
// kernel's default limit (GSO_LEGACY_MAX_SIZE).
const legacyMax = 65536

// BigTCP is what a device's limits read back as after SetBigTCP.
type BigTCP struct {
	Dev string
	// GSO and GRO are gso_max_size and gro_max_size: IPv6's limits, and
	// IPv4's before Linux 6.3.
	GSO, GRO uint32
	// GSOIPv4 and GROIPv4 are gso_ipv4_max_size and gro_ipv4_max_size
	// (Linux 6.3+); zero where the kernel has none.
	GSOIPv4, GROIPv4 uint32
	// Refused names each limit the kernel refused to raise, with why.
	Refused []error
}

// IPv6 says the device builds and accepts IPv6 packets over 64 KiB.
func (b BigTCP) IPv6() bool { return b.GSO > legacyMax && b.GRO > legacyMax }

// IPv4 says the same for IPv4 (only the Linux 6.3+ limits allow it).
func (b BigTCP) IPv4() bool { return b.GSOIPv4 > legacyMax && b.GROIPv4 > legacyMax }

func (b BigTCP) String() string {
	return fmt.Sprintf("%s: gso_max_size %d gro_max_size %d gso_ipv4_max_size %d gro_ipv4_max_size %d",
		b.Dev, b.GSO, b.GRO, b.GSOIPv4, b.GROIPv4)
}

// SetBigTCP raises dev's GSO and GRO limits, for IPv6 and IPv4, to size,
// in the calling thread's netns, and reads them back. It probes rather
// than checks versions: each limit is set on its own, and one the driver
// refuses (above its tso_max_size) stays as it was, named in Refused. A
// kernel before 6.3 ignores the IPv4 attributes, which then read back as
// zero. Limits already at size or above are left alone. The error is for
// failures other than a refusal.
func SetBigTCP(dev string, size uint32) (BigTCP, error) {
	l, err := netlink.LinkByName(dev)
	if err != nil {
		return BigTCP{}, fmt.Errorf("big tcp on %s: %w", dev, err)
	}
	a := l.Attrs()
	b := BigTCP{Dev: dev}
	// gso_max_size first: setting it also lowers gso_ipv4_max_size when
	// it is within 64 KiB, so the IPv4 limit must come after.
	for _, s := range []struct {
		name string
		cur  uint32
		set  func(netlink.Link, int) error
	}{
		{"gso_max_size", a.GSOMaxSize, netlink.LinkSetGSOMaxSize},
		{"gro_max_size", a.GROMaxSize, netlink.LinkSetGROMaxSize},
		{"gso_ipv4_max_size", a.GSOIPv4MaxSize, netlink.LinkSetGSOIPv4MaxSize},
		{"gro_ipv4_max_size", a.GROIPv4MaxSize, netlink.LinkSetGROIPv4MaxSize},
	} {
		if s.cur >= size {
			continue
		}
		if err := s.set(l, int(size)); err != nil {
			if !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ERANGE) && !errors.Is(err, unix.EOPNOTSUPP) {
				return b, fmt.Errorf("big tcp on %s: %s %d: %w", dev, s.name, size, err)
			}
			b.Refused = append(b.Refused, fmt.Errorf("%s %d: %w", s.name, size, err))
		}
	}
	got, err := ReadBigTCP(dev)
	got.Refused = b.Refused
	return got, err
}

// ReadBigTCP reads dev's GSO and GRO limits, in the calling thread's netns.
func ReadBigTCP(dev string) (BigTCP, error) {
	l, err := netlink.LinkByName(dev)
	if err != nil {
		return BigTCP{Dev: dev}, fmt.Errorf("big tcp on %s: %w", dev, err)
	}
	a := l.Attrs()
	return BigTCP{Dev: dev, GSO: a.GSOMaxSize, GRO: a.GROMaxSize, GSOIPv4: a.GSOIPv4MaxSize, GROIPv4: a.GROIPv4MaxSize}, nil
}
