package traffic

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/netip"
	"time"
)

// Reply is what a client saw of one exchange.
type Reply struct {
	Identity string
	// Peer is the reply's source (UDP) or the connection's remote end (TCP).
	Peer  netip.AddrPort
	Local netip.AddrPort
	Echo  []byte
}

// maxReply leaves room for any identity alongside a full request.
const maxReply = 64 * 1024

// TCPExchange connects from doer's netns to dst, sends payload, and reads
// the reply until the server closes.
func TCPExchange(doer Doer, dst netip.AddrPort, payload []byte, timeout time.Duration) (Reply, error) {
	if err := checkPayload(payload); err != nil {
		return Reply{}, err
	}
	var r Reply
	err := doer.Do(func() error {
		tc, err := dialTCP(dst, timeout)
		if err != nil {
			return err
		}
		defer tc.Close()
		r.Peer = unmap(tc.RemoteAddr().(*net.TCPAddr).AddrPort())
		r.Local = unmap(tc.LocalAddr().(*net.TCPAddr).AddrPort())
		if _, err := tc.Write(payload); err != nil {
			return err
		}
		// Half-close so the server's read ends even for an empty payload.
		if err := tc.CloseWrite(); err != nil {
			return err
		}
		body, err := io.ReadAll(io.LimitReader(tc, maxReply))
		if err != nil {
			return err
		}
		return r.parse(body, payload)
	})
	if err != nil {
		return r, fmt.Errorf("tcp exchange with %s: %w", dst, err)
	}
	return r, nil
}

// dialTCP connects to dst, the connection's deadline timeout from now.
func dialTCP(dst netip.AddrPort, timeout time.Duration) (*net.TCPConn, error) {
	d := net.Dialer{Deadline: time.Now().Add(timeout)}
	c, err := d.Dial("tcp", dst.String())
	if err != nil {
		return nil, err
	}
	tc := c.(*net.TCPConn)
	if err := tc.SetDeadline(d.Deadline); err != nil {
		tc.Close()
		return nil, err
	}
	return tc, nil
}

// UDPExchange sends payload to dst from an unconnected socket in doer's
// netns and takes the first datagram back from any source, so Peer shows
// where the reply really came from (e.g. whether reverse NAT happened).
// Local is the socket's bound address: a wildcard address and the port.
func UDPExchange(doer Doer, dst netip.AddrPort, payload []byte, timeout time.Duration) (Reply, error) {
	if err := checkPayload(payload); err != nil {
		return Reply{}, err
	}
	dst = unmap(dst)
	var r Reply
	err := doer.Do(func() error {
		c, err := net.ListenUDP(udpNetwork(dst), nil)
		if err != nil {
			return err
		}
		defer c.Close()
		if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
			return err
		}
		r.Local = unmap(c.LocalAddr().(*net.UDPAddr).AddrPort())
		if _, err := c.WriteToUDPAddrPort(payload, dst); err != nil {
			return err
		}
		buf := make([]byte, maxReply)
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return err
		}
		r.Peer = unmap(from)
		return r.parse(buf[:n], payload)
	})
	if err != nil {
		return r, fmt.Errorf("udp exchange with %s: %w", dst, err)
	}
	return r, nil
}

// ConnectedUDPExchange is UDPExchange over a connected socket, the way most
// applications use UDP: the kernel drops replies from any source but dst,
// and Local is the source address the route lookup chose.
func ConnectedUDPExchange(doer Doer, dst netip.AddrPort, payload []byte, timeout time.Duration) (Reply, error) {
	if err := checkPayload(payload); err != nil {
		return Reply{}, err
	}
	dst = unmap(dst)
	var r Reply
	err := doer.Do(func() error {
		c, err := net.DialUDP(udpNetwork(dst), nil, net.UDPAddrFromAddrPort(dst))
		if err != nil {
			return err
		}
		defer c.Close()
		if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
			return err
		}
		r.Peer = unmap(c.RemoteAddr().(*net.UDPAddr).AddrPort())
		r.Local = unmap(c.LocalAddr().(*net.UDPAddr).AddrPort())
		if _, err := c.Write(payload); err != nil {
			return err
		}
		buf := make([]byte, maxReply)
		n, err := c.Read(buf)
		if err != nil {
			return err
		}
		return r.parse(buf[:n], payload)
	})
	if err != nil {
		return r, fmt.Errorf("connected udp exchange with %s: %w", dst, err)
	}
	return r, nil
}

func checkPayload(p []byte) error {
	if len(p) > MaxRequest {
		return fmt.Errorf("payload of %d bytes exceeds the server's %d", len(p), MaxRequest)
	}
	return nil
}

func udpNetwork(dst netip.AddrPort) string {
	if dst.Addr().Unmap().Is4() {
		return "udp4"
	}
	return "udp6"
}

// unmap normalises an address the way callers write them: plain IPv4, and
// no zone, since Go names zones from whichever netns it last looked in.
func unmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap().WithZone(""), ap.Port())
}

// parse fills Identity and Echo from body and checks the echo.
func (r *Reply) parse(body, sent []byte) error {
	id, echo, ok := bytes.Cut(body, []byte{'\n'})
	if !ok {
		return fmt.Errorf("reply %q has no identity line", body)
	}
	r.Identity, r.Echo = string(id), echo
	if !bytes.Equal(echo, sent) {
		return fmt.Errorf("%s echoed %q, sent %q", r.Identity, echo, sent)
	}
	return nil
}

// Tally counts replies per identity.
type Tally map[string]int

// Counts returns the tally of each identity in order, zero for those never
// seen, ready for stats.ChiSquareUniform.
func (t Tally) Counts(identities ...string) []int {
	out := make([]int, len(identities))
	for i, id := range identities {
		out[i] = t[id]
	}
	return out
}

// Run performs n exchanges one after another and tallies who answered. It
// stops at the first error, returning the tally so far.
func Run(n int, fn func(i int) (Reply, error)) (Tally, error) {
	t := Tally{}
	for i := range n {
		r, err := fn(i)
		if err != nil {
			return t, fmt.Errorf("exchange %d of %d: %w", i, n, err)
		}
		t[r.Identity]++
	}
	return t, nil
}
