package agent

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/k8s"
)

var (
	v4 = discoveryv1.AddressTypeIPv4
	v6 = discoveryv1.AddressTypeIPv6
)

func TestServiceCreateUpdateDelete(t *testing.T) {
	k := newKube(t)
	dp, _ := loadDatapath(t, loader.DefaultConfig())
	a := startAgent(t, k.client, dp.Maps, Config{})
	ctx := context.Background()
	ip, _ := clusterIPs()

	svc := k.createService(t, clusterIPService("web", ip, "", svcPort("http", corev1.ProtocolTCP, 80)))
	es := k.createSlice(t, endpointSlice("web-1", "web", v4,
		[]discoveryv1.EndpointPort{slicePort("http", corev1.ProtocolTCP, 8080)},
		readyEP("10.1.0.1"), readyEP("10.1.0.2")))
	waitProgrammed(t, dp.Maps, k.name("web"), map[string][]string{
		ip + ":80/TCP": {"10.1.0.1:8080", "10.1.0.2:8080"},
	})
	a.waitHealthy(t)
	for _, path := range []string{"/livez", "/readyz", "/healthz"} {
		assert.Equal(t, http.StatusOK, a.status(path), "%s after the first full sync", path)
	}

	// A second port, matched to the slice's port by name.
	svc.Spec.Ports = append(svc.Spec.Ports, svcPort("dns", corev1.ProtocolUDP, 53))
	svc, err := k.client.CoreV1().Services(k.ns).Update(ctx, svc, metav1.UpdateOptions{})
	require.NoError(t, err, "add a port to the Service")
	es.Ports = append(es.Ports, slicePort("dns", corev1.ProtocolUDP, 5353))
	// As the EndpointSlice controller stamps it: the change behind this
	// slice happened 5 s ago.
	trigger := time.Now().Add(-5 * time.Second)
	es.Annotations = map[string]string{corev1.EndpointsLastChangeTriggerTime: trigger.Format(time.RFC3339Nano)}
	k.updateSlice(t, es)
	waitProgrammed(t, dp.Maps, k.name("web"), map[string][]string{
		ip + ":80/TCP": {"10.1.0.1:8080", "10.1.0.2:8080"},
		ip + ":53/UDP": {"10.1.0.1:5353", "10.1.0.2:5353"},
	})
	count, sum := histogram(t, a.Metrics.NetworkProgramming)
	assert.Equal(t, 1.0, count, "one change carried a trigger time")
	assert.GreaterOrEqual(t, sum, 5.0, "network programming counted from the trigger time")

	// A changed port number moves the frontend.
	svc.Spec.Ports[0].Port = 81
	_, err = k.client.CoreV1().Services(k.ns).Update(ctx, svc, metav1.UpdateOptions{})
	require.NoError(t, err, "change the Service's port")
	waitProgrammed(t, dp.Maps, k.name("web"), map[string][]string{
		ip + ":81/TCP": {"10.1.0.1:8080", "10.1.0.2:8080"},
		ip + ":53/UDP": {"10.1.0.1:5353", "10.1.0.2:5353"},
	})
	families, err := a.Metrics.Registry.Gather()
	require.NoError(t, err, "gather metrics")
	names := map[string]bool{}
	for _, f := range families {
		names[f.GetName()] = true
	}
	for _, n := range []string{"servicepath_sync_duration_seconds", "servicepath_sync_errors_total",
		"servicepath_sync_last_timestamp_seconds", "servicepath_sync_last_queued_timestamp_seconds",
		"servicepath_service_changes_total", "servicepath_service_changes_pending",
		"servicepath_endpoint_changes_total", "servicepath_endpoint_changes_pending",
		"servicepath_services_programmed", "servicepath_frontends_programmed", "servicepath_backends_programmed",
		"servicepath_datapath_packets_total", "servicepath_socket_operations_total", "servicepath_snat_port_allocations_total",
		"servicepath_map_entries", "servicepath_map_pressure"} {
		assert.True(t, names[n], "metric %s exported", n)
	}
	assert.False(t, names["servicepath_syncs_total"], "the sync count is the duration histogram's")
	view, err := readMaps(dp.Maps)
	require.NoError(t, err, "read maps")
	owners := map[string]bool{}
	for _, v := range view {
		owners[v.Name] = true
	}
	assert.Equal(t, float64(len(owners)), testutil.ToFloat64(a.Metrics.ServicesProgrammed), "Services programmed, as the maps name them")
	assert.Equal(t, float64(len(view)), testutil.ToFloat64(a.Metrics.FrontendsProgrammed), "frontends programmed, as the maps hold them")
	assert.Greater(t, len(view), len(owners), "web's two frontends are one Service")
	assert.Zero(t, testutil.ToFloat64(a.Metrics.ServiceChangesPending)+testutil.ToFloat64(a.Metrics.EndpointChangesPending),
		"nothing pending once programmed")
	assert.GreaterOrEqual(t, testutil.ToFloat64(a.Metrics.ServiceChanges), 3.0, "create and two updates of the Service counted")
	assert.GreaterOrEqual(t, testutil.ToFloat64(a.Metrics.EndpointChanges), 2.0, "the slice's create and update counted")
	assert.InDelta(t, float64(time.Now().Unix()), testutil.ToFloat64(a.Metrics.SyncLastTimestamp), 60, "last sync stamped")
	for _, f := range families {
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				switch f.GetName() {
				case "servicepath_datapath_packets_total":
					assert.False(t, strings.HasPrefix(l.GetValue(), "sock_") || strings.HasPrefix(l.GetValue(), "nat_retry"),
						"packet verdicts only: %s", l.GetValue())
				case "servicepath_socket_operations_total":
					assert.True(t, strings.HasPrefix(l.GetValue(), "sock_"), "socket calls only: %s", l.GetValue())
				}
			}
		}
	}

	require.NoError(t, k.client.CoreV1().Services(k.ns).Delete(ctx, "web", metav1.DeleteOptions{}), "delete the Service")
	waitProgrammed(t, dp.Maps, k.name("web"), map[string][]string{})
}

func TestEndpointChanges(t *testing.T) {
	k := newKube(t)
	dp, _ := loadDatapath(t, loader.DefaultConfig())
	startAgent(t, k.client, dp.Maps, Config{})
	ip, _ := clusterIPs()
	fe := ip + ":80/TCP"
	k.createService(t, clusterIPService("scale", ip, "", svcPort("", corev1.ProtocolTCP, 80)))
	ports := []discoveryv1.EndpointPort{slicePort("", corev1.ProtocolTCP, 8080)}
	es := k.createSlice(t, endpointSlice("scale-1", "scale", v4, ports, readyEP("10.2.0.1")))
	waitProgrammed(t, dp.Maps, k.name("scale"), map[string][]string{fe: {"10.2.0.1:8080"}})

	// Up to five, then down to two.
	var want []string
	es.Endpoints = nil
	for i := 1; i <= 5; i++ {
		es.Endpoints = append(es.Endpoints, readyEP(fmt.Sprintf("10.2.0.%d", i)))
		want = append(want, fmt.Sprintf("10.2.0.%d:8080", i))
	}
	es = k.updateSlice(t, es)
	waitProgrammed(t, dp.Maps, k.name("scale"), map[string][]string{fe: want})
	es.Endpoints = es.Endpoints[:2]
	es = k.updateSlice(t, es)
	waitProgrammed(t, dp.Maps, k.name("scale"), map[string][]string{fe: {"10.2.0.1:8080", "10.2.0.2:8080"}})

	// Not ready and not serving: gone. Ready again: back.
	es.Endpoints[1].Conditions = discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(false)}
	es = k.updateSlice(t, es)
	waitProgrammed(t, dp.Maps, k.name("scale"), map[string][]string{fe: {"10.2.0.1:8080"}})
	es.Endpoints[1].Conditions = discoveryv1.EndpointConditions{Ready: ptr(true)}
	es = k.updateSlice(t, es)
	waitProgrammed(t, dp.Maps, k.name("scale"), map[string][]string{fe: {"10.2.0.1:8080", "10.2.0.2:8080"}})

	// Terminating but serving: keeps its flows, gets no new ones.
	es.Endpoints[0].Conditions = discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(true), Terminating: ptr(true)}
	es = k.updateSlice(t, es)
	waitProgrammed(t, dp.Maps, k.name("scale"), map[string][]string{fe: {"10.2.0.1:8080 terminating", "10.2.0.2:8080"}})
	// Terminating and no longer serving: gone.
	es.Endpoints[0].Conditions.Serving = ptr(false)
	k.updateSlice(t, es)
	waitProgrammed(t, dp.Maps, k.name("scale"), map[string][]string{fe: {"10.2.0.2:8080"}})
}

func TestSeveralSlicesDualStack(t *testing.T) {
	k := newKube(t)
	dp, _ := loadDatapath(t, loader.DefaultConfig())
	startAgent(t, k.client, dp.Maps, Config{})
	ip4, ip6 := clusterIPs()
	k.createService(t, clusterIPService("ds", ip4, ip6, svcPort("http", corev1.ProtocolTCP, 80)))
	http := []discoveryv1.EndpointPort{slicePort("http", corev1.ProtocolTCP, 8080)}
	k.createSlice(t, endpointSlice("ds-a", "ds", v4, http, readyEP("10.3.0.1"), readyEP("10.3.0.2")))
	b := k.createSlice(t, endpointSlice("ds-b", "ds", v4, http, readyEP("10.3.0.3")))
	k.createSlice(t, endpointSlice("ds-c", "ds", v6, http, readyEP("fd00:3::1")))
	// A port of another name serves no port of this Service.
	k.createSlice(t, endpointSlice("ds-d", "ds", v4,
		[]discoveryv1.EndpointPort{slicePort("metrics", corev1.ProtocolTCP, 9090)}, readyEP("10.3.0.9")))
	waitProgrammed(t, dp.Maps, k.name("ds"), map[string][]string{
		ip4 + ":80/TCP":        {"10.3.0.1:8080", "10.3.0.2:8080", "10.3.0.3:8080"},
		"[" + ip6 + "]:80/TCP": {"[fd00:3::1]:8080"},
	})

	require.NoError(t, k.client.DiscoveryV1().EndpointSlices(k.ns).Delete(context.Background(), b.Name, metav1.DeleteOptions{}),
		"delete one IPv4 slice")
	waitProgrammed(t, dp.Maps, k.name("ds"), map[string][]string{
		ip4 + ":80/TCP":        {"10.3.0.1:8080", "10.3.0.2:8080"},
		"[" + ip6 + "]:80/TCP": {"[fd00:3::1]:8080"},
	})
}

func TestSkippedAndUnsupported(t *testing.T) {
	k := newKube(t)
	dp, _ := loadDatapath(t, loader.DefaultConfig())
	a := startAgent(t, k.client, dp.Maps, Config{})
	ctx := context.Background()
	http := []discoveryv1.EndpointPort{slicePort("http", corev1.ProtocolTCP, 8080)}

	headless := clusterIPService("headless", corev1.ClusterIPNone, "", svcPort("http", corev1.ProtocolTCP, 80))
	k.createService(t, headless)
	k.createSlice(t, endpointSlice("headless-1", "headless", v4, http, readyEP("10.4.0.1")))
	k.createService(t, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "extname"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: "example.com"}})
	ipOther, _ := clusterIPs()
	other := clusterIPService("other-proxy", ipOther, "", svcPort("http", corev1.ProtocolTCP, 80))
	other.Labels = map[string]string{k8s.LabelServiceProxyName: "someone-else"}
	other = k.createService(t, other)
	k.createSlice(t, endpointSlice("other-proxy-1", "other-proxy", v4, http, readyEP("10.4.0.2")))
	// SCTP is reported, and the Service's TCP port still programmed.
	ipMixed, _ := clusterIPs()
	k.createService(t, clusterIPService("mixed", ipMixed, "",
		svcPort("http", corev1.ProtocolTCP, 80), svcPort("sctp", corev1.ProtocolSCTP, 9999)))
	k.createSlice(t, endpointSlice("mixed-1", "mixed", v4,
		append(http, slicePort("sctp", corev1.ProtocolSCTP, 9999)), readyEP("10.4.0.3")))

	// Created last: once it is programmed, the others were seen.
	waitProgrammed(t, dp.Maps, k.name("mixed"), map[string][]string{ipMixed + ":80/TCP": {"10.4.0.3:8080"}})
	view, err := readMaps(dp.Maps)
	require.NoError(t, err, "read maps")
	for _, name := range []string{"headless", "extname", "other-proxy"} {
		assert.Empty(t, ownedBy(view, k.name(name)), "Service %s gets no frontend", name)
	}
	assert.Equal(t, 1.0, testutil.ToFloat64(a.Metrics.UnsupportedPorts), "one unsupported port counted")
	waitFor(t, "an UnsupportedProtocol Event on Service mixed", func() (bool, string) {
		evs, err := k.client.CoreV1().Events(k.ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=mixed"})
		if err != nil {
			return false, err.Error()
		}
		for _, e := range evs.Items {
			if e.Reason == "UnsupportedProtocol" && e.Type == corev1.EventTypeWarning {
				return true, ""
			}
		}
		return false, fmt.Sprintf("%d events", len(evs.Items))
	})

	// The label taken off: servicepath's to program; put back: removed.
	delete(other.Labels, k8s.LabelServiceProxyName)
	other, err = k.client.CoreV1().Services(k.ns).Update(ctx, other, metav1.UpdateOptions{})
	require.NoError(t, err, "remove the service-proxy-name label")
	waitProgrammed(t, dp.Maps, k.name("other-proxy"), map[string][]string{ipOther + ":80/TCP": {"10.4.0.2:8080"}})
	other.Labels = map[string]string{k8s.LabelServiceProxyName: "someone-else"}
	_, err = k.client.CoreV1().Services(k.ns).Update(ctx, other, metav1.UpdateOptions{})
	require.NoError(t, err, "put the service-proxy-name label back")
	waitProgrammed(t, dp.Maps, k.name("other-proxy"), map[string][]string{})
}

func TestInternalTrafficPolicyLocal(t *testing.T) {
	k := newKube(t)
	dp, _ := loadDatapath(t, loader.DefaultConfig())
	startAgent(t, k.client, dp.Maps, Config{NodeName: "node-a"})
	ip, _ := clusterIPs()
	svc := clusterIPService("local", ip, "", svcPort("", corev1.ProtocolTCP, 80))
	svc.Spec.InternalTrafficPolicy = ptr(corev1.ServiceInternalTrafficPolicyLocal)
	k.createService(t, svc)
	onNode := func(addr, node string) discoveryv1.Endpoint {
		e := readyEP(addr)
		e.NodeName = &node
		return e
	}
	k.createSlice(t, endpointSlice("local-1", "local", v4, []discoveryv1.EndpointPort{slicePort("", corev1.ProtocolTCP, 8080)},
		onNode("10.5.0.1", "node-a"), onNode("10.5.0.2", "node-b")))
	waitProgrammed(t, dp.Maps, k.name("local"), map[string][]string{ip + ":80/TCP": {"10.5.0.1:8080"}})
}

func TestBurstCoalesced(t *testing.T) {
	k := newKube(t)
	dp, _ := loadDatapath(t, loader.DefaultConfig())
	a := startAgent(t, k.client, dp.Maps, Config{MinSyncPeriod: defaultMinSyncPeriod})
	ip, _ := clusterIPs()
	fe := ip + ":80/TCP"
	k.createService(t, clusterIPService("burst", ip, "", svcPort("", corev1.ProtocolTCP, 80)))
	es := k.createSlice(t, endpointSlice("burst-1", "burst", v4,
		[]discoveryv1.EndpointPort{slicePort("", corev1.ProtocolTCP, 8080)}, readyEP("10.6.0.1")))
	waitProgrammed(t, dp.Maps, k.name("burst"), map[string][]string{fe: {"10.6.0.1:8080"}})
	a.waitHealthy(t)

	// 1,000 changes: endpoint i is flipped between ready and not serving.
	const changes = 1000
	es.Endpoints = nil
	for i := range 10 {
		es.Endpoints = append(es.Endpoints, readyEP(fmt.Sprintf("10.6.1.%d", i+1)))
	}
	syncsBefore := syncCount(t, a)
	for i := range changes {
		c := &es.Endpoints[i%10].Conditions
		if *c.Ready {
			*c = discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(false)}
		} else {
			*c = discoveryv1.EndpointConditions{Ready: ptr(true)}
		}
		es = k.updateSlice(t, es)
	}
	// Each endpoint flipped 100 times: ready again at the end.
	var want []string
	for i := range 10 {
		want = append(want, fmt.Sprintf("10.6.1.%d:8080", i+1))
	}
	waitProgrammed(t, dp.Maps, k.name("burst"), map[string][]string{fe: want})
	syncs := syncCount(t, a) - syncsBefore
	t.Logf("%d endpoint changes programmed in %.0f syncs", changes, syncs)
	assert.Less(t, syncs, float64(changes)/10, "1,000 changes coalesced into few syncs")
	assert.Zero(t, testutil.ToFloat64(a.Metrics.SyncErrors), "no sync failed")
}

// TestFailedSyncRetriedAndHealth: a sync that keeps failing makes the agent
// unready, and unhealthy for load balancers once its change has waited
// longer than the timeout, but never dead: restarting would not help.
func TestFailedSyncRetriedAndHealth(t *testing.T) {
	k := newKube(t)
	cfg := loader.DefaultConfig()
	cfg.BackendMapSize = 8
	dp, _ := loadDatapath(t, cfg)
	ip, _ := clusterIPs()
	fe := ip + ":80/TCP"
	k.createService(t, clusterIPService("full", ip, "", svcPort("", corev1.ProtocolTCP, 80)))
	ports := []discoveryv1.EndpointPort{slicePort("", corev1.ProtocolTCP, 8080)}
	eps := func(n int) []discoveryv1.Endpoint {
		var out []discoveryv1.Endpoint
		for i := range n {
			out = append(out, readyEP(fmt.Sprintf("10.7.0.%d", i+1)))
		}
		return out
	}
	es := k.createSlice(t, endpointSlice("full-1", "full", v4, ports, eps(4)...))

	a := startAgent(t, k.client, dp.Maps, Config{HealthzTimeout: time.Second})
	assert.Equal(t, http.StatusServiceUnavailable, a.status("/readyz"), "/readyz before the first full sync")
	waitProgrammed(t, dp.Maps, k.name("full"), map[string][]string{fe: {"10.7.0.1:8080", "10.7.0.2:8080", "10.7.0.3:8080", "10.7.0.4:8080"}})
	a.waitHealthy(t)
	before := rawMaps(t, dp.Maps)

	// Twelve backends do not fit a map of eight: refused whole, retried.
	es.Endpoints = eps(12)
	es = k.updateSlice(t, es)
	waitFor(t, "/readyz failing after a failed sync", func() (bool, string) {
		code, body := a.probe("/readyz")
		return code == http.StatusServiceUnavailable, fmt.Sprint(code, body)
	})
	waitFor(t, "the sync retried", func() (bool, string) {
		n := testutil.ToFloat64(a.Metrics.SyncErrors)
		return n >= 2, fmt.Sprintf("%v sync errors", n)
	})
	waitFor(t, "/healthz failing once the change waited longer than the timeout", func() (bool, string) {
		code, body := a.probe("/healthz")
		return code == http.StatusServiceUnavailable, fmt.Sprint(code, body)
	})
	code, body := a.probe("/livez")
	assert.Equal(t, http.StatusOK, code, "/livez while syncs fail and are retried: %s", body)
	assert.Equal(t, before, rawMaps(t, dp.Maps), "a refused Service leaves the maps exactly as they were")

	// Six fit: programmed, healthy again.
	es.Endpoints = eps(6)
	k.updateSlice(t, es)
	waitProgrammed(t, dp.Maps, k.name("full"), map[string][]string{fe: {"10.7.0.1:8080", "10.7.0.2:8080",
		"10.7.0.3:8080", "10.7.0.4:8080", "10.7.0.5:8080", "10.7.0.6:8080"}})
	a.waitHealthy(t)
	for _, path := range []string{"/livez", "/readyz", "/healthz"} {
		assert.Equal(t, http.StatusOK, a.status(path), "%s after the retry succeeded", path)
	}
}

func TestAPIServerRestart(t *testing.T) {
	k := newKube(t)
	dp, _ := loadDatapath(t, loader.DefaultConfig())
	a := startAgent(t, k.client, dp.Maps, Config{})
	ip, _ := clusterIPs()
	ports := []discoveryv1.EndpointPort{slicePort("", corev1.ProtocolTCP, 8080)}
	k.createService(t, clusterIPService("before", ip, "", svcPort("", corev1.ProtocolTCP, 80)))
	k.createSlice(t, endpointSlice("before-1", "before", v4, ports, readyEP("10.8.0.1")))
	waitProgrammed(t, dp.Maps, k.name("before"), map[string][]string{ip + ":80/TCP": {"10.8.0.1:8080"}})

	require.NoError(t, k.srv.StopAPIServer(), "stop kube-apiserver")
	require.NoError(t, k.srv.StartAPIServer(), "start kube-apiserver again")

	// The agent's watches reconnect: a change made now reaches the maps.
	ip2, _ := clusterIPs()
	k.createService(t, clusterIPService("after", ip2, "", svcPort("", corev1.ProtocolTCP, 80)))
	k.createSlice(t, endpointSlice("after-1", "after", v4, ports, readyEP("10.8.0.2")))
	waitProgrammed(t, dp.Maps, k.name("after"), map[string][]string{ip2 + ":80/TCP": {"10.8.0.2:8080"}})
	waitProgrammed(t, dp.Maps, k.name("before"), map[string][]string{ip + ":80/TCP": {"10.8.0.1:8080"}})
	ok, why := a.Ready()
	assert.True(t, ok, "agent ready across the API server restart: %s", why)
}

// TestOneFailingServiceDoesNotHoldBackTheRest: a sync applies its Services
// together (batched in the maps); one the manager refuses is found alone,
// retried, and the others are programmed in the same sync regardless.
func TestOneFailingServiceDoesNotHoldBackTheRest(t *testing.T) {
	k := newKube(t)
	cfg := loader.DefaultConfig()
	cfg.BackendMapSize = 256
	dp, _ := loadDatapath(t, cfg)
	ports := []discoveryv1.EndpointPort{slicePort("", corev1.ProtocolTCP, 8080)}
	add := func(name string, backends int) map[string][]string {
		ip, _ := clusterIPs()
		k.createService(t, clusterIPService(name, ip, "", svcPort("", corev1.ProtocolTCP, 80)))
		var eps []discoveryv1.Endpoint
		var want []string
		for i := range backends {
			addr := fmt.Sprintf("10.9.%d.%d", i/250, i%250+1)
			eps = append(eps, readyEP(addr))
			want = append(want, addr+":8080")
		}
		k.createSlice(t, endpointSlice(name+"-1", name, v4, ports, eps...))
		return map[string][]string{ip + ":80/TCP": want}
	}
	// More than the manager writes batched, all in the first full sync,
	// and one Service with more backends than the map has room for.
	want := map[string]map[string][]string{}
	for i := range 100 {
		name := fmt.Sprintf("many-%03d", i)
		want[k.name(name)] = add(name, 1)
	}
	add("huge", 300)

	a := startAgent(t, k.client, dp.Maps, Config{})
	for name, fes := range want {
		waitProgrammed(t, dp.Maps, name, fes)
	}
	waitFor(t, "huge refused and retried", func() (bool, string) {
		n := testutil.ToFloat64(a.Metrics.SyncErrors)
		return n >= 2, fmt.Sprintf("%v sync errors", n)
	})
	view, err := readMaps(dp.Maps)
	require.NoError(t, err, "read maps")
	assert.Empty(t, ownedBy(view, k.name("huge")), "huge refused whole")
	// The API server's own default/kubernetes is among them.
	assert.Equal(t, testutil.ToFloat64(a.Metrics.ServicesProgrammed), testutil.ToFloat64(a.Metrics.ServiceApplies),
		"each programmed Service counted once, the refused one never")
	ok, why := a.Ready()
	assert.False(t, ok, "not ready while a Service is refused")
	assert.Contains(t, why, k.name("huge"), "the refused Service named")

	require.NoError(t, k.client.CoreV1().Services(k.ns).Delete(context.Background(), "huge", metav1.DeleteOptions{}), "delete huge")
	a.waitHealthy(t)
}

// TestFrontendConflictOldestKeeps: two Services on one external IP and
// port. The older keeps the frontend, the newer is programmed without it
// and told by an Event, and the agent stays ready; once the older is gone
// the newer gets it.
func TestFrontendConflictOldestKeeps(t *testing.T) {
	k := newKube(t)
	dp, _ := loadDatapath(t, loader.DefaultConfig())
	ports := []discoveryv1.EndpointPort{slicePort("", corev1.ProtocolTCP, 8080)}
	const external = "203.0.113.200"
	add := func(name, backend string) string {
		ip, _ := clusterIPs()
		svc := clusterIPService(name, ip, "", svcPort("", corev1.ProtocolTCP, 80))
		svc.Spec.ExternalIPs = []string{external}
		k.createService(t, svc)
		k.createSlice(t, endpointSlice(name+"-1", name, v4, ports, readyEP(backend)))
		return ip
	}
	a := startAgent(t, k.client, dp.Maps, Config{})
	// Named so that name order and age disagree; creation times have
	// whole seconds.
	oldIP := add("clash-z", "10.9.0.1")
	time.Sleep(1100 * time.Millisecond)
	newIP := add("clash-a", "10.9.0.2")

	waitProgrammed(t, dp.Maps, k.name("clash-z"), map[string][]string{
		oldIP + ":80/TCP": {"10.9.0.1:8080"}, external + ":80/TCP": {"10.9.0.1:8080"}})
	waitProgrammed(t, dp.Maps, k.name("clash-a"), map[string][]string{newIP + ":80/TCP": {"10.9.0.2:8080"}})
	waitFor(t, "a FrontendInUse Event on clash-a", func() (bool, string) {
		evs, err := k.client.CoreV1().Events(k.ns).List(context.Background(), metav1.ListOptions{
			FieldSelector: "involvedObject.name=clash-a,reason=FrontendInUse"})
		if err != nil || len(evs.Items) == 0 {
			return false, fmt.Sprint(err)
		}
		return strings.Contains(evs.Items[0].Message, k.name("clash-z")), evs.Items[0].Message
	})
	a.waitHealthy(t)
	assert.Zero(t, testutil.ToFloat64(a.Metrics.SyncErrors), "no sync failed over the conflict")

	require.NoError(t, k.client.CoreV1().Services(k.ns).Delete(context.Background(), "clash-z", metav1.DeleteOptions{}), "delete clash-z")
	waitProgrammed(t, dp.Maps, k.name("clash-a"), map[string][]string{
		newIP + ":80/TCP": {"10.9.0.2:8080"}, external + ":80/TCP": {"10.9.0.2:8080"}})
}
