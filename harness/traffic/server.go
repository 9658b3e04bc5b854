// Package traffic drives real sockets through a topology: an echo server
// that names itself, and clients that report who answered and from where.
package traffic

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Doer runs a function inside some network namespace; topology's Node and
// Pod implement it.
type Doer interface {
	Do(fn func() error) error
}

// MaxRequest is the most a server reads of one request.
const MaxRequest = 1024

// connTimeout bounds how long a server waits on a silent TCP client.
const connTimeout = 10 * time.Second

// Server answers every request with its identity, a newline, and the request.
type Server struct {
	identity string
	port     uint16
	tcp      net.Listener
	udp      *net.UDPConn

	tcpServed atomic.Uint64
	peers     sync.Map // netip.Addr of TCP clients
	udpServed atomic.Uint64

	mu        sync.Mutex
	conns     map[net.Conn]struct{}
	closed    bool
	wg        sync.WaitGroup
	closeOnce sync.Once
}

// Serve starts a server inside doer's netns on port for TCP and UDP over
// IPv4 and IPv6, using dual-stack wildcard sockets. UDP replies leave from
// the address and interface the datagram arrived on, as TCP's do. Port 0
// picks a port free for both protocols.
func Serve(doer Doer, identity string, port uint16) (*Server, error) {
	if strings.Contains(identity, "\n") {
		return nil, fmt.Errorf("identity %q contains a newline", identity)
	}
	s := &Server{identity: identity, conns: map[net.Conn]struct{}{}}
	err := doer.Do(func() error {
		var err error
		// With port 0 the kernel picks the TCP port; UDP may have it taken.
		for range 10 {
			if err = s.listen(port); err == nil || port != 0 {
				return err
			}
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	s.wg.Add(2)
	go s.acceptLoop()
	go s.udpLoop()
	return s, nil
}

func (s *Server) listen(port uint16) error {
	tcp, err := net.Listen("tcp", net.JoinHostPort("::", strconv.Itoa(int(port))))
	if err != nil {
		return fmt.Errorf("listen tcp: %w", err)
	}
	bound := uint16(tcp.Addr().(*net.TCPAddr).Port)
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv6unspecified, Port: int(bound)})
	if err != nil {
		tcp.Close()
		return fmt.Errorf("listen udp: %w", err)
	}
	if err := setRecvPktInfo(udp); err != nil {
		tcp.Close()
		udp.Close()
		return err
	}
	s.tcp, s.udp, s.port = tcp, udp, bound
	return nil
}

// setRecvPktInfo asks for each datagram's destination, so the reply leaves
// from the address the client sent to rather than the kernel's choice of
// source for the client (a link-local one, for a client using one).
func setRecvPktInfo(c *net.UDPConn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO, 1)
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("set IPV6_RECVPKTINFO: %w", serr)
	}
	return nil
}

// Port is the port the server listens on for both protocols.
func (s *Server) Port() uint16 { return s.port }

// TCPServed counts TCP requests answered; exact once Close returns, since a
// reply can reach its client before it is counted.
func (s *Server) TCPServed() uint64 { return s.tcpServed.Load() }

// UDPServed counts UDP datagrams answered; exact once Close returns.
func (s *Server) UDPServed() uint64 { return s.udpServed.Load() }

func (s *Server) acceptLoop() {
	defer s.wg.Done()
	for {
		c, err := s.tcp.Accept()
		if err != nil {
			return
		}
		if !s.track(c) {
			c.Close()
			return
		}
		s.wg.Add(1)
		go s.handle(c)
	}
}

// track registers c so Close can cut it short; false once closed.
func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) handle(c net.Conn) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		c.Close()
	}()
	if err := c.SetDeadline(time.Now().Add(connTimeout)); err != nil {
		return
	}
	buf := make([]byte, MaxRequest)
	n, err := c.Read(buf)
	// A client that half-closes without sending gets an empty echo.
	if err != nil && !errors.Is(err, io.EOF) {
		return
	}
	if _, err := c.Write(s.reply(buf[:n])); err == nil {
		s.tcpServed.Add(1)
	}
	if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil {
		s.peers.Store(ap.Addr().Unmap().WithZone(""), true)
	}
}

// SawPeer reports whether a TCP connection came from a: what a
// source-preserving path must show.
func (s *Server) SawPeer(a netip.Addr) bool {
	_, ok := s.peers.Load(a)
	return ok
}

func (s *Server) udpLoop() {
	defer s.wg.Done()
	buf := make([]byte, MaxRequest)
	oob := make([]byte, unix.CmsgSpace(unix.SizeofInet6Pktinfo))
	for {
		n, oobn, _, from, err := s.udp.ReadMsgUDPAddrPort(buf, oob)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// ICMP errors from earlier replies surface here; keep serving.
			continue
		}
		var replyOOB []byte
		if info, ok := pktInfo(oob[:oobn]); ok {
			replyOOB = unix.PktInfo6(&info)
		}
		// The pktinfo ifindex scopes link-local peers; Go resolved the zone
		// by name in the wrong netns, so drop it.
		to := netip.AddrPortFrom(from.Addr().WithZone(""), from.Port())
		if _, _, err := s.udp.WriteMsgUDPAddrPort(s.reply(buf[:n]), replyOOB, to); err == nil {
			s.udpServed.Add(1)
		}
	}
}

// pktInfo returns the destination address and interface of a datagram,
// IPv4 ones as mapped addresses; Linux accepts that form back on send.
func pktInfo(oob []byte) (unix.Inet6Pktinfo, bool) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return unix.Inet6Pktinfo{}, false
	}
	for _, m := range msgs {
		if m.Header.Level == unix.IPPROTO_IPV6 && m.Header.Type == unix.IPV6_PKTINFO && len(m.Data) >= unix.SizeofInet6Pktinfo {
			var info unix.Inet6Pktinfo
			copy(info.Addr[:], m.Data[:16])
			info.Ifindex = binary.NativeEndian.Uint32(m.Data[16:20])
			return info, true
		}
	}
	return unix.Inet6Pktinfo{}, false
}

func (s *Server) reply(req []byte) []byte {
	out := make([]byte, 0, len(s.identity)+1+len(req))
	out = append(out, s.identity...)
	out = append(out, '\n')
	return append(out, req...)
}

// Close stops the server, cutting open connections, and waits for its
// goroutines. It is safe to call more than once.
func (s *Server) Close() error {
	var err error
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		for c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		err = errors.Join(s.tcp.Close(), s.udp.Close())
		s.wg.Wait()
	})
	return err
}
