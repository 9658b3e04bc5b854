package socklb

import (
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/cluster"
)

const dnsPort = 5353

// answer is what backend i says svc.test is, so replies name their backend.
func answer(i int, v6 bool) string {
	if v6 {
		return fmt.Sprintf("2001:db8::%d", i+1)
	}
	return fmt.Sprintf("192.0.2.%d", i+1)
}

// dnsmasq runs dnsmasq in a pod's netns (inheriting the test's cgroup)
// until the test ends.
func dnsmasq(t *testing.T, netnsName string, args ...string) {
	dir := t.TempDir()
	base := []string{"netns", "exec", netnsName, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
		"--no-hosts", "--no-resolv", "--no-poll", "--user=root", "--group=root", "--bind-interfaces",
		"--pid-file=" + filepath.Join(dir, "pid")}
	cmd := exec.Command("ip", append(base, args...)...)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	require.NoError(t, cmd.Start(), "start dnsmasq in %s", netnsName)
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("dnsmasq in %s said: %s", netnsName, out.String())
		}
	})
}

// dig asks a server in the client pod and returns the answer.
func dig(c *cluster.Cluster, server netip.Addr, port int, qtype string) (string, error) {
	out, err := exec.Command("ip", "netns", "exec", c.Client.NetnsName, "dig", "@"+server.String(), "-p", fmt.Sprint(port),
		"svc.test", qtype, "+short", "+tries=1", "+time=2").CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// The LPC 2019 nslookup/dig case: a resolver that sends with unconnected
// UDP and drops replies whose source is not the server it asked. dnsmasq
// forwarding to the VIP is such a resolver; it only answers dig if every
// reply came back from the VIP.
func TestResolverRoundTripThroughVIP(t *testing.T) {
	for _, tool := range []string{"dnsmasq", "dig"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (make deps installs dnsmasq-base and bind9-dnsutils): %v", tool, err)
		}
	}
	forEachSockState(t, cluster.Options{SocketLB: true}, func(t *testing.T, mode loader.SockState, o cluster.Options) {
		c := cluster.New(t, o)
		for i, name := range cluster.Backends {
			p := c.Topo.Pod(name)
			dnsmasq(t, p.NetnsName, fmt.Sprintf("--port=%d", dnsPort),
				"--listen-address="+p.IPv4.String(), "--listen-address="+p.IPv6.String(),
				"--address=/svc.test/"+answer(i, false), "--address=/svc.test/"+answer(i, true))
		}
		for fi, fam := range []struct {
			vip   netip.Addr
			qtype string
			v6    bool
		}{{netip.MustParseAddr("198.19.0.30"), "A", false}, {netip.MustParseAddr("fd00:5f::30"), "AAAA", true}} {
			t.Run(fam.qtype, func(t *testing.T) {
				c.ProgramTo(t, fam.vip, 53, service.UDP, dnsPort, cluster.Backends...)
				fwdPort := 5300 + fi
				dnsmasq(t, c.Client.NetnsName, fmt.Sprintf("--port=%d", fwdPort), "--listen-address=127.0.0.1",
					"--cache-size=0", "--no-negcache", fmt.Sprintf("--server=%s#53", fam.vip))

				seen := map[string]bool{}
				want := map[string]bool{}
				for i := range cluster.Backends {
					want[answer(i, fam.v6)] = true
				}
				loopback := netip.MustParseAddr("127.0.0.1")
				deadline := time.Now().Add(20 * time.Second)
				for len(seen) < len(want) && time.Now().Before(deadline) {
					got, err := dig(c, loopback, fwdPort, fam.qtype)
					if err != nil || got == "" {
						continue // the forwarder may still be starting
					}
					require.True(t, want[got], "answer %q comes from a backend", got)
					seen[got] = true
				}
				assert.Equal(t, want, seen, "the forwarder's queries reached every backend and each reply was accepted as the VIP's")

				got, err := dig(c, fam.vip, 53, fam.qtype)
				require.NoError(t, err, "dig straight at the VIP: %s", got)
				assert.True(t, want[got], "dig's own (connected) socket gets a backend's answer: %q", got)
			})
		}
		assert.Positive(t, c.Counters(t)["sock_rev_xlate"], "replies were rewritten to the VIP at recvmsg")
		assertStateIn(t, c, mode)
	})
}
