package agent

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/servicepath/servicepath/datapath/loader"
)

// TestTopologyFollowsNodeZone runs the agent on a fake clientset: a
// Service's zone hints are honoured for the zone its Node is labelled
// with, and relabelling the Node reprograms the Service for the new zone.
func TestTopologyFollowsNodeZone(t *testing.T) {
	dp, _ := loadDatapath(t, loader.DefaultConfig())
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a", Labels: map[string]string{corev1.LabelTopologyZone: "zone-a"}}}
	client := fake.NewClientset(node)
	startAgent(t, client, dp.Maps, Config{NodeName: "node-a", SyncPeriod: time.Hour})
	ctx := t.Context()
	const ns = "shop"
	svc := clusterIPService("web", "10.96.8.1", "", svcPort("http", corev1.ProtocolTCP, 80))
	svc.Namespace = ns
	svc.Spec.TrafficDistribution = ptr(corev1.ServiceTrafficDistributionPreferClose)
	_, err := client.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{})
	require.NoError(t, err, "create Service")
	inZone := func(addr, zone string) discoveryv1.Endpoint {
		e := readyEP(addr)
		e.Zone = &zone
		e.Hints = &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: zone}}}
		return e
	}
	es := endpointSlice("web-1", "web", v4, []discoveryv1.EndpointPort{slicePort("http", corev1.ProtocolTCP, 8080)},
		inZone("10.8.0.1", "zone-a"), inZone("10.8.0.2", "zone-b"), inZone("10.8.0.3", "zone-a"))
	es.Namespace = ns
	_, err = client.DiscoveryV1().EndpointSlices(ns).Create(ctx, es, metav1.CreateOptions{})
	require.NoError(t, err, "create EndpointSlice")
	waitProgrammed(t, dp.Maps, ns+"/web", map[string][]string{"10.96.8.1:80/TCP": {"10.8.0.1:8080", "10.8.0.3:8080"}})

	node.Labels[corev1.LabelTopologyZone] = "zone-b"
	_, err = client.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{})
	require.NoError(t, err, "relabel node-a")
	waitProgrammed(t, dp.Maps, ns+"/web", map[string][]string{"10.96.8.1:80/TCP": {"10.8.0.2:8080"}})

	delete(node.Labels, corev1.LabelTopologyZone)
	_, err = client.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{})
	require.NoError(t, err, "unlabel node-a")
	waitProgrammed(t, dp.Maps, ns+"/web", map[string][]string{"10.96.8.1:80/TCP": {"10.8.0.1:8080", "10.8.0.2:8080", "10.8.0.3:8080"}})
}
