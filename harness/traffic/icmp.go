package traffic

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ICMPReport is what a socket's error queue (IP_RECVERR, IPV6_RECVERR)
// says of an ICMP error about a datagram the socket sent.
type ICMPReport struct {
	Errno      syscall.Errno // ECONNREFUSED for port unreachable, EMSGSIZE for a smaller path MTU
	Type, Code uint8
	// Offender is the error's source; About the quoted datagram's
	// destination.
	Offender netip.Addr
	About    netip.AddrPort
}

// UDPErrorReport sends payload to dst from an unconnected socket in doer's
// netns that asks for ICMP errors, and returns the first one it gets:
// without IP_RECVERR an unconnected socket hears of none.
func UDPErrorReport(doer Doer, dst netip.AddrPort, payload []byte, timeout time.Duration) (ICMPReport, error) {
	return UDPProbe(doer, dst, 0, payload, timeout)
}

// UDPProbe is UDPErrorReport with the datagram's TTL / hop limit set to
// ttl (0: the netns default), as traceroute probes a path: the hop where
// it runs out answers with time exceeded.
func UDPProbe(doer Doer, dst netip.AddrPort, ttl int, payload []byte, timeout time.Duration) (ICMPReport, error) {
	dst = unmap(dst)
	var r ICMPReport
	err := doer.Do(func() error {
		c, err := net.ListenUDP(udpNetwork(dst), nil)
		if err != nil {
			return err
		}
		defer c.Close()
		level, opt, ttlOpt := unix.SOL_IP, unix.IP_RECVERR, unix.IP_TTL
		if dst.Addr().Is6() {
			level, opt, ttlOpt = unix.SOL_IPV6, unix.IPV6_RECVERR, unix.IPV6_UNICAST_HOPS
		}
		if err := control(c, func(fd int) error { return unix.SetsockoptInt(fd, level, opt, 1) }); err != nil {
			return fmt.Errorf("ask for ICMP errors: %w", err)
		}
		if ttl > 0 {
			if err := control(c, func(fd int) error { return unix.SetsockoptInt(fd, level, ttlOpt, ttl) }); err != nil {
				return fmt.Errorf("set the TTL / hop limit: %w", err)
			}
		}
		if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
			return err
		}
		if _, err := c.WriteToUDPAddrPort(payload, dst); err != nil {
			return err
		}
		rc, err := c.SyscallConn()
		if err != nil {
			return err
		}
		buf, oob := make([]byte, maxReply), make([]byte, 512)
		var oobn int
		var from unix.Sockaddr
		var rerr error
		// The error queue makes the socket readable (EPOLLERR).
		if err := rc.Read(func(fd uintptr) bool {
			_, oobn, _, from, rerr = unix.Recvmsg(int(fd), buf, oob, unix.MSG_ERRQUEUE)
			return !errors.Is(rerr, unix.EAGAIN)
		}); err != nil {
			return fmt.Errorf("wait for an ICMP error: %w", err)
		}
		if rerr != nil {
			return fmt.Errorf("read the error queue: %w", rerr)
		}
		r.About = unmap(addrPortOf(from))
		return r.parse(oob[:oobn], level, opt)
	})
	if err != nil {
		return r, fmt.Errorf("ICMP error about a datagram to %s: %w", dst, err)
	}
	return r, nil
}

// parse reads struct sock_extended_err and its offender address.
func (r *ICMPReport) parse(oob []byte, level, opt int) error {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return err
	}
	for _, m := range msgs {
		if int(m.Header.Level) != level || int(m.Header.Type) != opt || len(m.Data) < 16+8 {
			continue
		}
		d := m.Data
		r.Errno = syscall.Errno(binary.NativeEndian.Uint32(d))
		if origin := d[4]; origin != unix.SO_EE_ORIGIN_ICMP && origin != unix.SO_EE_ORIGIN_ICMP6 {
			return fmt.Errorf("error of origin %d, not ICMP", origin)
		}
		r.Type, r.Code = d[5], d[6]
		sa := d[16:]
		switch binary.NativeEndian.Uint16(sa) {
		case unix.AF_INET:
			r.Offender = netip.AddrFrom4([4]byte(sa[4:8]))
		case unix.AF_INET6:
			if len(sa) < 24 {
				return fmt.Errorf("offender address of %d bytes", len(sa))
			}
			r.Offender = netip.AddrFrom16([16]byte(sa[8:24])).Unmap()
		}
		return nil
	}
	return fmt.Errorf("no extended error in %d bytes of control data", len(oob))
}

func addrPortOf(sa unix.Sockaddr) netip.AddrPort {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port))
	}
	return netip.AddrPort{}
}

func control(c syscall.Conn, fn func(fd int) error) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// SendAndClose sends payload to dst from a fresh UDP socket in doer's
// netns and closes it: the port is closed by the time an answer comes, so
// the kernel refuses the answer with port unreachable. It returns the
// port the datagram came from.
func SendAndClose(doer Doer, dst netip.AddrPort, payload []byte) (uint16, error) {
	dst = unmap(dst)
	var port uint16
	err := doer.Do(func() error {
		c, err := net.ListenUDP(udpNetwork(dst), nil)
		if err != nil {
			return err
		}
		defer c.Close()
		port = c.LocalAddr().(*net.UDPAddr).AddrPort().Port()
		_, err = c.WriteToUDPAddrPort(payload, dst)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("send to %s: %w", dst, err)
	}
	return port, nil
}

// Responder is a UDP server of one client that answers from a socket
// connected to it, as servers keeping a socket per peer do: that socket
// hears the ICMP errors about its answers (a closed port as ECONNREFUSED,
// a smaller path MTU as its IP_MTU).
type Responder struct {
	doer     Doer
	listener *net.UDPConn
	conn     *net.UDPConn
}

// Respond listens on port in doer's netns (network "udp4" or "udp6").
func Respond(doer Doer, network string, port uint16) (*Responder, error) {
	r := &Responder{doer: doer}
	err := doer.Do(func() error {
		lc := net.ListenConfig{Control: reuseAddr}
		pc, err := lc.ListenPacket(context.Background(), network, fmt.Sprintf(":%d", port))
		if err == nil {
			r.listener = pc.(*net.UDPConn)
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen on %s port %d: %w", network, port, err)
	}
	return r, nil
}

// Answer waits for the first datagram, connects a socket from the same
// port to its sender and sends payload back. It returns the sender.
func (r *Responder) Answer(payload []byte, timeout time.Duration) (netip.AddrPort, error) {
	if err := r.listener.SetDeadline(time.Now().Add(timeout)); err != nil {
		return netip.AddrPort{}, err
	}
	buf := make([]byte, maxReply)
	_, peer, err := r.listener.ReadFromUDPAddrPort(buf)
	if err != nil {
		return peer, fmt.Errorf("wait for a datagram: %w", err)
	}
	peer = unmap(peer)
	local := r.listener.LocalAddr().(*net.UDPAddr)
	err = r.doer.Do(func() error {
		d := net.Dialer{LocalAddr: local, Control: reuseAddr}
		c, err := d.Dial(r.listener.LocalAddr().Network(), peer.String())
		if err == nil {
			r.conn = c.(*net.UDPConn)
			_, err = r.conn.Write(payload)
		}
		return err
	})
	if err != nil {
		return peer, fmt.Errorf("answer %s from a connected socket: %w", peer, err)
	}
	return peer, nil
}

// Refused waits for what the connected socket hears next and returns it
// as an error: ECONNREFUSED once the peer's refusal came back.
func (r *Responder) Refused(timeout time.Duration) error {
	if err := r.conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	n, err := r.conn.Read(make([]byte, maxReply))
	if err == nil {
		return fmt.Errorf("a datagram of %d bytes came back, no error", n)
	}
	return err
}

// PathMTU is the connected socket's path MTU to its peer (IP_MTU,
// IPV6_MTU): lowered by fragmentation-needed or packet-too-big errors
// about its answers.
func (r *Responder) PathMTU() (int, error) {
	return pathMTU(r.conn, r.conn.RemoteAddr().(*net.UDPAddr).AddrPort().Addr().Unmap().Is6())
}

// pathMTU is a connected socket's path MTU to its peer.
func pathMTU(c syscall.Conn, v6 bool) (int, error) {
	level, opt := unix.IPPROTO_IP, unix.IP_MTU
	if v6 {
		level, opt = unix.IPPROTO_IPV6, unix.IPV6_MTU
	}
	mtu := 0
	err := control(c, func(fd int) error {
		var err error
		mtu, err = unix.GetsockoptInt(fd, level, opt)
		return err
	})
	return mtu, err
}

// reuseAddr lets the connected socket share the listener's port; the
// kernel prefers it for its peer's datagrams and errors.
func reuseAddr(_, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1) }); err != nil {
		return err
	}
	return serr
}

func (r *Responder) Close() error {
	err := r.listener.Close()
	if r.conn != nil {
		err = errors.Join(err, r.conn.Close())
	}
	return err
}

// UnlimitICMP lifts the kernel's per-destination ICMP error rate limits
// (net.ipv4.icmp_ratelimit, net.ipv6.icmp.ratelimit) in doer's netns, so
// a test's back-to-back errors to one address are all sent.
func UnlimitICMP(doer Doer) error {
	return doer.Do(func() error {
		for _, knob := range []string{"/proc/sys/net/ipv4/icmp_ratelimit", "/proc/sys/net/ipv6/icmp/ratelimit"} {
			if err := os.WriteFile(knob, []byte("0"), 0); err != nil {
				return fmt.Errorf("lift the ICMP rate limit: %w", err)
			}
		}
		return nil
	})
}

// SendICMP sends an ICMP or ICMPv6 message (from its type on) to dst from
// doer's netns over a raw socket, as a host or router on a path would. The
// kernel fills in an ICMPv6 checksum; an ICMP one is the caller's.
func SendICMP(doer Doer, dst netip.Addr, msg []byte) error {
	network, laddr := "ip4:icmp", "0.0.0.0"
	if dst.Is6() {
		network, laddr = "ip6:ipv6-icmp", "::"
	}
	err := doer.Do(func() error {
		c, err := net.ListenPacket(network, laddr)
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.WriteTo(msg, &net.IPAddr{IP: dst.AsSlice()})
		return err
	})
	if err != nil {
		return fmt.Errorf("send ICMP to %s: %w", dst, err)
	}
	return nil
}

// TimeExceeded says whether r reports a TTL / hop limit run out in transit.
func (r ICMPReport) TimeExceeded() bool {
	if r.About.Addr().Is4() {
		return r.Type == icmpTimeExceeded && r.Code == 0
	}
	return r.Type == icmp6TimeExceeded && r.Code == 0
}

const (
	icmpTimeExceeded  = 11
	icmp6TimeExceeded = 3
)

// Traceroute probes the path to dst as traceroute does: UDPProbe with TTL
// 1, 2, ... until an answer that is no time exceeded (a closed port's
// refusal at the destination), maxHops probes at most. It returns every
// probe's report, in hop order.
func Traceroute(doer Doer, dst netip.AddrPort, maxHops int, timeout time.Duration) ([]ICMPReport, error) {
	var hops []ICMPReport
	for ttl := 1; ttl <= maxHops; ttl++ {
		r, err := UDPProbe(doer, dst, ttl, []byte(fmt.Sprintf("probe ttl %d", ttl)), timeout)
		if err != nil {
			return hops, fmt.Errorf("hop %d: %w", ttl, err)
		}
		hops = append(hops, r)
		if !r.TimeExceeded() {
			return hops, nil
		}
	}
	return hops, fmt.Errorf("no answer from %s within %d hops", dst, maxHops)
}
