package agent

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/record"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/k8s"
)

// freeTCPPort is a port nothing listens on, on any address, just now.
func freeTCPPort(t *testing.T) uint16 {
	t.Helper()
	ln, err := net.Listen("tcp", ":0")
	require.NoError(t, err, "find a free port")
	defer ln.Close()
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

type hcAnswer struct {
	code   int
	header http.Header
	body   string
}

func getHealthCheck(port uint16) (hcAnswer, error) {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/healthz", port))
	if err != nil {
		return hcAnswer{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return hcAnswer{resp.StatusCode, resp.Header, string(b)}, err
}

// kubeProxyBody is what kube-proxy's hcHandler writes, tabs and all.
func kubeProxyBody(ns, name string, local int, healthy bool) string {
	return fmt.Sprintf("{\n\t\"service\": {\n\t\t\"namespace\": %q,\n\t\t\"name\": %q\n\t},\n\t\"localEndpoints\": %d,\n\t\"serviceProxyHealthy\": %v\n}",
		ns, name, local, healthy)
}

func lbLocal(ns, name string, hcPort uint16) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyLocal,
			HealthCheckNodePort: int32(hcPort)},
	}
}

// TestServiceHealthServer drives the health check server alone on real
// sockets: it opens, answers as kube-proxy, follows the endpoint count and
// the proxy's health, closes, and reports a port it cannot bind once.
func TestServiceHealthServer(t *testing.T) {
	reg := prometheus.NewRegistry()
	recorder := record.NewFakeRecorder(10)
	healthy := true
	h := newServiceHealth(slog.New(slog.NewTextHandler(testWriter{t}, nil)), recorder, "node-a", reg, func() bool { return healthy })
	t.Cleanup(h.close)

	port := freeTCPPort(t)
	local := func(addrs ...string) k8s.Result {
		s := service.Service{ExternalLocal: true, Frontend: service.Frontend{Kind: service.NodePort}}
		for _, a := range addrs {
			// One pod on two ports counts once, as kube-proxy counts IPs.
			for _, p := range []uint16{80, 443} {
				s.Backends = append(s.Backends, service.Backend{Addr: netip.MustParseAddr(a), Port: p})
			}
		}
		s.Backends = append(s.Backends, service.Backend{Addr: netip.MustParseAddr("10.0.0.99"), Port: 80, State: service.Terminating})
		// A cluster IP frontend's backends are not this node's alone.
		cluster := service.Service{Frontend: service.Frontend{Kind: service.ClusterIP},
			Backends: []service.Backend{{Addr: netip.MustParseAddr("10.0.9.9"), Port: 80}}}
		return k8s.Result{Services: []service.Service{cluster, s}}
	}
	svc := lbLocal("shop", "web", port)
	h.set(svc, local("10.0.0.1", "10.0.0.2"))
	h.sync()
	got, err := getHealthCheck(port)
	require.NoError(t, err, "GET the health check port")
	assert.Equal(t, http.StatusOK, got.code, "200 with local endpoints")
	assert.Equal(t, kubeProxyBody("shop", "web", 2, true), got.body, "kube-proxy's body: two ready local addresses")
	assert.Equal(t, "application/json", got.header.Get("Content-Type"), "JSON")
	assert.Equal(t, "nosniff", got.header.Get("X-Content-Type-Options"), "not sniffed")
	assert.Equal(t, "2", got.header.Get("X-Load-Balancing-Endpoint-Weight"), "weight is the local endpoint count")
	assert.Equal(t, 1.0, testutil.ToFloat64(h.ports.WithLabelValues("served")), "one port served")

	healthy = false
	got, err = getHealthCheck(port)
	require.NoError(t, err, "GET the health check port")
	assert.Equal(t, http.StatusServiceUnavailable, got.code, "503 while the proxy is unhealthy")
	assert.Equal(t, kubeProxyBody("shop", "web", 2, false), got.body, "serviceProxyHealthy false")
	healthy = true

	h.set(svc, local())
	h.sync()
	got, err = getHealthCheck(port)
	require.NoError(t, err, "GET the health check port")
	assert.Equal(t, http.StatusServiceUnavailable, got.code, "503 without a ready local endpoint")
	assert.Equal(t, "0", got.header.Get("X-Load-Balancing-Endpoint-Weight"), "weight 0")

	// externalTrafficPolicy Cluster: no health check.
	cluster := svc.DeepCopy()
	cluster.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyCluster
	h.set(cluster, local("10.0.0.1"))
	h.sync()
	_, err = getHealthCheck(port)
	assert.Error(t, err, "the port is closed once the Service no longer asks for it")

	// A port held by someone else: reported once, retried on each sync.
	held, err := net.Listen("tcp", fmt.Sprintf(":%d", port))
	require.NoError(t, err, "hold the port")
	h.set(svc, local("10.0.0.1"))
	h.sync()
	h.sync()
	assert.Equal(t, 1.0, testutil.ToFloat64(h.ports.WithLabelValues("failed")), "one port failed")
	require.Len(t, recorder.Events, 1, "one Event for the port, however many syncs")
	ev := <-recorder.Events
	assert.Contains(t, ev, "Warning FailedToStartServiceHealthcheck", "kube-proxy's Event reason")
	assert.Contains(t, ev, fmt.Sprintf(`node node-a failed to start healthcheck "shop/web" on port %d`, port), "kube-proxy's message")
	held.Close()
	h.sync()
	got, err = getHealthCheck(port)
	require.NoError(t, err, "the port is served once free")
	assert.Equal(t, http.StatusOK, got.code, "200 once served")
	assert.Equal(t, 0.0, testutil.ToFloat64(h.ports.WithLabelValues("failed")), "no port failed")

	h.remove("shop/web")
	h.sync()
	_, err = getHealthCheck(port)
	assert.Error(t, err, "the port is closed once the Service is gone")
	assert.Equal(t, 0.0, testutil.ToFloat64(h.ports.WithLabelValues("served")), "no port served")
}

// TestHealthCheckNodePort runs the agent on a fake clientset: the port of
// a LoadBalancer Service with externalTrafficPolicy Local answers on every
// address with this node's ready endpoints, and follows the Service.
func TestHealthCheckNodePort(t *testing.T) {
	dp, _ := loadDatapath(t, loader.DefaultConfig())
	client := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}})
	a := startAgent(t, client, dp.Maps, Config{NodeName: "node-a", SyncPeriod: 200 * time.Millisecond})
	a.waitHealthy(t)
	ctx := context.Background()
	const ns = "shop"

	port, busy := freeTCPPort(t), freeTCPPort(t)
	svc := lbLocal(ns, "web", port)
	svc.Spec.ClusterIP, svc.Spec.ClusterIPs = "10.96.7.1", []string{"10.96.7.1"}
	svc.Spec.Ports = []corev1.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, NodePort: 30080}}
	svc, err := client.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{})
	require.NoError(t, err, "create Service")
	onNode := func(addr, node string, ready bool) discoveryv1.Endpoint {
		return discoveryv1.Endpoint{Addresses: []string{addr}, NodeName: &node, Conditions: discoveryv1.EndpointConditions{Ready: &ready}}
	}
	es := endpointSlice("web-1", "web", v4, []discoveryv1.EndpointPort{slicePort("http", corev1.ProtocolTCP, 8080)},
		onNode("10.1.0.1", "node-a", true), onNode("10.1.0.2", "node-b", true), onNode("10.1.0.3", "node-a", false))
	es.Namespace = ns
	es, err = client.DiscoveryV1().EndpointSlices(ns).Create(ctx, es, metav1.CreateOptions{})
	require.NoError(t, err, "create EndpointSlice")

	waitAnswer := func(what string, code int, body string) {
		t.Helper()
		waitFor(t, what, func() (bool, string) {
			got, err := getHealthCheck(port)
			if err != nil {
				return false, err.Error()
			}
			return got.code == code && got.body == body, fmt.Sprint(got.code, got.body)
		})
	}
	waitAnswer("the health check port serving one local endpoint", http.StatusOK, kubeProxyBody(ns, "web", 1, true))

	es.Endpoints[0].Conditions.Ready = ptr(false)
	es, err = client.DiscoveryV1().EndpointSlices(ns).Update(ctx, es, metav1.UpdateOptions{})
	require.NoError(t, err, "local endpoint not ready")
	waitAnswer("503 without a ready local endpoint", http.StatusServiceUnavailable, kubeProxyBody(ns, "web", 0, true))

	es.Endpoints[0].Conditions.Ready, es.Endpoints[2].Conditions.Ready = ptr(true), ptr(true)
	_, err = client.DiscoveryV1().EndpointSlices(ns).Update(ctx, es, metav1.UpdateOptions{})
	require.NoError(t, err, "both local endpoints ready")
	waitAnswer("two local endpoints", http.StatusOK, kubeProxyBody(ns, "web", 2, true))

	// A port the agent cannot bind fails neither the sync nor readiness.
	held, err := net.Listen("tcp", fmt.Sprintf(":%d", busy))
	require.NoError(t, err, "hold a port")
	other := lbLocal(ns, "busy", busy)
	other.Spec.ClusterIP, other.Spec.ClusterIPs = "10.96.7.2", []string{"10.96.7.2"}
	other.Spec.Ports = []corev1.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, NodePort: 30081}}
	_, err = client.CoreV1().Services(ns).Create(ctx, other, metav1.CreateOptions{})
	require.NoError(t, err, "create Service busy")
	waitFor(t, "a FailedToStartServiceHealthcheck Event on Service busy", func() (bool, string) {
		evs, err := client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err.Error()
		}
		for _, e := range evs.Items {
			if e.Reason == "FailedToStartServiceHealthcheck" && e.InvolvedObject.Name == "busy" {
				return strings.Contains(e.Message, fmt.Sprintf("on port %d", busy)), e.Message
			}
		}
		return false, fmt.Sprintf("%d events", len(evs.Items))
	})
	assert.Equal(t, 1.0, testutil.ToFloat64(a.checks.ports.WithLabelValues("failed")), "the failed port counted")
	ok, why := a.Ready()
	assert.True(t, ok, "ready with a port not bound: %s", why)
	assert.Zero(t, testutil.ToFloat64(a.Metrics.SyncErrors), "no sync failed")
	held.Close()
	waitFor(t, "the freed port served by the periodic sync", func() (bool, string) {
		got, err := getHealthCheck(busy)
		if err != nil {
			return false, err.Error()
		}
		return got.code == http.StatusServiceUnavailable, fmt.Sprint(got.code, got.body)
	})

	require.NoError(t, client.CoreV1().Services(ns).Delete(ctx, "web", metav1.DeleteOptions{}), "delete Service web")
	waitFor(t, "the health check port closed", func() (bool, string) {
		_, err := getHealthCheck(port)
		return err != nil, fmt.Sprint(err)
	})

	a.stop()
	_, err = getHealthCheck(busy)
	assert.Error(t, err, "a stopped agent serves no health check")
}
