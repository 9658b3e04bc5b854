package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/servicepath/servicepath/harness/kubeapi"
	"github.com/servicepath/servicepath/harness/testenv"
)

// asCLI makes the test binary run the CLI instead of the tests, so a test
// can run it as another user (runAs).
const asCLI = "SERVICEPATH_TEST_AS_CLI"

func TestMain(m *testing.M) {
	if os.Getenv(asCLI) != "" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	kubeapi.RunTests(m)
}

func TestAgentFlags(t *testing.T) {
	code, help, _ := runCLI("agent", "-h")
	assert.Zero(t, code, "agent -h exits 0")
	for _, f := range []string{"--kubeconfig", "--k8s-api-server", "--node-name", "--device", "--cgroup", "--bpffs", "--attach-mode",
		"--min-sync-period", "--sync-period", "--healthz-bind-address", "--metrics-bind-address", "--pod-device-pattern", "--bandwidth-manager", "--bandwidth-bbr", "-v, --v int"} {
		assert.Contains(t, help, f, "agent -h lists %s", f)
	}
	code, _, errOut := runCLI("agent", "--kubeconfig", filepath.Join(t.TempDir(), "missing"))
	assert.Equal(t, 1, code, "a missing kubeconfig fails")
	assert.Contains(t, errOut, "kubernetes client config", "the message says what is wrong")
	code, _, errOut = runCLI("agent", "--pod-device-pattern", "veth*,[x")
	assert.Equal(t, 1, code, "a bad pod device pattern fails")
	assert.Contains(t, errOut, `--pod-device-pattern: device pattern "[x"`, "the message names the flag and the glob")
	code, _, errOut = runCLI("agent", "--bandwidth-bbr")
	assert.Equal(t, 1, code, "BBR without the Bandwidth Manager fails")
	assert.Contains(t, errOut, "--bandwidth-bbr needs --bandwidth-manager", "the message names both flags")
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err, "find a free port")
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func httpGet(url string) (int, string, error) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// TestAgentCommand runs `servicepath agent` against the test API server:
// it loads the datapath like `load`, serves /livez, /readyz, /healthz and
// /metrics, programs a Service created through the API, and stops cleanly
// on SIGINT.
func TestAgentCommand(t *testing.T) {
	testenv.RequireRoot(t)
	srv := kubeapi.Shared(t)
	client, err := srv.Client()
	require.NoError(t, err, "client")
	pin := filepath.Join(testenv.BPFFS(t), "servicepath")
	healthz := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	metrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	ctx := context.Background()
	// kube-proxy's /healthz is 200 only on a node that exists.
	node := fmt.Sprintf("cli-node-%d", time.Now().UnixNano())
	_, err = client.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node}}, metav1.CreateOptions{})
	require.NoError(t, err, "create Node %s", node)
	t.Cleanup(func() { client.CoreV1().Nodes().Delete(ctx, node, metav1.DeleteOptions{}) })

	done := make(chan int, 1)
	go func() {
		code, out, errOut := runCLI("agent", "--kubeconfig", srv.Kubeconfig, "--node-name", node, "--bpffs", pin,
			"--min-sync-period", "50ms", "--healthz-bind-address", healthz, "--metrics-bind-address", metrics,
			"--pod-device-pattern", "") // this is the machine's own netns: no pod devices of ours
		t.Logf("agent output:\n%s%s", out, errOut)
		done <- code
	}()
	deadline := time.Now().Add(45 * time.Second)
	for {
		code, body, err := httpGet("http://" + healthz + "/readyz")
		if err == nil && code == http.StatusOK {
			break
		}
		require.True(t, time.Now().Before(deadline), "agent ready in time: %d %s %v", code, body, err)
		time.Sleep(50 * time.Millisecond)
	}
	code, body, err := httpGet("http://" + healthz + "/livez")
	require.NoError(t, err, "GET /livez")
	assert.Equal(t, http.StatusOK, code, "/livez: %s", body)
	code, body, err = httpGet("http://" + healthz + "/healthz")
	require.NoError(t, err, "GET /healthz")
	assert.Equal(t, http.StatusOK, code, "/healthz: %s", body)
	assert.Contains(t, body, `"lastUpdated"`, "kube-proxy's /healthz body")
	assert.Contains(t, body, `"nodeEligible":true`, "/healthz: the Node exists")

	ns := fmt.Sprintf("cli-%d", time.Now().UnixNano())
	_, err = client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	require.NoError(t, err, "namespace")
	_, err = client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{ClusterIP: "10.96.250.1", ClusterIPs: []string{"10.96.250.1"},
			Ports: []corev1.ServicePort{{Port: 80, Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	require.NoError(t, err, "create Service")
	t.Cleanup(func() { client.CoreV1().Services(ns).Delete(ctx, "web", metav1.DeleteOptions{}) })
	port := int32(8080)
	_, err = client.DiscoveryV1().EndpointSlices(ns).Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "web-1", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Port: &port}},
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"10.10.0.1"}}},
	}, metav1.CreateOptions{})
	require.NoError(t, err, "create EndpointSlice")
	t.Cleanup(func() { client.DiscoveryV1().EndpointSlices(ns).Delete(ctx, "web-1", metav1.DeleteOptions{}) })

	// The API server's own default/kubernetes Service is programmed too.
	var web *serviceJSON
	for web == nil {
		code, out, errOut := runCLI("services", "--bpffs", pin, "-o", "json")
		require.Zero(t, code, "servicepath services: %s", errOut)
		var listed []serviceJSON
		require.NoError(t, json.Unmarshal([]byte(out), &listed), "services JSON")
		for i, s := range listed {
			if s.Name == ns+"/web" && len(s.Backends) == 1 {
				web = &listed[i]
			}
		}
		require.True(t, time.Now().Before(deadline), "Service programmed in time: %s", out)
		time.Sleep(50 * time.Millisecond)
	}
	assert.Equal(t, "10.96.250.1:80", web.Frontend, "the Service's frontend")
	assert.Equal(t, "10.10.0.1:8080", web.Backends[0].Address, "its backend")

	code, body, err = httpGet("http://" + metrics + "/metrics")
	require.NoError(t, err, "scrape /metrics")
	assert.Equal(t, http.StatusOK, code, "/metrics answers")
	for _, m := range []string{"servicepath_sync_duration_seconds_bucket", "servicepath_services_programmed",
		`servicepath_datapath_packets_total{reason="lb_new"}`, `servicepath_map_pressure{map="sp_services"}`} {
		assert.True(t, strings.Contains(body, m), "/metrics has %s", m)
	}

	require.NoError(t, syscall.Kill(os.Getpid(), syscall.SIGINT), "interrupt the agent")
	select {
	case code := <-done:
		assert.Zero(t, code, "the agent exits 0 on SIGINT")
	case <-time.After(30 * time.Second):
		t.Fatal("the agent did not stop on SIGINT")
	}
	code, out, _ := runCLI("services", "--bpffs", pin, "-o", "json")
	assert.Zero(t, code, "services after the agent stopped")
	assert.Contains(t, out, ns+"/web", "the datapath keeps its Services when the agent stops")
}
