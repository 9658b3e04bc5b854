package clusterip

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/cluster"
	"github.com/servicepath/servicepath/harness/packet"
	"github.com/servicepath/servicepath/harness/topology"
)

// A datagram too large for one packet, sent from the client pod straight
// to a backend pod: fragmented by the kernel, and fragmented by hand with
// its fragments sent last first, so the datapath sees later fragments
// before their first. Both are delivered whole; a VIP's later fragments
// without their first are dropped.
func TestLargeNonServiceDatagramsDelivered(t *testing.T) {
	c := cluster.New(t, cluster.Options{PerPacket: true, Mode: attach.Auto})
	const size = 4000
	data := bytes.Repeat([]byte("fragment"), size/8)
	for _, f := range Families {
		t.Run(f.Name, func(t *testing.T) {
			vip := netip.AddrPortFrom(f.VIP, e2eUDPPort)
			c.Program(t, vip.Addr(), vip.Port(), service.UDP, backendNames...)
			client := c.Addr("client", f.VIP)
			pod := c.Topo.Pod(backendNames[0])
			dst := netip.AddrPortFrom(c.Addr(pod.Name, f.VIP), 9999)
			recv := listenUDP(t, pod, dst)

			require.NoError(t, c.Client.Do(func() error {
				conn, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
				if err != nil {
					return err
				}
				defer conn.Close()
				_, err = conn.Write(data)
				return err
			}), "send %d bytes from a socket", size)
			assert.Equal(t, data, recv(), "the kernel's fragments, in order, are delivered whole")

			before := c.Counters(t)
			src := netip.AddrPortFrom(client, 40001)
			frags := packet.Fragment(packet.L3(layers.IPProtocolUDP, src, dst, packet.TCPFlags{}, data, packet.Opts{}), 1400, 0x7e57, false)
			require.Greater(t, len(frags), 2, "the datagram is in several fragments")
			require.NoError(t, sendRaw(c.Client, dst.Addr(), reversed(frags)), "send the fragments last first")
			assert.Equal(t, data, recv(), "fragments out of order are delivered whole")
			after := c.Counters(t)
			// From the client's device and into the backend's: each later
			// fragment passes both programs.
			assert.Equal(t, uint64(2*(len(frags)-1)), after["frag_pass"]-before["frag_pass"],
				"every later fragment passed untouched, at both pods' devices")
			assert.Zero(t, after["frag_not_found"]-before["frag_not_found"], "none dropped")

			toVIP := packet.Fragment(packet.L3(layers.IPProtocolUDP, src, vip, packet.TCPFlags{}, data, packet.Opts{}), 1400, 0x7e58, false)
			require.NoError(t, sendRaw(c.Client, vip.Addr(), reversed(toVIP)), "send a VIP's fragments last first")
			require.Eventually(t, func() bool {
				return c.Counters(t)["frag_not_found"]-after["frag_not_found"] == uint64(len(toVIP)-1)
			}, timeout, 10*time.Millisecond, "the VIP's later fragments, seen before their first, are dropped")
		})
	}
}

func reversed(frames [][]byte) [][]byte {
	out := make([][]byte, 0, len(frames))
	for i := len(frames) - 1; i >= 0; i-- {
		out = append(out, frames[i])
	}
	return out
}

// listenUDP binds at in pod and returns a function that reads one
// datagram, failing t after the timeout.
func listenUDP(t *testing.T, pod *topology.Pod, at netip.AddrPort) func() []byte {
	var conn *net.UDPConn
	require.NoError(t, pod.Do(func() error {
		var err error
		conn, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(at))
		return err
	}), "listen on %s in %s", at, pod.Name)
	t.Cleanup(func() { conn.Close() })
	return func() []byte {
		buf := make([]byte, 65536)
		conn.SetReadDeadline(time.Now().Add(timeout))
		n, err := conn.Read(buf)
		require.NoError(t, err, "a datagram reaches %s", at)
		return buf[:n]
	}
}

// sendRaw sends IP packets (Ethernet frames, the header dropped) as they
// are, through a raw socket in pod: the kernel neither reorders nor
// reassembles them.
func sendRaw(pod *topology.Pod, dst netip.Addr, frames [][]byte) error {
	return pod.Do(func() error {
		family, sa := unix.AF_INET6, unix.Sockaddr(&unix.SockaddrInet6{Addr: dst.As16()})
		if dst.Is4() {
			family, sa = unix.AF_INET, &unix.SockaddrInet4{Addr: dst.As4()}
		}
		fd, err := unix.Socket(family, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		if err != nil {
			return fmt.Errorf("raw socket: %w", err)
		}
		defer unix.Close(fd)
		for i, fr := range frames {
			if err := unix.Sendto(fd, fr[14:], 0, sa); err != nil {
				return fmt.Errorf("fragment %d: %w", i, err)
			}
		}
		return nil
	})
}
