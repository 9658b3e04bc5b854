package k8s

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/servicepath/servicepath/datapath/service"
)

// hinted is e with topology hints for zones and nodes.
func hinted(e discoveryv1.Endpoint, zones []string, nodes ...string) discoveryv1.Endpoint {
	h := &discoveryv1.EndpointHints{}
	for _, z := range zones {
		h.ForZones = append(h.ForZones, discoveryv1.ForZone{Name: z})
	}
	for _, n := range nodes {
		h.ForNodes = append(h.ForNodes, discoveryv1.ForNode{Name: n})
	}
	e.Hints = h
	return e
}

func zones(z ...string) []string { return z }

// TestTopology mirrors kube-proxy's TestCategorizeEndpoints
// (pkg/proxy/topology_test.go) on a NodePort Service translated for
// node-a in zone-a: its cluster IP, its NodePort, and the NodePort's
// in-cluster entry under externalTrafficPolicy Local. kube-proxy's
// "cluster endpoints" are the frontends under a Cluster policy, its
// "local endpoints" those under Local. Where kube-proxy falls back to
// serving terminating endpoints, the datapath gets them as Terminating
// and gives them new flows only while no backend is Active; they are
// listed beside the ready ones here, as they keep their existing flows.
func TestTopology(t *testing.T) {
	local := func(e discoveryv1.Endpoint) discoveryv1.Endpoint { return onNode(e, "node-a") }
	remote := func(e discoveryv1.Endpoint) discoveryv1.Endpoint { return onNode(e, "node-b") }
	notReady := func(addr string) discoveryv1.Endpoint { return ep(addr, ptr(false), ptr(false), nil) }
	terminating := func(addr string) discoveryv1.Endpoint { return ep(addr, ptr(false), ptr(true), ptr(true)) }
	bes := func(state service.BackendState, addrs ...string) []service.Backend {
		out := []service.Backend{}
		for _, a := range addrs {
			out = append(out, be(a+":8080", state))
		}
		return out
	}
	with := func(a, b []service.Backend) []service.Backend { return append(a, b...) }
	four := func(z3, z4, z5, z6 []string) []discoveryv1.Endpoint {
		return []discoveryv1.Endpoint{hinted(readyEP("10.1.2.3"), z3), hinted(readyEP("10.1.2.4"), z4),
			hinted(readyEP("10.1.2.5"), z5), hinted(readyEP("10.1.2.6"), z6)}
	}
	byNode := func(drop int) []discoveryv1.Endpoint {
		eps := []discoveryv1.Endpoint{hinted(readyEP("10.1.2.3"), zones("zone-a"), "node-a"),
			hinted(readyEP("10.1.2.4"), zones("zone-b"), "node-b"),
			hinted(readyEP("10.1.2.5"), zones("zone-c"), "node-c"),
			hinted(readyEP("10.1.2.6"), zones("zone-a"), "node-d")}
		if drop >= 0 {
			eps[drop].Hints = nil
		}
		return eps
	}
	byZone := four(zones("zone-a"), zones("zone-b"), zones("zone-c"), zones("zone-a"))
	all4 := bes(A, "10.1.2.3", "10.1.2.4", "10.1.2.5", "10.1.2.6")
	zoneA := bes(A, "10.1.2.3", "10.1.2.6")

	tests := []struct {
		name     string
		node     string // default node-a
		zone     string // default zone-a; "-" for none
		itp, etp bool   // Local
		eps      []discoveryv1.Endpoint
		// clusterIP, nodePort and inCluster are the frontends' backends;
		// inCluster only under externalTrafficPolicy Local.
		clusterIP, nodePort, inCluster []service.Backend
		// itpDrop, etpDrop: the cluster IP, the NodePort drops rather than
		// rejects without backends; the latter has an in-cluster entry.
		itpDrop, etpDrop bool
	}{
		{name: "every endpoint hinted, some for the node's zone: those",
			eps: byZone, clusterIP: zoneA, nodePort: zoneA},
		{name: "eTP Local: topology ignored for local endpoints", etp: true, etpDrop: true,
			eps:       []discoveryv1.Endpoint{local(byZone[0]), local(byZone[1]), remote(byZone[2]), remote(byZone[3])},
			clusterIP: zoneA, nodePort: bes(A, "10.1.2.3", "10.1.2.4"), inCluster: zoneA},
		{name: "iTP Local: topology ignored for local endpoints", itp: true,
			eps:       []discoveryv1.Endpoint{local(byZone[0]), local(byZone[1]), remote(byZone[2]), remote(byZone[3])},
			clusterIP: bes(A, "10.1.2.3", "10.1.2.4"), nodePort: zoneA, itpDrop: true},
		{name: "node without a zone label", zone: "-",
			eps: byZone[:1], clusterIP: bes(A, "10.1.2.3"), nodePort: bes(A, "10.1.2.3")},
		{name: "node in a zone no endpoint is hinted for: no filtering", zone: "zone-b",
			eps:       []discoveryv1.Endpoint{byZone[0], byZone[2]},
			clusterIP: bes(A, "10.1.2.3", "10.1.2.5"), nodePort: bes(A, "10.1.2.3", "10.1.2.5")},
		{name: "unready endpoint", eps: []discoveryv1.Endpoint{byZone[0], byZone[1], byZone[2],
			hinted(notReady("10.1.2.6"), zones("zone-a"))},
			clusterIP: bes(A, "10.1.2.3"), nodePort: bes(A, "10.1.2.3")},
		{name: "only unready endpoints in the node's zone: no filtering", eps: []discoveryv1.Endpoint{
			hinted(notReady("10.1.2.3"), zones("zone-a")), byZone[1], byZone[2], hinted(notReady("10.1.2.6"), zones("zone-a"))},
			clusterIP: bes(A, "10.1.2.4", "10.1.2.5"), nodePort: bes(A, "10.1.2.4", "10.1.2.5")},
		{name: "an endpoint without hints: no filtering", eps: four(zones("zone-a"), zones("zone-b"), nil, zones("zone-a")),
			clusterIP: all4, nodePort: all4},
		{name: "several hints per endpoint: every one with the zone", zone: "zone-c",
			eps:       four(zones("zone-a", "zone-b", "zone-c"), zones("zone-b", "zone-c"), zones("zone-b", "zone-d"), zones("zone-c")),
			clusterIP: bes(A, "10.1.2.3", "10.1.2.4", "10.1.2.6"), nodePort: bes(A, "10.1.2.3", "10.1.2.4", "10.1.2.6")},
		{name: "PreferSameNode: the endpoints hinted for this node", eps: byNode(-1),
			clusterIP: bes(A, "10.1.2.3"), nodePort: bes(A, "10.1.2.3")},
		{name: "PreferSameNode ignored when an endpoint has no hints", eps: byNode(1),
			clusterIP: all4, nodePort: all4},
		{name: "PreferSameNode falls back to the zone without an endpoint for this node", node: "node-z",
			eps: byNode(-1), clusterIP: zoneA, nodePort: zoneA},
		{name: "terminating endpoints serve only without ready ones, whatever the topology", eps: []discoveryv1.Endpoint{
			hinted(terminating("10.1.2.3"), zones("zone-b")), hinted(terminating("10.1.2.4"), zones("zone-b"))},
			clusterIP: bes(T, "10.1.2.3", "10.1.2.4"), nodePort: bes(T, "10.1.2.3", "10.1.2.4")},
		{name: "a ready endpoint for the zone, terminating ones elsewhere", eps: []discoveryv1.Endpoint{
			byZone[0], hinted(terminating("10.1.2.4"), zones("zone-b"))},
			clusterIP: with(bes(A, "10.1.2.3"), bes(T, "10.1.2.4")), nodePort: with(bes(A, "10.1.2.3"), bes(T, "10.1.2.4"))},
		{name: "iTP Local without endpoints anywhere: rejects", itp: true},
		{name: "eTP Local without endpoints anywhere: rejects, one entry for everyone", etp: true,
			eps: []discoveryv1.Endpoint{remote(notReady("10.0.0.0"))}},
		{name: "iTP Local, every endpoint remote: drops", itp: true,
			eps:       []discoveryv1.Endpoint{remote(readyEP("10.0.0.0")), remote(readyEP("10.0.0.1"))},
			clusterIP: nil, nodePort: bes(A, "10.0.0.0", "10.0.0.1"), itpDrop: true},
		{name: "iTP Local, every endpoint local", itp: true,
			eps:       []discoveryv1.Endpoint{local(readyEP("10.0.0.0")), local(readyEP("10.0.0.1"))},
			clusterIP: bes(A, "10.0.0.0", "10.0.0.1"), nodePort: bes(A, "10.0.0.0", "10.0.0.1"), itpDrop: true},
		{name: "iTP Local, some endpoints local", itp: true,
			eps:       []discoveryv1.Endpoint{local(readyEP("10.0.0.0")), remote(readyEP("10.0.0.1"))},
			clusterIP: bes(A, "10.0.0.0"), nodePort: bes(A, "10.0.0.0", "10.0.0.1"), itpDrop: true},
		{name: "Cluster, no endpoint ready", eps: []discoveryv1.Endpoint{notReady("10.0.0.0"), notReady("10.0.0.1")}},
		{name: "iTP Local, eTP Local, some endpoints local", itp: true, etp: true, etpDrop: true,
			eps:       []discoveryv1.Endpoint{local(readyEP("10.0.0.0")), remote(readyEP("10.0.0.1"))},
			clusterIP: bes(A, "10.0.0.0"), nodePort: bes(A, "10.0.0.0"), inCluster: bes(A, "10.0.0.0", "10.0.0.1"), itpDrop: true},
		{name: "iTP Local, eTP Local, every endpoint remote", itp: true, etp: true, etpDrop: true,
			eps:      []discoveryv1.Endpoint{remote(readyEP("10.0.0.0")), remote(readyEP("10.0.0.1"))},
			nodePort: nil, inCluster: bes(A, "10.0.0.0", "10.0.0.1"), itpDrop: true},
		{name: "iTP Local, eTP Local, every endpoint remote and terminating: drops", itp: true, etp: true, etpDrop: true,
			eps:       []discoveryv1.Endpoint{remote(terminating("10.0.0.0")), remote(terminating("10.0.0.1"))},
			inCluster: bes(T, "10.0.0.0", "10.0.0.1"), itpDrop: true},
		{name: "iTP Cluster, eTP Local, with terminating endpoints", etp: true, etpDrop: true, eps: []discoveryv1.Endpoint{
			remote(readyEP("10.0.0.0")), local(notReady("10.0.0.1")), local(terminating("10.0.0.2")), remote(terminating("10.0.0.3"))},
			clusterIP: with(bes(A, "10.0.0.0"), bes(T, "10.0.0.2", "10.0.0.3")), nodePort: bes(T, "10.0.0.2"),
			inCluster: with(bes(A, "10.0.0.0"), bes(T, "10.0.0.2", "10.0.0.3"))},
		{name: "conflicting topology and localness", etp: true, etpDrop: true, eps: []discoveryv1.Endpoint{
			local(hinted(readyEP("10.0.0.0"), zones("zone-a"))), local(hinted(readyEP("10.0.0.1"), zones("zone-b"))),
			remote(hinted(readyEP("10.0.0.2"), zones("zone-a"))), remote(hinted(readyEP("10.0.0.3"), zones("zone-b")))},
			clusterIP: bes(A, "10.0.0.0", "10.0.0.2"), nodePort: bes(A, "10.0.0.0", "10.0.0.1"), inCluster: bes(A, "10.0.0.0", "10.0.0.2")},
		{name: "a zone without a node name (manifests): zone hints, policies as Cluster", node: "-", itp: true, etp: true,
			eps: []discoveryv1.Endpoint{local(byZone[0]), remote(byZone[1]), remote(byZone[3])}, clusterIP: zoneA, nodePort: zoneA},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := Options{NodeName: orDefault(tt.node, "node-a"), Zone: orDefault(tt.zone, "zone-a")}
			s := svc("web", []string{"10.96.0.1"}, corev1.ServicePort{Name: "http", Port: 80, NodePort: 30080})
			s.Spec.Type = corev1.ServiceTypeNodePort
			if tt.itp {
				s.Spec.InternalTrafficPolicy = ptr(corev1.ServiceInternalTrafficPolicyLocal)
			}
			if tt.etp {
				s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
			}
			res, err := TranslateWith(opts, []*corev1.Service{s},
				[]*discoveryv1.EndpointSlice{eslice("web-1", "web", discoveryv1.AddressTypeIPv4, httpEP, tt.eps...)})
			require.NoError(t, err, "translate")
			got := byKind(res)
			want := map[string][]service.Backend{"ClusterIP 10.96.0.1": tt.clusterIP, "NodePort 0.0.0.0": tt.nodePort}
			if tt.etpDrop {
				want["NodePort 0.0.0.0 in-cluster"] = tt.inCluster
			}
			require.Len(t, got, len(want), "frontends: %v", got)
			for k, w := range want {
				assert.ElementsMatch(t, w, got[k].Backends, "%s", k)
			}
			assert.Equal(t, tt.itpDrop, got["ClusterIP 10.96.0.1"].InternalLocal, "the cluster IP drops without backends")
			assert.Equal(t, tt.etpDrop, got["NodePort 0.0.0.0"].ExternalLocal, "the NodePort drops without backends")
		})
	}
}

// orDefault is def for a field a case left empty, and none for "-".
func orDefault(given, def string) string {
	switch given {
	case "":
		return def
	case "-":
		return ""
	}
	return given
}
