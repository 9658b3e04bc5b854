package netperf

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Mode is what a Server does with each connection.
type Mode int

const (
	// CRR reads one request, writes a response of the same size, and
	// closes first, so TIME_WAIT stays on the server side and the client
	// never runs out of ports.
	CRR Mode = iota
	// RR echoes fixed-size requests until the client closes.
	RR
	// Sink receives a stream until the client closes, with
	// TCP_ZEROCOPY_RECEIVE where possible, and reports a SinkResult.
	Sink
)

// Server serves one connection at a time on a pinned thread.
type Server struct {
	mode  Mode
	size  int
	lfd   int
	port  uint16
	done  chan error
	sinks chan SinkResult
	once  sync.Once
	err   error
}

// Listen starts a server in doer's netns on port (0: any) for mode, with
// requests of size bytes (CRR, RR), its thread pinned to cpu.
func Listen(doer Doer, port uint16, cpu int, mode Mode, size int) (*Server, error) {
	if (mode == CRR || mode == RR) && size <= 0 {
		return nil, fmt.Errorf("request size %d", size)
	}
	s := &Server{mode: mode, size: size, done: make(chan error, 1), sinks: make(chan SinkResult, 16)}
	ready := make(chan error, 1)
	go func() {
		s.done <- Pinned(doer, cpu, func() error {
			if err := s.listen(port); err != nil {
				ready <- err
				return nil
			}
			ready <- nil
			return s.serve()
		})
	}()
	if err := <-ready; err != nil {
		return nil, err
	}
	return s, nil
}

func (s *Server) listen(port uint16) error {
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		unix.Close(fd)
		return err
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err != nil {
		unix.Close(fd)
		return err
	}
	if err := unix.Bind(fd, &unix.SockaddrInet6{Port: int(port)}); err != nil {
		unix.Close(fd)
		return fmt.Errorf("bind port %d: %w", port, err)
	}
	if err := unix.Listen(fd, 1024); err != nil {
		unix.Close(fd)
		return fmt.Errorf("listen: %w", err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		unix.Close(fd)
		return err
	}
	s.lfd, s.port = fd, uint16(sa.(*unix.SockaddrInet6).Port)
	return nil
}

// Port is the port the server listens on.
func (s *Server) Port() uint16 { return s.port }

// serve accepts until Close shuts the listener down. A failed connection
// is counted, not fatal: the client sees its own error.
func (s *Server) serve() error {
	defer unix.Close(s.lfd)
	buf := make([]byte, max(s.size, 1))
	for {
		cfd, _, err := unix.Accept4(s.lfd, unix.SOCK_CLOEXEC)
		if err == unix.EINTR || err == unix.ECONNABORTED {
			continue
		}
		if err != nil {
			// shutdown() of the listener wakes accept with EINVAL.
			if errors.Is(err, unix.EINVAL) {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		if err := setTimeouts(cfd, ioTimeout); err != nil {
			unix.Close(cfd)
			continue
		}
		switch s.mode {
		case CRR:
			if readFull(cfd, buf) == nil {
				_ = writeAll(cfd, buf)
			}
		case RR:
			for readFull(cfd, buf) == nil {
				if writeAll(cfd, buf) != nil {
					break
				}
			}
		case Sink:
			r := sink(cfd)
			select {
			case s.sinks <- r:
			default:
			}
		}
		unix.Close(cfd)
	}
}

// Close stops the server and waits for its thread.
func (s *Server) Close() error {
	s.once.Do(func() {
		if err := unix.Shutdown(s.lfd, unix.SHUT_RDWR); err != nil {
			s.err = fmt.Errorf("shutdown listener: %w", err)
			return
		}
		select {
		case s.err = <-s.done:
		case <-time.After(2 * ioTimeout):
			s.err = errors.New("server thread did not stop")
		}
	})
	return s.err
}

// Addr is the server's address as seen from a client, given the host.
func (s *Server) Addr(host netip.Addr) netip.AddrPort { return netip.AddrPortFrom(host, s.port) }
