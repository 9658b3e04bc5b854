package nodeport

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/ct"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/cluster"
	"github.com/servicepath/servicepath/harness/packet"
	"github.com/servicepath/servicepath/harness/traffic"
)

// snatPorts is the e2e bed's SNAT range: small enough for a client to
// outnumber it.
const snatPorts = 4

// remoteOnly gives node 0 a NodePort (TCP unless fe says) whose one
// backend is node 1's, so every flow through node 0 is SNATed; it goes
// when the test ends.
func remoteOnly(t *testing.T, ns *cluster.NorthSouth, fe service.Frontend) {
	s := service.Service{Name: "default/snat", Frontend: fe, Backends: []service.Backend{ns.Backend("backend-1", fe.Addr)}}
	if s.Frontend.Protocol == 0 {
		s.Frontend.Protocol = service.TCP
	}
	require.NoError(t, ns.Nodes[0].Services.Upsert(s), "program %s on node 0", s.Frontend)
	t.Cleanup(func() { assert.NoError(t, ns.Nodes[0].Services.Delete(s.Frontend), "remove %s", s.Frontend) })
}

func TestSNATFlowsEndToEnd(t *testing.T) {
	ns := cluster.NewNorthSouth(t, natPorts(61000, 61000+snatPorts-1))
	port := uint16(NodePort)
	for _, f := range e2eFamilies(ns) {
		port++
		fe := service.Frontend{Addr: f.unspecified, Port: port, Kind: service.NodePort}
		dst := netip.AddrPortFrom(f.nodes[0], port)

		// Each connection closes with FINs both ways before the next opens:
		// its port is free again at its last ACK, so three times as many
		// connections as ports all get through.
		t.Run(f.name+"/closed-flows-free-their-ports", func(t *testing.T) {
			remoteOnly(t, ns, fe)
			before := ns.Counters(t, 0)
			for i := range 3 * snatPorts {
				r, err := traffic.TCPExchange(ns.Topo.External, dst, []byte(fmt.Sprintf("burst %d", i)), timeout)
				require.NoError(t, err, "connection %d of %d through %d SNAT ports", i+1, 3*snatPorts, snatPorts)
				assert.Equal(t, "backend-1", r.Identity)
			}
			assert.Zero(t, grew(before, ns.Counters(t, 0), "nat_exhausted"), "no connection found the ports taken")
			// The last flow's final ACK may still be on its way when the
			// client's close returns (a VM under emulation showed 11 of 12).
			var released uint64
			assert.Eventually(t, func() bool {
				released = grew(before, ns.Counters(t, 0), "nat_released")
				return released >= 3*snatPorts
			}, timeout, 20*time.Millisecond, "every closed flow gave its port back")
			t.Logf("%d ports released", released)
		})

		// A forged RST far from the client's sequence numbers, into a live
		// connection: node 0 keeps the flow and its port, the backend ignores
		// it (RFC 5961), and the connection carries on.
		t.Run(f.name+"/out-of-window-rst-keeps-a-live-connection", func(t *testing.T) {
			remoteOnly(t, ns, fe)
			before := ns.Counters(t, 0)
			err := ns.Topo.External.Do(func() error {
				c, err := net.DialTimeout("tcp", dst.String(), timeout)
				if err != nil {
					return err
				}
				defer c.Close()
				tc := c.(*net.TCPConn)
				local := unmap(tc.LocalAddr().(*net.TCPAddr).AddrPort())
				seq, err := clientSeq(ns, local)
				if err != nil {
					return err
				}
				rst := packet.L3(layers.IPProtocolTCP, local, dst, packet.RSTACK, nil, packet.Opts{Seq: seq + 1<<31})
				if err := traffic.SendIP(ns.Topo.External, dst.Addr(), rst); err != nil {
					return err
				}
				// Time for the RST to reach the backend and a reset to come back,
				// were the flow closed.
				time.Sleep(200 * time.Millisecond)
				if err := tc.SetDeadline(time.Now().Add(timeout)); err != nil {
					return err
				}
				if _, err := tc.Write([]byte("after the rst")); err != nil {
					return err
				}
				if err := tc.CloseWrite(); err != nil {
					return err
				}
				body, err := io.ReadAll(tc)
				if err != nil {
					return fmt.Errorf("the connection died: %w", err)
				}
				if len(body) == 0 {
					return fmt.Errorf("no answer after the RST")
				}
				return nil
			})
			require.NoError(t, err, "a live connection through node 0's SNAT, after a forged RST")
			after := ns.Counters(t, 0)
			assert.Positive(t, grew(before, after, "ct_rst_out_of_window"), "node 0 saw the RST out of window")
		})
	}
}

// The GC's view of real traffic: SNAT exhaustion puts node 0's
// north-south GC under pressure, and node 1's DSR flows, learned without
// a service entry, are no orphans.
func TestGCSignalsEndToEnd(t *testing.T) {
	ns := cluster.NewNorthSouth(t, natPorts(61000, 61000+snatPorts-1))
	f := e2eFamilies(ns)[0]
	fe := service.Frontend{Addr: f.unspecified, Port: NodePort, Kind: service.NodePort}
	dst := netip.AddrPortFrom(f.nodes[0], NodePort)

	t.Run("snat-exhaustion-is-pressure", func(t *testing.T) {
		remoteOnly(t, ns, fe)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var passes []ct.LoopPass
		l := &ct.Loop{Maps: ns.Nodes[0].DP.Maps, Base: 500 * time.Millisecond, Min: 10 * time.Millisecond, Report: func(p ct.LoopPass) {
			if !p.NorthSouth {
				return
			}
			passes = append(passes, p)
			if len(passes) > 1 {
				cancel()
				return
			}
			// More clients at once than ports: the last are dropped.
			var open []net.Conn
			for range snatPorts + 2 {
				_ = ns.Topo.External.Do(func() error {
					c, err := net.DialTimeout("tcp", dst.String(), 300*time.Millisecond)
					if err == nil {
						open = append(open, c)
					}
					return err
				})
			}
			for _, c := range open {
				c.Close()
			}
		}}
		done := make(chan error, 1)
		go func() { done <- l.Run(ctx) }()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(10 * time.Second):
			cancel()
			require.NoError(t, <-done)
		}
		require.Len(t, passes, 2, "two passes")
		assert.Empty(t, passes[0].Decision.Pressure, "calm before")
		assert.Contains(t, passes[1].Decision.Pressure, "no free SNAT port", "the exhaustion is pressure")
		assert.Equal(t, 125*time.Millisecond, passes[1].Decision.Interval, "the next pass comes sooner")
	})

	t.Run("learned-dsr-flows-are-no-orphans", func(t *testing.T) {
		fe := fe
		fe.Port++
		program(t, ns, fe, func(s *service.Service) { s.Mode, s.Dispatch = service.DSR, service.Option })
		before := ns.Counters(t, 1)
		exchange(t, ns, netip.AddrPortFrom(f.nodes[0], fe.Port), 16)
		require.Positive(t, grew(before, ns.Counters(t, 1), "dsr_learned"), "node 1 learned DSR flows")
		now, err := ct.Now()
		require.NoError(t, err)
		res, err := ct.NewCollector(ns.Nodes[1].DP.Maps.NorthSouthCT()).Pass(now, 0)
		require.NoError(t, err)
		require.Positive(t, res.Scanned, "node 1 tracks the learned flows")
		assert.Zero(t, res.Orphans, "node 1's GC sees no orphan among %d entries", res.Scanned)
	})
}

// A flow whose reply mapping was evicted, and whose port another client
// then took, must not send from that port: the backend's answers to it
// would reach the other client.
func TestSNATEvictedReplyHalfIsNotShared(t *testing.T) {
	ns := cluster.NewNorthSouth(t, natPorts(61000, 61001))
	for _, f := range e2eFamilies(ns) {
		t.Run(f.name, func(t *testing.T) {
			fe := service.Frontend{Addr: f.unspecified, Port: NodePort, Kind: service.NodePort, Protocol: service.UDP}
			remoteOnly(t, ns, fe)
			dst := netip.AddrPortFrom(f.nodes[0], NodePort)
			// Clients bound in the SNAT range keep their port: a gets 61000,
			// c holds 61001.
			a, c := udpFrom(t, ns, f.client, 61000, dst), udpFrom(t, ns, f.client, 61001, dst)
			require.Contains(t, string(ask(t, a, "a1")), "a1", "a's first answer")
			require.Contains(t, string(ask(t, c, "c1")), "c1", "c's first answer")
			evictReplyHalfOf(t, ns, netip.AddrPortFrom(f.client, 61000))
			// b's port is outside the range: it gets the only free one, 61000.
			b := udpFrom(t, ns, f.client, 0, dst)
			require.Contains(t, string(ask(t, b, "b1")), "b1", "b's first answer")

			before := ns.Counters(t, 0)
			_, err := a.Write([]byte("a2"))
			require.NoError(t, err)
			require.NoError(t, b.SetReadDeadline(time.Now().Add(500*time.Millisecond)))
			buf := make([]byte, 1500)
			n, err := b.Read(buf)
			assert.Error(t, err, "b hears nothing of a's flow (got %q)", buf[:n])
			assert.Positive(t, grew(before, ns.Counters(t, 0), "nat_exhausted"), "a found no port of its own")
		})
	}
}

// udpFrom is a UDP socket of the external client, from port (0: any),
// connected to dst; closed when the test ends.
func udpFrom(t *testing.T, ns *cluster.NorthSouth, addr netip.Addr, port uint16, dst netip.AddrPort) *net.UDPConn {
	var c *net.UDPConn
	err := ns.Topo.External.Do(func() error {
		var err error
		c, err = net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr, port)), net.UDPAddrFromAddrPort(dst))
		return err
	})
	require.NoError(t, err, "UDP socket from %s port %d", addr, port)
	t.Cleanup(func() { c.Close() })
	return c
}

func ask(t *testing.T, c *net.UDPConn, msg string) []byte {
	_, err := c.Write([]byte(msg))
	require.NoError(t, err, "send %q", msg)
	require.NoError(t, c.SetReadDeadline(time.Now().Add(timeout)))
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	require.NoError(t, err, "answer to %q", msg)
	return buf[:n]
}

// evictReplyHalfOf deletes the reply half of client's mapping on node 0,
// as the NAT map's LRU may.
func evictReplyHalfOf(t *testing.T, ns *cluster.NorthSouth, client netip.AddrPort) {
	nat := ns.Nodes[0].DP.Maps.NAT
	addr, _ := maps.AddrFrom(client.Addr())
	var k maps.CTKey
	var v maps.NATEntry
	it := nat.Iterate()
	for it.Next(&k, &v) {
		if k.Flags == maps.NATFlagOut && k.SAddr == addr && k.SPort == maps.NewBE16(client.Port()) {
			in := maps.CTKey{SAddr: k.DAddr, DAddr: v.Addr, SPort: k.DPort, DPort: v.Port, Proto: k.Proto, Family: k.Family, Flags: maps.NATFlagIn}
			require.NoError(t, nat.Delete(&in), "evict %s's reply half", client)
			return
		}
	}
	require.NoError(t, it.Err())
	t.Fatalf("no mapping of %s on node 0", client)
}

// clientSeq is the next sequence number node 0 saw the client at local
// send, from its flow entry.
func clientSeq(ns *cluster.NorthSouth, local netip.AddrPort) (uint32, error) {
	addr, _ := maps.AddrFrom(local.Addr())
	var k maps.CTKey
	var v maps.CTEntry
	it := ns.Nodes[0].DP.Maps.NorthSouthCT().Iterate()
	for it.Next(&k, &v) {
		if k.Flags == 0 && k.SAddr == addr && k.SPort == maps.NewBE16(local.Port()) && v.State&maps.CTFwdSeq != 0 {
			return v.FwdSeq, nil
		}
	}
	if err := it.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("no flow entry of %s on node 0", local)
}

func unmap(ap netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()) }
