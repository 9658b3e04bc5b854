package nodeport

import (
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/cluster"
	"github.com/servicepath/servicepath/harness/packet"
	"github.com/servicepath/servicepath/harness/traffic"
)

// Ports of the ICMP end-to-end backends: nothing listens on closedPort;
// a traffic.Responder on answerPort.
const (
	closedPort = 9
	answerPort = 9097
)

// ICMP errors about flows that are only DNATed (a local backend, ETP
// Local, DSR), with real sockets: the client hears a backend's refusal
// from the service; a backend hears the client's, and a smaller path MTU
// toward the client, about its own answers.
func TestNorthSouthICMPErrors(t *testing.T) {
	exerciseICMPErrors(t, cluster.NewNorthSouth(t, nil), NodePort+100)
}

// exerciseICMPErrors runs the ICMP stories on ns with NodePorts from
// after port on.
func exerciseICMPErrors(t *testing.T, ns *cluster.NorthSouth, port uint16) {
	// The client refuses answers to node 0's address faster than the
	// kernel's one error a second would let it.
	require.NoError(t, traffic.UnlimitICMP(ns.Topo.External), "the client's netns")
	for _, f := range e2eFamilies(ns) {
		network := map[bool]string{true: "udp4", false: "udp6"}[f.client.Is4()]
		// A backend: a pod, or node 0's own netns (a hostNetwork pod).
		type backend struct {
			name  string
			netns traffic.Doer
			addr  netip.Addr
		}
		pod := func(name string) backend {
			return backend{name, ns.Topo.Pod(name), ns.Backend(name, f.client).Addr}
		}
		// serve gives a fresh UDP NodePort, on every node, the one backend
		// b at port backendPort, then edit. It returns node 0's address of
		// it.
		serve := func(t *testing.T, b backend, backendPort uint16, edit func(*service.Service)) netip.AddrPort {
			port++
			return programOne(t, ns, f, port, service.UDP, service.Backend{Addr: b.addr, Port: backendPort}, edit)
		}
		cases := []struct {
			name    string
			backend backend
			edit    func(*service.Service)
		}{
			{"local-backend", pod("backend-0"), nil},
			{"host-network-backend", backend{"node-0", ns.Nodes[0], f.nodes[0]}, nil},
			{"etp-local", pod("backend-0"), func(s *service.Service) { s.ExternalLocal = true }},
			{"dsr-option", pod("backend-1"), dsr(service.Option)},
			{"dsr-ipip", pod("backend-1"), dsr(service.IPIP)},
		}
		for _, c := range cases {
			t.Run(f.name+"/"+c.name+"/client-hears-the-refusal-from-the-service", func(t *testing.T) {
				dst := serve(t, c.backend, closedPort, c.edit)
				r, err := traffic.UDPErrorReport(ns.Topo.External, dst, []byte("anyone?"), timeout)
				require.NoError(t, err, "an ICMP error about the datagram to %s", dst)
				assert.Equal(t, syscall.ECONNREFUSED, r.Errno, "port unreachable")
				assert.Equal(t, dst.Addr(), r.Offender, "the refusal came from the service address")
				assert.Equal(t, dst, r.About, "about the datagram to the service")
			})

			t.Run(f.name+"/"+c.name+"/backend-hears-the-client-refusal", func(t *testing.T) {
				dst := serve(t, c.backend, answerPort, c.edit)
				resp, err := traffic.Respond(c.backend.netns, network, answerPort)
				require.NoError(t, err, "serve in %s", c.backend.name)
				t.Cleanup(func() { resp.Close() })
				before := ns.Counters(t, 0)
				_, err = traffic.SendAndClose(ns.Topo.External, dst, []byte("bye"))
				require.NoError(t, err, "send to %s", dst)
				peer, err := resp.Answer([]byte("too late"), timeout)
				require.NoError(t, err, "%s answers", c.backend.name)
				assert.Equal(t, f.client, peer.Addr(), "the backend saw the client's own address")
				assert.ErrorIs(t, resp.Refused(timeout), syscall.ECONNREFUSED, "the backend's connected socket heard the client's port unreachable")
				assert.Positive(t, grew(before, ns.Counters(t, 0), "icmp_to_backend"), "node 0 sent the error on to the backend")
			})
		}

		// The backend's node answers the client from node 0's NodePort, so
		// the error about a too-big answer goes to node 0, which sends it on.
		t.Run(f.name+"/dsr-path-mtu-reaches-the-backend", func(t *testing.T) {
			dst := serve(t, pod("backend-1"), answerPort, dsr(service.Option))
			resp, err := traffic.Respond(ns.Topo.Pod("backend-1"), network, answerPort)
			require.NoError(t, err, "serve in backend-1")
			t.Cleanup(func() { resp.Close() })
			var client *net.UDPConn
			require.NoError(t, ns.Topo.External.Do(func() (err error) {
				client, err = net.ListenUDP(network, nil)
				return err
			}), "client socket")
			t.Cleanup(func() { client.Close() })
			_, err = client.WriteToUDPAddrPort([]byte("hello"), dst)
			require.NoError(t, err, "send to %s", dst)
			answer := []byte("an answer the path is too small for")
			_, err = resp.Answer(answer, timeout)
			require.NoError(t, err, "backend-1 answers")
			before, err := resp.PathMTU()
			require.NoError(t, err, "backend-1's path MTU")
			// Below what it is, which an earlier run may have lowered already.
			lower := uint16(before - 20)
			require.GreaterOrEqual(t, lower, uint16(1280), "room below the path MTU %d", before)

			// What a router toward the client would send about the answer.
			self := netip.AddrPortFrom(f.client, client.LocalAddr().(*net.UDPAddr).AddrPort().Port())
			quote := packet.L3(layers.IPProtocolUDP, dst, self, packet.TCPFlags{}, answer, packet.Opts{})
			frame := packet.ICMPError(packet.FragNeeded, f.client, dst.Addr(), quote, packet.Opts{MTU: lower})
			require.NoError(t, traffic.SendICMP(ns.Topo.External, dst.Addr(), icmpMessage(frame)), "frag needed to %s", dst.Addr())
			assert.Eventually(t, func() bool {
				mtu, err := resp.PathMTU()
				return err == nil && mtu == int(lower)
			}, timeout, 50*time.Millisecond, "backend-1's path MTU to the client fell from %d to the error's %d", before, lower)
		})
	}
}

// icmpMessage is an ICMP error frame from its ICMP header on.
func icmpMessage(frame []byte) []byte {
	l3 := frame[14:]
	if l3[0]>>4 == 4 {
		return l3[int(l3[0]&0x0f)*4:]
	}
	return l3[40:]
}
