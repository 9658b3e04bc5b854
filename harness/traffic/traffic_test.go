package traffic

import (
	"bytes"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// here runs in the test's own netns; these tests use only loopback.
type here struct{}

func (here) Do(fn func() error) error { return fn() }

const timeout = 5 * time.Second

func serve(t *testing.T, identity string) *Server {
	t.Helper()
	s, err := Serve(here{}, identity, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	return s
}

func TestExchanges(t *testing.T) {
	s := serve(t, "backend-a")
	exchanges := map[string]func(Doer, netip.AddrPort, []byte, time.Duration) (Reply, error){
		"tcp":           TCPExchange,
		"udp":           UDPExchange,
		"connected-udp": ConnectedUDPExchange,
	}
	for name, exchange := range exchanges {
		for _, ip := range []string{"127.0.0.1", "::1"} {
			t.Run(name+"/"+ip, func(t *testing.T) {
				dst := netip.AddrPortFrom(netip.MustParseAddr(ip), s.Port())
				for _, payload := range [][]byte{[]byte("hello " + name), {}, bytes.Repeat([]byte{'x'}, MaxRequest)} {
					r, err := exchange(here{}, dst, payload, timeout)
					if err != nil {
						t.Fatal(err)
					}
					if r.Identity != "backend-a" || r.Peer != dst || !bytes.Equal(r.Echo, payload) {
						t.Errorf("reply %+v, want identity backend-a from %s", r, dst)
					}
					if r.Local.Port() == 0 || r.Local.Addr().Is4() != dst.Addr().Is4() {
						t.Errorf("local %s for destination %s", r.Local, dst)
					}
				}
			})
		}
	}
	// A reply can reach its client before the server counts it: read the
	// counts once the server's goroutines are done.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if got := s.TCPServed(); got != 6 {
		t.Errorf("TCPServed = %d, want 6", got)
	}
	if got := s.UDPServed(); got != 12 {
		t.Errorf("UDPServed = %d, want 12", got)
	}
}

func TestPayloadTooLarge(t *testing.T) {
	dst := netip.MustParseAddrPort("127.0.0.1:9")
	if _, err := TCPExchange(here{}, dst, make([]byte, MaxRequest+1), timeout); err == nil {
		t.Error("oversized payload accepted")
	}
}

func TestIdentityWithNewline(t *testing.T) {
	if _, err := Serve(here{}, "a\nb", 0); err == nil {
		t.Error("identity with newline accepted")
	}
}

// impostor answers UDP from a different socket than the one asked, as a
// datapath missing reverse NAT would.
func impostor(t *testing.T, body string) netip.AddrPort {
	t.Helper()
	in, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	out, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.Close(); out.Close() })
	go func() {
		buf := make([]byte, MaxRequest)
		for {
			_, from, err := in.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			out.WriteToUDPAddrPort([]byte(body), from)
		}
	}()
	return in.LocalAddr().(*net.UDPAddr).AddrPort()
}

func TestUDPReplySourceObserved(t *testing.T) {
	dst := impostor(t, "imp\nping")
	r, err := UDPExchange(here{}, dst, []byte("ping"), timeout)
	if err != nil {
		t.Fatal(err)
	}
	if r.Peer == dst || r.Peer.Addr() != dst.Addr() {
		t.Errorf("peer %s: want the impostor's other port, not %s", r.Peer, dst)
	}
	// A connected socket never sees a reply from another port.
	if _, err := ConnectedUDPExchange(here{}, dst, []byte("ping"), 200*time.Millisecond); err == nil {
		t.Error("connected socket accepted a reply from another source")
	}
}

func TestEchoMismatch(t *testing.T) {
	for body, want := range map[string]string{"imp\npong": "echoed", "no-newline": "no identity line"} {
		dst := impostor(t, body)
		_, err := UDPExchange(here{}, dst, []byte("ping"), timeout)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("reply %q: error %v, want %q", body, err, want)
		}
	}
}

func TestCloseCutsIdleConnections(t *testing.T) {
	s, err := Serve(here{}, "idle", 0)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(s.Port()))))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Make sure the server has accepted before closing.
	time.Sleep(50 * time.Millisecond)
	start := time.Now()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("Close took %v with an idle client", d)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestRun(t *testing.T) {
	ids := []string{"a", "b", "a", "c"}
	tally, err := Run(len(ids), func(i int) (Reply, error) { return Reply{Identity: ids[i]}, nil })
	if err != nil {
		t.Fatal(err)
	}
	if got := tally.Counts("a", "b", "c", "d"); !slices.Equal(got, []int{2, 1, 1, 0}) {
		t.Errorf("counts %v", got)
	}
	tally, err = Run(5, func(i int) (Reply, error) {
		if i == 2 {
			return Reply{}, net.ErrClosed
		}
		return Reply{Identity: "a"}, nil
	})
	if err == nil || !strings.Contains(err.Error(), "exchange 2 of 5") || tally["a"] != 2 {
		t.Errorf("tally %v, err %v; want stop at exchange 2", tally, err)
	}
}
