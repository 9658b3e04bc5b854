package collision

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/harness/topology"
	"github.com/servicepath/servicepath/harness/traffic"
)

// IdentityPort is where the scenario's own servers listen in each backend.
const IdentityPort = 9090

// IdentityServer answers each connection with "identity peer\n", then
// either closes at once (the server closes first) or waits for the
// client to close (the client closes first).
type IdentityServer struct {
	ln       net.Listener
	identity string
	// WaitForClient makes the server wait for the client's close.
	WaitForClient bool
}

// ServeIdentity listens on IdentityPort in doer's netns.
func ServeIdentity(doer traffic.Doer, identity string, waitForClient bool) (*IdentityServer, error) {
	return serveOn(doer, identity, IdentityPort, waitForClient)
}

func serveOn(doer traffic.Doer, identity string, port int, waitForClient bool) (*IdentityServer, error) {
	s := &IdentityServer{identity: identity, WaitForClient: waitForClient}
	err := doer.Do(func() error {
		ln, err := net.Listen("tcp", fmt.Sprintf("[::]:%d", port))
		s.ln = ln
		return err
	})
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			c, err := s.ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(5 * time.Second))
				peer := c.RemoteAddr().(*net.TCPAddr).AddrPort()
				fmt.Fprintf(c, "%s %s\n", s.identity, netip.AddrPortFrom(peer.Addr().Unmap(), peer.Port()))
				if s.WaitForClient {
					buf := make([]byte, 64)
					for {
						if _, err := c.Read(buf); err != nil {
							return
						}
					}
				}
			}()
		}
	}()
	return s, nil
}

// Close stops the server.
func (s *IdentityServer) Close() error { return s.ln.Close() }

// Outcome is one connection's fate.
type Outcome struct {
	Identity string
	// Peer is the client as the backend saw it (after any SNAT).
	Peer netip.AddrPort
	Err  string // "", "reset", "refused", "timeout", or the error
}

// CloseHow is how the client ends a connection.
type CloseHow int

const (
	// AfterServer reads to the server's FIN, then closes.
	AfterServer CloseHow = iota
	// First closes after the line, before the server: client TIME_WAIT.
	First
	// Reset closes with SO_LINGER 0: an RST.
	Reset
)

// Connect dials dst from local (a fixed address and port, SO_REUSEADDR)
// inside doer's netns, reads the server's line and closes as told.
func Connect(doer traffic.Doer, local, dst netip.AddrPort, how CloseHow, timeout time.Duration) Outcome {
	var o Outcome
	err := doer.Do(func() error {
		d := net.Dialer{
			Timeout:   timeout,
			LocalAddr: net.TCPAddrFromAddrPort(local),
			Control: func(_, _ string, c syscall.RawConn) error {
				var serr error
				err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1) })
				if err != nil {
					return err
				}
				return serr
			},
		}
		c, err := d.Dial("tcp4", dst.String())
		if err != nil {
			return err
		}
		tc := c.(*net.TCPConn)
		defer func() {
			if how == Reset {
				tc.SetLinger(0)
			}
			tc.Close()
		}()
		tc.SetDeadline(time.Now().Add(timeout))
		line, err := bufio.NewReader(tc).ReadString('\n')
		if err != nil {
			return err
		}
		id, peer, ok := strings.Cut(strings.TrimSpace(line), " ")
		if !ok {
			return fmt.Errorf("bad line %q", line)
		}
		o.Identity = id
		o.Peer, err = netip.ParseAddrPort(peer)
		if err != nil {
			return err
		}
		if how == AfterServer {
			buf := make([]byte, 16)
			for {
				if _, err := tc.Read(buf); err != nil {
					break
				}
			}
		}
		return nil
	})
	if err != nil {
		o.Err = classify(err)
	}
	return o
}

func classify(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNRESET):
		return "reset"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	}
	return err.Error()
}

// Masquerade gives pod two more source addresses (on lo) and SNATs them
// to the pod's address in the pod's own netns, so two "pods" share one
// address on the wire, as behind a node's masquerade. Undone by the
// returned function (the netns goes with the test anyway).
func Masquerade(pod *topology.Pod, sources []netip.Addr) (func(), error) {
	run := func(args ...string) error {
		cmd := exec.Command("ip", append([]string{"netns", "exec", pod.NetnsName}, args...)...)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	for _, s := range sources {
		if err := run("ip", "addr", "add", s.String()+"/32", "dev", "lo"); err != nil {
			return nil, err
		}
	}
	rule := []string{"-t", "nat", "-A", "POSTROUTING", "-s", "198.18.200.0/24", "-j", "SNAT", "--to-source", pod.IPv4.String()}
	if err := run(append([]string{"iptables"}, rule...)...); err != nil {
		return nil, err
	}
	return func() {
		rule[2] = "-D"
		run(append([]string{"iptables"}, rule...)...)
	}, nil
}

// SetTWReuse sets net.ipv4.tcp_tw_reuse in doer's netns.
func SetTWReuse(doer traffic.Doer, v int) error {
	return doer.Do(func() error {
		return os.WriteFile("/proc/sys/net/ipv4/tcp_tw_reuse", []byte(fmt.Sprint(v)), 0o644)
	})
}
