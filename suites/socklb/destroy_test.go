package socklb

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/datapath/sockdestroy"
	"github.com/servicepath/servicepath/harness/cluster"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/traffic"
)

// The helper process is a client living in a pod's netns, as a real pod's
// process does: the socket destroyer finds namespaces through processes.
const helperEnv = "SERVICEPATH_SOCKLB_HELPER"

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		if err := helper(os.Getenv(helperEnv)); err != nil {
			fmt.Println("helper:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

type helperAddrs struct{ TCPVIP, UDPVIP, Direct string }

// helper opens four sockets, says "ready", waits for a line, then reports
// how each fares: a TCP connection and a connected UDP socket to the VIP,
// a TCP connection straight to a pod, and an unconnected UDP socket that
// has talked to the VIP.
func helper(spec string) error {
	var a helperAddrs
	if err := json.Unmarshal([]byte(spec), &a); err != nil {
		return err
	}
	tcpVIP, err := net.Dial("tcp", a.TCPVIP)
	if err != nil {
		return err
	}
	direct, err := net.Dial("tcp", a.Direct)
	if err != nil {
		return err
	}
	udpVIP := net.UDPAddrFromAddrPort(netip.MustParseAddrPort(a.UDPVIP))
	cudp, err := net.DialUDP("udp", nil, udpVIP)
	if err != nil {
		return err
	}
	uudp, err := net.ListenUDP("udp", nil)
	if err != nil {
		return err
	}
	exchange := func(c net.Conn, msg string) string {
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.Write([]byte(msg)); err != nil {
			return "error: " + err.Error()
		}
		buf := make([]byte, 1024)
		n, err := c.Read(buf)
		if err != nil {
			return "error: " + err.Error()
		}
		return strings.SplitN(string(buf[:n]), "\n", 2)[0]
	}
	unconnected := func() string {
		uudp.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := uudp.WriteToUDP([]byte("u"), udpVIP); err != nil {
			return "error: " + err.Error()
		}
		buf := make([]byte, 1024)
		n, from, err := uudp.ReadFromUDPAddrPort(buf)
		if err != nil {
			return "error: " + err.Error()
		}
		// A dual-stack socket: recvmsg6 answers with the v4-mapped VIP.
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		return strings.SplitN(string(buf[:n]), "\n", 2)[0] + " from " + from.String()
	}
	if r := exchange(cudp, "c"); strings.HasPrefix(r, "error") {
		return fmt.Errorf("connected UDP before removal: %s", r)
	}
	if r := unconnected(); strings.HasPrefix(r, "error") {
		return fmt.Errorf("unconnected UDP before removal: %s", r)
	}
	fmt.Println("ready")
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(map[string]string{
		"tcp-vip":         exchange(tcpVIP, "t"),
		"connected-udp":   exchange(cudp, "c"),
		"tcp-direct":      exchange(direct, "d"),
		"unconnected-udp": unconnected(),
	})
}

// Removing a backend destroys the TCP and connected UDP sockets the socket
// hooks pointed at it, in the pod's own netns; the client's next attempt
// lands on a live backend. An unconnected UDP socket that talked to the
// service and a connection made straight to the pod live on. The same
// holds when the datapath is reloaded in the other socket-state mode
// while the sockets are open: the iterators read both places.
func TestRemovedBackendSocketsDestroyed(t *testing.T) {
	forEachSockState(t, cluster.Options{SocketLB: true}, func(t *testing.T, mode loader.SockState, o cluster.Options) {
		for _, after := range sockStates {
			name := "kept"
			if after != mode {
				name = "reloaded-as-" + string(after)
			}
			t.Run(name, func(t *testing.T) {
				requireSockState(t, after)
				c := cluster.New(t, o)
				vip := netip.MustParseAddr("198.19.0.40")
				c.Program(t, vip, 80, service.TCP, cluster.Backends[0])
				c.Program(t, vip, 53, service.UDP, cluster.Backends[0])

				d, err := loader.LoadSockDestroyer(c.DP.Maps)
				testenv.RequireFeature(t, "bpf_sock_destroy", "6.5", err)
				t.Cleanup(func() { d.Close() })

				self, err := os.Executable()
				require.NoError(t, err, "find the test binary")
				spec, _ := json.Marshal(helperAddrs{
					TCPVIP: netip.AddrPortFrom(vip, 80).String(),
					UDPVIP: netip.AddrPortFrom(vip, 53).String(),
					Direct: netip.AddrPortFrom(c.Addr(cluster.Backends[0], vip), cluster.BackendPort).String(),
				})
				cmd := exec.Command("ip", "netns", "exec", c.Client.NetnsName, self, "-test.run=^$")
				cmd.Env = append(os.Environ(), helperEnv+"="+string(spec))
				stdin, err := cmd.StdinPipe()
				require.NoError(t, err, "helper stdin")
				stdout, err := cmd.StdoutPipe()
				require.NoError(t, err, "helper stdout")
				require.NoError(t, cmd.Start(), "start the client process in the pod")
				t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
				out := bufio.NewReader(stdout)
				line, err := out.ReadString('\n')
				require.NoError(t, err, "helper output")
				require.Equal(t, "ready\n", line, "helper opened its sockets")

				if after != mode {
					reload(t, c, after)
				}
				c.Program(t, vip, 80, service.TCP, cluster.Backends[1])
				c.Program(t, vip, 53, service.UDP, cluster.Backends[1])
				removed := c.Services.TakeRemoved()
				require.Len(t, removed, 2, "backend-1 left both frontends")
				rep, err := sockdestroy.Run(d, c.DP.Maps, []string{c.Cgroup}, removed)
				require.NoError(t, err, "destroy sockets")
				assert.Equal(t, uint64(2), rep.Destroyed, "the TCP and connected UDP sockets to the removed backend")
				assert.GreaterOrEqual(t, rep.Namespaces, 2, "the test's own netns and the pod's were visited")
				assert.Empty(t, rep.Unreachable, "every netns was reached")

				fmt.Fprintln(stdin, "check")
				var got map[string]string
				require.NoError(t, json.NewDecoder(out).Decode(&got), "helper results")
				assert.Contains(t, got["tcp-vip"], "connection", "TCP to the removed backend was aborted: %q", got["tcp-vip"])
				assert.Contains(t, got["connected-udp"], "error", "connected UDP to the removed backend was aborted: %q", got["connected-udp"])
				assert.Equal(t, cluster.Backends[0], got["tcp-direct"], "a connection straight to the pod is untouched")
				assert.Equal(t, cluster.Backends[1]+" from "+netip.AddrPortFrom(vip, 53).String(), got["unconnected-udp"],
					"the unconnected UDP socket lives on and now reaches the live backend through the VIP")

				r, err := traffic.TCPExchange(c.Client, netip.AddrPortFrom(vip, 80), []byte("again"), timeout)
				require.NoError(t, err, "reconnect through the VIP")
				assert.Equal(t, cluster.Backends[1], r.Identity, "the next attempt lands on the live backend")
				if after == mode {
					assertStateIn(t, c, mode)
				}
			})
		}
	})
}
