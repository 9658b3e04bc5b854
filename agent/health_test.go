package agent

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/servicepath/servicepath/datapath/loader"
)

func serveHealth(h *health, path string) (int, http.Header, string) {
	rec := httptest.NewRecorder()
	h.handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	return rec.Code, rec.Header(), rec.Body.String()
}

// healthzBody decodes /healthz as a client of kube-proxy's would.
func healthzBody(t *testing.T, body string) map[string]any {
	t.Helper()
	var m map[string]any
	require.NoError(t, json.Unmarshal([]byte(body), &m), "/healthz body is JSON: %s", body)
	return m
}

func TestLivez(t *testing.T) {
	const timeout = 50 * time.Millisecond
	var probeErr error
	h := &health{timeout: timeout, probe: func() error { return probeErr }}
	h.started()
	code, hdr, body := serveHealth(h, "/livez")
	assert.Equal(t, http.StatusOK, code, "/livez of an idle loop: %s", body)
	assert.Equal(t, "ok\n", body, "/livez says ok")
	assert.Equal(t, "nosniff", hdr.Get("X-Content-Type-Options"), "/livez is not sniffed")

	h.syncing()
	time.Sleep(2 * timeout)
	code, _, body = serveHealth(h, "/livez")
	assert.Equal(t, http.StatusServiceUnavailable, code, "/livez with a sync stuck longer than the timeout")
	assert.Contains(t, body, "a sync has been running", "/livez says why")
	h.record(errors.New("map full"), false)
	assert.Equal(t, http.StatusOK, status(h, "/livez"), "/livez after a failed sync: failing is not wedged")

	h.changed()
	assert.Equal(t, http.StatusOK, status(h, "/livez"), "/livez with a change just queued")
	time.Sleep(2 * timeout)
	code, _, body = serveHealth(h, "/livez")
	assert.Equal(t, http.StatusServiceUnavailable, code, "/livez when the loop has not taken a change for longer than the timeout")
	assert.Contains(t, body, "has not taken changes", "/livez says why")
	h.syncing()
	h.record(nil, true)

	probeErr = errors.New("bad file descriptor")
	code, _, body = serveHealth(h, "/livez")
	assert.Equal(t, http.StatusServiceUnavailable, code, "/livez when the maps do not answer")
	assert.Contains(t, body, "maps do not answer: bad file descriptor", "/livez says why")
}

func status(h *health, path string) int {
	code, _, _ := serveHealth(h, path)
	return code
}

func TestReadyz(t *testing.T) {
	h := &health{timeout: time.Minute, probe: func() error { return nil }}
	code, _, body := serveHealth(h, "/readyz")
	assert.Equal(t, http.StatusServiceUnavailable, code, "/readyz before the first full sync")
	assert.Contains(t, body, "first full sync not done", "/readyz says why")
	h.syncing()
	h.record(nil, false)
	assert.Equal(t, http.StatusServiceUnavailable, status(h, "/readyz"), "/readyz after a partial sync only")
	h.syncing()
	h.record(nil, true)
	assert.Equal(t, http.StatusOK, status(h, "/readyz"), "/readyz after the first full sync")
	h.syncing()
	h.record(errors.New("map full"), false)
	code, _, body = serveHealth(h, "/readyz")
	assert.Equal(t, http.StatusServiceUnavailable, code, "/readyz after a failed sync")
	assert.Contains(t, body, "last sync failed: map full", "/readyz says why")
}

// TestHealthzKubeProxy holds /healthz to kube-proxy's ProxyHealthServer:
// healthy while starting and while changes are synced in time, whatever
// the readiness; unhealthy once a change has been pending too long.
func TestHealthzKubeProxy(t *testing.T) {
	const timeout = 50 * time.Millisecond
	h := &health{timeout: timeout, probe: func() error { return nil }}
	h.started()
	h.changed()
	code, hdr, body := serveHealth(h, "/healthz")
	assert.Equal(t, http.StatusOK, code, "/healthz while starting: %s", body)
	assert.Equal(t, "application/json", hdr.Get("Content-Type"), "/healthz is JSON")
	assert.Equal(t, "nosniff", hdr.Get("X-Content-Type-Options"), "/healthz is not sniffed")
	m := healthzBody(t, body)
	for _, f := range []string{"lastUpdated", "currentTime", "healthy", "status"} {
		assert.Contains(t, m, f, "/healthz has %s", f)
	}
	assert.NotContains(t, m, "nodeEligible", "no nodeEligible without a node name")
	assert.Equal(t, m["currentTime"], m["lastUpdated"], "a healthy lastUpdated reads now, as kube-proxy's")

	// Taken by a sync that fails, and retried: pending since the change.
	h.syncing()
	h.record(errors.New("map full"), true)
	time.Sleep(2 * timeout)
	code, _, body = serveHealth(h, "/healthz")
	assert.Equal(t, http.StatusServiceUnavailable, code, "/healthz with a change pending longer than the timeout")
	m = healthzBody(t, body)
	assert.Equal(t, false, m["healthy"], "healthy false")
	assert.Equal(t, map[string]any{"lastUpdated": m["lastUpdated"], "healthy": false}, m["status"].(map[string]any)["IPv4"],
		"per-family status")
	assert.NotEqual(t, m["currentTime"], m["lastUpdated"], "an unhealthy lastUpdated is the last successful sync")

	// A change arriving during a successful sync stays pending.
	h.syncing()
	h.changed()
	h.record(nil, true)
	time.Sleep(2 * timeout)
	assert.Equal(t, http.StatusServiceUnavailable, status(h, "/healthz"), "/healthz with a change the last sync did not take")
	h.syncing()
	h.record(nil, true)
	assert.Equal(t, http.StatusOK, status(h, "/healthz"), "/healthz once every change is synced")
	h.kick()
	time.Sleep(2 * timeout)
	assert.Equal(t, http.StatusOK, status(h, "/healthz"), "a periodic resync is no pending change")
}

func TestHealthzNodeEligible(t *testing.T) {
	h := &health{timeout: time.Minute, probe: func() error { return nil }}
	var node *corev1.Node
	h.node = func() *corev1.Node { return node }
	h.started()
	for _, c := range []struct {
		what     string
		node     *corev1.Node
		eligible bool
	}{
		{"a node not in the cache", nil, false},
		{"a node", &corev1.Node{}, true},
		{"a node with another taint", &corev1.Node{Spec: corev1.NodeSpec{Taints: []corev1.Taint{{Key: "other"}}}}, true},
		{"a node the autoscaler is removing", &corev1.Node{Spec: corev1.NodeSpec{Taints: []corev1.Taint{{Key: "other"}, {Key: toBeDeletedTaint}}}}, false},
		{"a node being deleted", &corev1.Node{ObjectMeta: metav1.ObjectMeta{DeletionTimestamp: &metav1.Time{Time: time.Now()}}}, false},
	} {
		node = c.node
		code, _, body := serveHealth(h, "/healthz")
		want := http.StatusServiceUnavailable
		if c.eligible {
			want = http.StatusOK
		}
		assert.Equal(t, want, code, "/healthz for %s", c.what)
		m := healthzBody(t, body)
		assert.Equal(t, c.eligible, m["nodeEligible"], "nodeEligible for %s", c.what)
		assert.Equal(t, true, m["healthy"], "healthy (the proxier's part) for %s", c.what)
		assert.Equal(t, http.StatusOK, status(h, "/livez"), "/livez does not care about the node: %s", c.what)
	}
}

// TestHealthzWatchesNode runs the agent on a fake clientset: /healthz
// follows this node's Node object through the agent's informer.
func TestHealthzWatchesNode(t *testing.T) {
	dp, _ := loadDatapath(t, loader.DefaultConfig())
	client := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}},
		&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-b"}, Spec: corev1.NodeSpec{Taints: []corev1.Taint{{Key: toBeDeletedTaint}}}})
	a := startAgent(t, client, dp.Maps, Config{NodeName: "node-a"})
	a.waitHealthy(t)
	code, body := a.probe("/healthz")
	assert.Equal(t, http.StatusOK, code, "/healthz of an eligible node: %s", body)
	assert.Equal(t, true, healthzBody(t, body)["nodeEligible"], "nodeEligible")

	_, err := client.CoreV1().Nodes().Update(t.Context(), &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"},
		Spec: corev1.NodeSpec{Taints: []corev1.Taint{{Key: toBeDeletedTaint, Effect: corev1.TaintEffectNoSchedule}}}}, metav1.UpdateOptions{})
	require.NoError(t, err, "taint node-a")
	waitFor(t, "/healthz failing on the tainted node", func() (bool, string) {
		code, body := a.probe("/healthz")
		return code == http.StatusServiceUnavailable, body
	})
	assert.Equal(t, http.StatusOK, a.status("/readyz"), "/readyz does not care about the node")
	assert.Equal(t, http.StatusOK, a.status("/livez"), "/livez does not care about the node")
}
