package traffic

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Sink is a TCP server that reads each connection to its end and answers
// with how many bytes it read: the far end of a bulk transfer.
type Sink struct {
	listener net.Listener
	wg       sync.WaitGroup
}

// ServeSink listens on port in doer's netns, IPv4 and IPv6.
func ServeSink(doer Doer, port uint16) (*Sink, error) {
	s := &Sink{}
	err := doer.Do(func() error {
		l, err := net.Listen("tcp", fmt.Sprintf(":%d", port))
		s.listener = l
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("sink on port %d: %w", port, err)
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := s.listener.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				if err := c.SetDeadline(time.Now().Add(connTimeout)); err != nil {
					return
				}
				n, err := io.Copy(io.Discard, c)
				if err == nil {
					_, _ = fmt.Fprintf(c, "%d", n)
				}
			}()
		}
	}()
	return s, nil
}

// Close stops the sink and waits for its connections, which end by their
// deadline at the latest.
func (s *Sink) Close() error {
	err := s.listener.Close()
	s.wg.Wait()
	return err
}

// Bulk is what a bulk transfer's sender saw.
type Bulk struct {
	Received int64 // what the sink said it read
	PathMTU  int   // the connection's path MTU when done (IP_MTU, IPV6_MTU)
}

// TCPBulk sends n bytes from doer's netns to a Sink at dst in full-size
// segments, half-closes, and reads what the sink counted.
func TCPBulk(doer Doer, dst netip.AddrPort, n int, timeout time.Duration) (Bulk, error) {
	dst = unmap(dst)
	var b Bulk
	err := doer.Do(func() error {
		tc, err := dialTCP(dst, timeout)
		if err != nil {
			return err
		}
		defer tc.Close()
		if _, err := tc.Write(make([]byte, n)); err != nil {
			return fmt.Errorf("send %d bytes: %w", n, err)
		}
		if err := tc.CloseWrite(); err != nil {
			return err
		}
		body, err := io.ReadAll(io.LimitReader(tc, 64))
		if err != nil {
			return fmt.Errorf("read the count: %w", err)
		}
		if b.Received, err = strconv.ParseInt(strings.TrimSpace(string(body)), 10, 64); err != nil {
			return fmt.Errorf("the sink's count %q: %w", body, err)
		}
		b.PathMTU, err = pathMTU(tc, dst.Addr().Is6())
		return err
	})
	if err != nil {
		return b, fmt.Errorf("bulk transfer to %s: %w", dst, err)
	}
	return b, nil
}
