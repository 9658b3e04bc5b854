package agent

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
)

const echoPort = 8080

// serveLines answers every line on a connection with the pod's name, so
// one long-lived connection shows which backend it stays on.
func serveLines(t *testing.T, pod *topology.Pod) {
	t.Helper()
	var ln net.Listener
	require.NoError(t, pod.Do(func() (err error) {
		ln, err = net.Listen("tcp", fmt.Sprintf(":%d", echoPort))
		return err
	}), "listen in %s", pod.Name)
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					if _, err := fmt.Fprintf(c, "%s\n", pod.Name); err != nil {
						return
					}
				}
			}()
		}
	}()
}

// flow is one TCP connection from the client pod.
type flow struct {
	c net.Conn
	r *bufio.Reader
}

func dial(t *testing.T, pod *topology.Pod, dst netip.AddrPort) *flow {
	t.Helper()
	var c net.Conn
	require.NoError(t, pod.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", dst.String(), 5*time.Second)
		return err
	}), "connect from %s to %s", pod.Name, dst)
	t.Cleanup(func() { c.Close() })
	return &flow{c: c, r: bufio.NewReader(c)}
}

// ask sends a line and returns the name of the backend that answered.
func (f *flow) ask() (string, error) {
	f.c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := f.c.Write([]byte("ping\n")); err != nil {
		return "", err
	}
	line, err := f.r.ReadString('\n')
	return strings.TrimSpace(line), err
}

// TestAgentRestartKeepsFlows runs a real client in a pod netns against a
// Service the agent programmed from the API, restarts the agent (reloading
// the datapath over its pinned maps, as a new process would) and checks
// that it writes nothing, that the established connection carries on with
// its backend, and that a Service deleted meanwhile is removed.
func TestAgentRestartKeepsFlows(t *testing.T) {
	k := newKube(t)
	testenv.RequireRoot(t)
	topo := topology.NewForTest(t, topology.Spec{Name: "agent", Pods: []topology.PodSpec{
		{Name: "client"}, {Name: "backend-1"}, {Name: "backend-2"},
	}})
	pin := filepath.Join(testenv.BPFFS(t), "servicepath")
	// What `servicepath load` does: load over the pinned maps, attach.
	load := func() *loader.Datapath {
		cfg := loader.DefaultConfig()
		cfg.PinPath = pin
		dp, err := loader.Load(cfg)
		require.NoError(t, err, "load datapath")
		t.Cleanup(func() { dp.Close() })
		a := &attach.Attacher{LinkDir: filepath.Join(pin, "links"), Mode: attach.Auto}
		require.NoError(t, topo.Node.Do(func() error {
			for _, p := range topo.Pods {
				if _, err := a.Attach(dp.FromPod, p.HostIf, attach.Ingress); err != nil {
					return err
				}
				if _, err := a.Attach(dp.ToPod, p.HostIf, attach.Egress); err != nil {
					return err
				}
			}
			return nil
		}), "attach to the pod devices")
		return dp
	}
	backends := []*topology.Pod{topo.Pod("backend-1"), topo.Pod("backend-2")}
	var eps []discoveryv1.Endpoint
	var want []string
	for _, p := range backends {
		serveLines(t, p)
		eps = append(eps, readyEP(p.IPv4.String()))
		want = append(want, netip.AddrPortFrom(p.IPv4, echoPort).String())
	}
	ports := []discoveryv1.EndpointPort{slicePort("", corev1.ProtocolTCP, echoPort)}
	ip, _ := clusterIPs()
	ipStale, _ := clusterIPs()
	k.createService(t, clusterIPService("keep", ip, "", svcPort("", corev1.ProtocolTCP, 80)))
	k.createSlice(t, endpointSlice("keep-1", "keep", v4, ports, eps...))
	k.createService(t, clusterIPService("stale", ipStale, "", svcPort("", corev1.ProtocolTCP, 80)))
	k.createSlice(t, endpointSlice("stale-1", "stale", v4, ports, eps...))

	dp := load()
	first := startAgent(t, k.client, dp.Maps, Config{})
	waitProgrammed(t, dp.Maps, k.name("keep"), map[string][]string{ip + ":80/TCP": want})
	waitProgrammed(t, dp.Maps, k.name("stale"), map[string][]string{ipStale + ":80/TCP": want})
	first.waitHealthy(t)

	vip := netip.AddrPortFrom(netip.MustParseAddr(ip), 80)
	f := dial(t, topo.Pod("client"), vip)
	backend, err := f.ask()
	require.NoError(t, err, "exchange through %s", vip)
	require.Contains(t, []string{"backend-1", "backend-2"}, backend, "a backend answered through the VIP")

	// Restart with the API unchanged: not one map write.
	before := rawMaps(t, dp.Maps)
	first.stop()
	dp.Close()
	dp = load()
	second := startAgent(t, k.client, dp.Maps, Config{})
	second.waitHealthy(t)
	assert.Equal(t, before, rawMaps(t, dp.Maps), "maps byte for byte as before the restart")
	assert.Zero(t, testutil.ToFloat64(second.Metrics.ServiceApplies), "no Service written after a restart with the API unchanged")
	got, err := f.ask()
	require.NoError(t, err, "the established connection still works after the agent restart")
	assert.Equal(t, backend, got, "the established connection stays on its backend")

	// A Service deleted while the agent is down is removed when it starts.
	second.stop()
	require.NoError(t, k.client.CoreV1().Services(k.ns).Delete(context.Background(), "stale", metav1.DeleteOptions{}),
		"delete Service stale while the agent is down")
	keep := ownedBy(mustRead(t, dp), k.name("keep"))
	third := startAgent(t, k.client, dp.Maps, Config{})
	third.waitHealthy(t)
	waitProgrammed(t, dp.Maps, k.name("stale"), map[string][]string{})
	assert.Equal(t, keep, ownedBy(mustRead(t, dp), k.name("keep")), "Service keep untouched by the removal")
	got, err = f.ask()
	require.NoError(t, err, "the established connection still works after the stale Service's removal")
	assert.Equal(t, backend, got, "the established connection stays on its backend")

	// New connections from the client reach the Service too.
	for range 4 {
		nf := dial(t, topo.Pod("client"), vip)
		name, err := nf.ask()
		require.NoError(t, err, "new connection through %s", vip)
		assert.Contains(t, []string{"backend-1", "backend-2"}, name, "a backend answered the new connection")
		nf.c.Close()
	}
}

func mustRead(t *testing.T, dp *loader.Datapath) map[string]frontendView {
	t.Helper()
	v, err := readMaps(dp.Maps)
	require.NoError(t, err, "read maps")
	return v
}
