package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/harness/kubeapi"
	"github.com/servicepath/servicepath/harness/testenv"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if err := kubeapi.StopShared(); err != nil {
		fmt.Fprintf(os.Stderr, "stop kube-apiserver and etcd: %v\n", err)
		code = 1
	}
	os.Exit(code)
}

const waitTimeout = 45 * time.Second

// waitFor polls cond until it holds; on timeout the test fails with what
// cond last said.
func waitFor(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	var last string
	for time.Now().Before(deadline) {
		var ok bool
		if ok, last = cond(); ok {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("timed out after %s waiting for %s; last seen: %s", waitTimeout, what, last)
}

// kube is one test's view of the shared API server: a namespace of its own
// whose Services and slices are deleted at the end.
type kube struct {
	srv    *kubeapi.Server
	client *kubernetes.Clientset
	ns     string
}

func newKube(t *testing.T) *kube {
	t.Helper()
	srv := kubeapi.Shared(t)
	c, err := srv.Client()
	require.NoError(t, err, "client for the test API server")
	b := make([]byte, 4)
	rand.Read(b)
	k := &kube{srv: srv, client: c, ns: "sp-" + hex.EncodeToString(b)}
	ctx := context.Background()
	_, err = c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: k.ns}}, metav1.CreateOptions{})
	require.NoError(t, err, "create namespace %s", k.ns)
	t.Cleanup(func() {
		// Without a controller manager a namespace never finishes deleting;
		// its objects are deleted one by one so later agents never see them.
		ctx := context.Background()
		err := c.DiscoveryV1().EndpointSlices(k.ns).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{})
		svcs, lerr := c.CoreV1().Services(k.ns).List(ctx, metav1.ListOptions{})
		err = errors.Join(err, lerr)
		if lerr == nil {
			for _, s := range svcs.Items {
				err = errors.Join(err, c.CoreV1().Services(k.ns).Delete(ctx, s.Name, metav1.DeleteOptions{}))
			}
		}
		if err != nil {
			t.Errorf("delete objects of namespace %s: %v", k.ns, err)
		}
	})
	return k
}

// nextIP hands out cluster IPs no other test uses.
var nextIP atomic.Uint32

// clusterIPs returns an unused IPv4 cluster IP and its IPv6 twin.
func clusterIPs() (v4, v6 string) {
	n := nextIP.Add(1) + 10
	return fmt.Sprintf("10.96.%d.%d", n/250, n%250+1), fmt.Sprintf("fd00:10:96::%x", n)
}

func (k *kube) createService(t *testing.T, svc *corev1.Service) *corev1.Service {
	t.Helper()
	out, err := k.client.CoreV1().Services(k.ns).Create(context.Background(), svc, metav1.CreateOptions{})
	require.NoError(t, err, "create Service %s", svc.Name)
	return out
}

// clusterIPService is a single-stack (or, with v6, dual-stack) Service.
func clusterIPService(name, v4, v6 string, ports ...corev1.ServicePort) *corev1.Service {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       corev1.ServiceSpec{ClusterIP: v4, ClusterIPs: []string{v4}, Ports: ports},
	}
	if v6 != "" {
		policy := corev1.IPFamilyPolicyRequireDualStack
		svc.Spec.ClusterIPs = append(svc.Spec.ClusterIPs, v6)
		svc.Spec.IPFamilyPolicy = &policy
		svc.Spec.IPFamilies = []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol}
	}
	return svc
}

func svcPort(name string, proto corev1.Protocol, port int32) corev1.ServicePort {
	return corev1.ServicePort{Name: name, Protocol: proto, Port: port}
}

func slicePort(name string, proto corev1.Protocol, port int32) discoveryv1.EndpointPort {
	return discoveryv1.EndpointPort{Name: &name, Protocol: &proto, Port: &port}
}

func ptr[T any](v T) *T { return &v }

func readyEP(addr string) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{Addresses: []string{addr}, Conditions: discoveryv1.EndpointConditions{Ready: ptr(true)}}
}

func endpointSlice(name, owner string, at discoveryv1.AddressType, ports []discoveryv1.EndpointPort, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: owner}},
		AddressType: at,
		Ports:       ports,
		Endpoints:   eps,
	}
}

func (k *kube) createSlice(t *testing.T, es *discoveryv1.EndpointSlice) *discoveryv1.EndpointSlice {
	t.Helper()
	out, err := k.client.DiscoveryV1().EndpointSlices(k.ns).Create(context.Background(), es, metav1.CreateOptions{})
	require.NoError(t, err, "create EndpointSlice %s", es.Name)
	return out
}

func (k *kube) updateSlice(t *testing.T, es *discoveryv1.EndpointSlice) *discoveryv1.EndpointSlice {
	t.Helper()
	out, err := k.client.DiscoveryV1().EndpointSlices(k.ns).Update(context.Background(), es, metav1.UpdateOptions{})
	require.NoError(t, err, "update EndpointSlice %s", es.Name)
	return out
}

func (k *kube) name(svc string) string { return k.ns + "/" + svc }

// datapath loads the BPF objects with their maps pinned on a private bpffs;
// nothing is attached. The pin directory is returned for reloads.
func loadDatapath(t *testing.T, cfg loader.Config) (*loader.Datapath, string) {
	t.Helper()
	testenv.RequireRoot(t)
	if cfg.PinPath == "" {
		cfg.PinPath = filepath.Join(testenv.BPFFS(t), "servicepath")
	}
	dp, err := loader.Load(cfg)
	require.NoError(t, err, "load datapath")
	t.Cleanup(func() { dp.Close() })
	return dp, cfg.PinPath
}

// running is an agent whose Run goroutine the test controls.
type running struct {
	*Agent
	stop func()
}

func startAgent(t *testing.T, client kubernetes.Interface, m *maps.Maps, cfg Config) *running {
	t.Helper()
	if cfg.MinSyncPeriod == 0 {
		cfg.MinSyncPeriod = 20 * time.Millisecond
	}
	cfg.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	a, err := New(client, m, cfg)
	require.NoError(t, err, "new agent")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	r := &running{Agent: a}
	stopped := false
	r.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent Run: %v", err)
		}
	}
	t.Cleanup(r.stop)
	return r
}

// testWriter sends the agent's log to the test's log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// waitHealthy waits for readiness: the first full sync done, the last OK.
func (r *running) waitHealthy(t *testing.T) {
	t.Helper()
	waitFor(t, "agent ready", func() (bool, string) {
		ok, why := r.Ready()
		return ok, why
	})
}

// probe is what the healthz address answers on path.
func (r *running) probe(path string) (int, string) {
	rec := httptest.NewRecorder()
	r.HealthHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	return rec.Code, rec.Body.String()
}

func (r *running) status(path string) int {
	code, _ := r.probe(path)
	return code
}

// frontendView is one frontend as the maps hold it.
type frontendView struct {
	Name, PortName string
	// Backends are "addr:port", with " terminating" appended when so, sorted.
	Backends []string
}

// readMaps reads every frontend from the maps themselves, never through a
// second service.Manager (which would repair what it sees mid-update).
func readMaps(m *maps.Maps) (map[string]frontendView, error) {
	out := map[string]frontendView{}
	var k maps.ServiceKey
	var v maps.ServiceValue
	it := m.Services.Iterate()
	masters := map[maps.ServiceKey]maps.ServiceValue{}
	for it.Next(&k, &v) {
		if k.Slot == 0 {
			masters[k] = v
		}
	}
	if err := it.Err(); err != nil {
		return nil, err
	}
	for mk, mv := range masters {
		var meta maps.ServiceMeta
		if err := m.SvcMeta.Lookup(&mk, &meta); err != nil {
			return nil, fmt.Errorf("name of %v: %w", mk, err)
		}
		fv := frontendView{Backends: []string{}}
		fv.Name, fv.PortName = meta.Names()
		for s := uint16(1); s <= mv.Total; s++ {
			sk := mk
			sk.Slot = s
			var sv maps.ServiceValue
			if err := m.Services.Lookup(&sk, &sv); err != nil {
				return nil, fmt.Errorf("slot %d: %w", s, err)
			}
			var b maps.Backend
			if err := m.Backends.Lookup(&sv.BackendID, &b); err != nil {
				return nil, fmt.Errorf("backend %d: %w", sv.BackendID, err)
			}
			e := netip.AddrPortFrom(b.Addr.Netip(b.Family), b.Port.Uint16()).String()
			if int(s) > int(mv.Count) {
				e += " terminating"
			}
			fv.Backends = append(fv.Backends, e)
		}
		sort.Strings(fv.Backends)
		proto := map[uint8]string{6: "TCP", 17: "UDP"}[mk.Proto]
		out[fmt.Sprintf("%s/%s", netip.AddrPortFrom(mk.Addr.Netip(mk.Family), mk.Port.Uint16()), proto)] = fv
	}
	return out, nil
}

// ownedBy keeps the frontends of one Service.
func ownedBy(view map[string]frontendView, name string) map[string][]string {
	out := map[string][]string{}
	for fe, v := range view {
		if v.Name == name {
			out[fe] = v.Backends
		}
	}
	return out
}

// waitProgrammed waits until the maps hold exactly want for Service name:
// frontend ("ip:port/PROTO") to sorted backends.
func waitProgrammed(t *testing.T, m *maps.Maps, name string, want map[string][]string) {
	t.Helper()
	for _, b := range want {
		sort.Strings(b)
	}
	waitFor(t, fmt.Sprintf("Service %s programmed as %v", name, want), func() (bool, string) {
		view, err := readMaps(m)
		if err != nil {
			return false, err.Error()
		}
		got := ownedBy(view, name)
		if len(got) != len(want) {
			return false, fmt.Sprint(got)
		}
		for fe, b := range want {
			if !slices.Equal(got[fe], b) {
				return false, fmt.Sprint(got)
			}
		}
		return true, ""
	})
}

// rawMaps is every key and value of the service maps, byte for byte.
func rawMaps(t *testing.T, m *maps.Maps) map[string]string {
	t.Helper()
	out := map[string]string{}
	for name, mp := range map[string]*ebpf.Map{"services": m.Services, "backends": m.Backends, "meta": m.SvcMeta} {
		var k, v []byte
		it := mp.Iterate()
		for it.Next(&k, &v) {
			out[name+":"+hex.EncodeToString(k)] = hex.EncodeToString(v)
		}
		require.NoError(t, it.Err(), "iterate %s", name)
	}
	return out
}

// histogram reads a histogram's sample count and sum.
func histogram(t *testing.T, h prometheus.Histogram) (count, sum float64) {
	t.Helper()
	var m dto.Metric
	require.NoError(t, h.Write(&m), "read histogram")
	return float64(m.GetHistogram().GetSampleCount()), m.GetHistogram().GetSampleSum()
}

// syncCount is the syncs an agent ran: its sync duration histogram's count.
func syncCount(t *testing.T, a *running) float64 {
	count, _ := histogram(t, a.Metrics.SyncDuration)
	return count
}
