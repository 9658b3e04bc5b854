package traffic

import (
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// SendIP sends a whole IP packet (header included, as built) to dst from
// doer's netns over a raw socket: a segment no socket of the netns would
// send, such as a forged TCP RST.
func SendIP(doer Doer, dst netip.Addr, pkt []byte) error {
	err := doer.Do(func() error {
		family, sa := unix.AF_INET6, unix.Sockaddr(&unix.SockaddrInet6{Addr: dst.As16()})
		if dst.Is4() {
			family, sa = unix.AF_INET, &unix.SockaddrInet4{Addr: dst.As4()}
		}
		// IPPROTO_RAW implies the header is the caller's, in both families.
		fd, err := unix.Socket(family, unix.SOCK_RAW, unix.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Sendto(fd, pkt, 0, sa)
	})
	if err != nil {
		return fmt.Errorf("send an IP packet to %s: %w", dst, err)
	}
	return nil
}
