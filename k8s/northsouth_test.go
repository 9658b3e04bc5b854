package k8s

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/servicepath/servicepath/datapath/service"
)

func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

// lbSvc is a dual-stack LoadBalancer "web" with a NodePort, an external IP
// and an ingress IP per family.
func lbSvc(mut func(*corev1.Service)) *corev1.Service {
	s := svc("web", []string{"10.96.0.1", "fd00::1"}, corev1.ServicePort{Name: "http", Port: 80, NodePort: 30080})
	s.Spec.Type = corev1.ServiceTypeLoadBalancer
	s.Spec.ExternalIPs = []string{"192.0.2.1"}
	s.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: "192.0.2.2"}, {IP: "2001:db8::2"}}
	if mut != nil {
		mut(s)
	}
	return s
}

// byKind indexes translated services by "kind addr", and "kind addr
// in-cluster" for in-cluster frontends.
func byKind(res Result) map[string]service.Service {
	out := map[string]service.Service{}
	for _, s := range res.Services {
		k := s.Frontend.Kind.String() + " " + s.Frontend.Addr.String()
		if s.Frontend.InCluster {
			k += " in-cluster"
		}
		out[k] = s
	}
	return out
}

func TestExternalTrafficPolicy(t *testing.T) {
	slices := []*discoveryv1.EndpointSlice{
		eslice("web-4", "web", discoveryv1.AddressTypeIPv4, httpEP,
			onNode(readyEP("10.0.0.1"), "node-a"), onNode(readyEP("10.0.0.2"), "node-b")),
		eslice("web-6", "web", discoveryv1.AddressTypeIPv6, httpEP, onNode(readyEP("fd01::1"), "node-b")),
	}
	all4 := []service.Backend{be("10.0.0.1:8080", A), be("10.0.0.2:8080", A)}
	a4 := []service.Backend{be("10.0.0.1:8080", A)}
	all6 := []service.Backend{be("[fd01::1]:8080", A)}
	none := []service.Backend{}
	type want struct {
		backends []service.Backend
		local    bool
	}
	tests := []struct {
		name   string
		etp    corev1.ServiceExternalTrafficPolicy
		itp    corev1.ServiceInternalTrafficPolicy
		node   string
		expect map[string]want
	}{
		{"Local keeps this node's endpoints on external frontends only", corev1.ServiceExternalTrafficPolicyLocal, "", "node-a",
			map[string]want{
				"ClusterIP 10.96.0.1": {all4, false}, "ClusterIP fd00::1": {all6, false},
				"NodePort 0.0.0.0": {a4, true}, "NodePort ::": {none, true},
				"ExternalIP 192.0.2.1": {a4, true}, "LoadBalancer 192.0.2.2": {a4, true}, "LoadBalancer 2001:db8::2": {none, true},
				// This node's pods and the host reach every endpoint.
				"NodePort 0.0.0.0 in-cluster": {all4, false}, "NodePort :: in-cluster": {all6, false},
				"ExternalIP 192.0.2.1 in-cluster": {all4, false}, "LoadBalancer 192.0.2.2 in-cluster": {all4, false},
				"LoadBalancer 2001:db8::2 in-cluster": {all6, false},
			}},
		{"Local without a node name (manifests) acts as Cluster", corev1.ServiceExternalTrafficPolicyLocal, "", "",
			map[string]want{"NodePort 0.0.0.0": {all4, false}, "LoadBalancer 2001:db8::2": {all6, false}}},
		{"Cluster keeps all", corev1.ServiceExternalTrafficPolicyCluster, "", "node-a",
			map[string]want{"NodePort 0.0.0.0": {all4, false}, "ExternalIP 192.0.2.1": {all4, false}}},
		{"internalTrafficPolicy Local covers cluster IPs, not NodePorts", corev1.ServiceExternalTrafficPolicyCluster,
			corev1.ServiceInternalTrafficPolicyLocal, "node-a",
			map[string]want{"ClusterIP 10.96.0.1": {a4, false}, "ClusterIP fd00::1": {none, false}, "NodePort 0.0.0.0": {all4, false}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := lbSvc(func(s *corev1.Service) {
				s.Spec.ExternalTrafficPolicy = tt.etp
				if tt.itp != "" {
					s.Spec.InternalTrafficPolicy = &tt.itp
				}
			})
			res, err := TranslateWith(Options{NodeName: tt.node}, []*corev1.Service{s}, slices)
			require.NoError(t, err, "translate")
			got := byKind(res)
			for fe, w := range tt.expect {
				require.Contains(t, got, fe, "frontend %s translated", fe)
				assert.Equal(t, w.backends, got[fe].Backends, "%s: backends", fe)
				assert.Equal(t, w.local, got[fe].ExternalLocal, "%s: ExternalLocal", fe)
			}
			localETP := tt.etp == corev1.ServiceExternalTrafficPolicyLocal && tt.node != ""
			localITP := tt.itp == corev1.ServiceInternalTrafficPolicyLocal && tt.node != ""
			for name, s := range got {
				assert.Equal(t, localETP && s.Frontend.Kind != service.ClusterIP, s.Frontend.InCluster || s.ExternalLocal,
					"%s: an in-cluster twin exactly for each externalTrafficPolicy Local frontend", name)
				assert.Equal(t, localITP && s.Frontend.Kind == service.ClusterIP, s.InternalLocal, "%s: InternalLocal", name)
			}
		})
	}
}

// withoutInCluster drops the in-cluster twins TestExternalTrafficPolicy
// checks.
func withoutInCluster(ss []service.Service) []service.Service {
	return slices.DeleteFunc(slices.Clone(ss), func(s service.Service) bool { return s.Frontend.InCluster })
}

func TestSourceRangesTranslate(t *testing.T) {
	tests := []struct {
		name       string
		field      []string
		annotation string
		want4      []netip.Prefix // on the IPv4 LoadBalancer IP
		want6      []netip.Prefix
	}{
		{name: "none: everyone may connect"},
		{name: "the field, per family, masked, sorted, without duplicates",
			field: []string{"192.168.7.1/24", " 10.0.0.0/8", "2001:db8:1::/48", "192.168.7.0/24"},
			want4: prefixes("10.0.0.0/8", "192.168.7.0/24"), want6: prefixes("2001:db8:1::/48")},
		{name: "the annotation, comma-separated", annotation: "10.0.0.0/8, 2001:db8:1::/48",
			want4: prefixes("10.0.0.0/8"), want6: prefixes("2001:db8:1::/48")},
		{name: "the field wins over the annotation", field: []string{"10.0.0.0/8"}, annotation: "172.16.0.0/12",
			want4: prefixes("10.0.0.0/8")},
		// As kube-proxy: a zero-length range allows its whole family.
		{name: "an allow-all range lifts its family's restriction", field: []string{"10.0.0.0/8", "0.0.0.0/0", "2001:db8:1::/48"},
			want6: prefixes("2001:db8:1::/48")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := lbSvc(func(s *corev1.Service) {
				s.Spec.LoadBalancerSourceRanges = tt.field
				if tt.annotation != "" {
					s.Annotations = map[string]string{AnnotationSourceRanges: tt.annotation}
				}
			})
			res, err := Translate([]*corev1.Service{s}, nil)
			require.NoError(t, err, "translate")
			got := byKind(res)
			assert.Equal(t, tt.want4, got["LoadBalancer 192.0.2.2"].SourceRanges, "IPv4 load-balancer IP")
			assert.Equal(t, tt.want6, got["LoadBalancer 2001:db8::2"].SourceRanges, "IPv6 load-balancer IP")
			for fe, sv := range got {
				if sv.Frontend.Kind != service.LoadBalancer {
					assert.Empty(t, sv.SourceRanges, "%s: source ranges apply to load-balancer IPs only", fe)
				}
			}
		})
	}
}

func TestBalancingAnnotations(t *testing.T) {
	tests := []struct {
		name        string
		annotations map[string]string
		maglev      bool
		mode        service.Mode
		dispatch    service.Dispatch
	}{
		{"defaults: random, SNAT", nil, false, service.SNAT, service.Option},
		{"maglev", map[string]string{AnnotationLBAlgorithm: "maglev"}, true, service.SNAT, service.Option},
		{"random, spelled out", map[string]string{AnnotationLBAlgorithm: "random"}, false, service.SNAT, service.Option},
		{"DSR with the option", map[string]string{AnnotationLBMode: "dsr"}, false, service.DSR, service.Option},
		{"hybrid over IPIP, Maglev", map[string]string{AnnotationLBMode: "hybrid", AnnotationDSRDispatch: "ipip", AnnotationLBAlgorithm: "maglev"},
			true, service.Hybrid, service.IPIP},
		{"SNAT with the option dispatch, which it ignores", map[string]string{AnnotationLBMode: "snat", AnnotationDSRDispatch: "option"},
			false, service.SNAT, service.Option},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := lbSvc(func(s *corev1.Service) { s.Annotations = tt.annotations })
			res, err := Translate([]*corev1.Service{s}, nil)
			require.NoError(t, err, "translate")
			require.Len(t, res.Services, 7, "two cluster IPs, two NodePorts, an external IP, two ingress IPs")
			for _, sv := range res.Services {
				if sv.Frontend.Kind == service.ClusterIP {
					assert.False(t, sv.Maglev, "%s: cluster IPs stay random", sv.Frontend)
					assert.Equal(t, service.SNAT, sv.Mode, "%s: cluster IPs have no north-south mode", sv.Frontend)
					continue
				}
				assert.Equal(t, tt.maglev, sv.Maglev, "%s: Maglev", sv.Frontend)
				assert.Equal(t, tt.mode, sv.Mode, "%s: mode", sv.Frontend)
				assert.Equal(t, tt.dispatch, sv.Dispatch, "%s: dispatch", sv.Frontend)
				assert.NoError(t, sv.Validate(), "%s validates", sv.Frontend)
			}
		})
	}
}

// pod is a Running pod of namespace "default" on a node, with IPs and
// container ports.
func pod(name, node string, ips []string, ports ...corev1.ContainerPort) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec:       corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "c", Ports: ports}}},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning},
	}
	for _, ip := range ips {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip})
	}
	return p
}

func hostPortFE(addr string, port uint16, proto service.Protocol) service.Frontend {
	return service.Frontend{Addr: netip.MustParseAddr(addr), Port: port, Protocol: proto, Kind: service.HostPort}
}

func TestTranslatePods(t *testing.T) {
	http := corev1.ContainerPort{Name: "http", ContainerPort: 80, HostPort: 8080}
	dual := []string{"10.0.0.9", "fd01::9"}
	tests := []struct {
		name            string
		node            string
		pods            []*corev1.Pod
		want            []service.Service
		wantSkipped     []string
		wantUnsupported []string
	}{
		{
			name: "every family the pod has, on the node's addresses",
			node: "node-a",
			pods: []*corev1.Pod{pod("web", "node-a", dual, http, corev1.ContainerPort{ContainerPort: 9100})},
			want: []service.Service{
				{Name: "pod:default/web", PortName: "http", Frontend: hostPortFE("0.0.0.0", 8080, service.TCP), Backends: []service.Backend{be("10.0.0.9:80", A)}},
				{Name: "pod:default/web", PortName: "http", Frontend: hostPortFE("::", 8080, service.TCP), Backends: []service.Backend{be("[fd01::9]:80", A)}},
			},
		},
		{
			name: "a hostIP: that address and family only; status.podIP alone",
			pods: []*corev1.Pod{func() *corev1.Pod {
				p := pod("dns", "node-a", nil, corev1.ContainerPort{Name: "dns", ContainerPort: 5353, HostPort: 53, HostIP: "fd00::1", Protocol: corev1.ProtocolUDP})
				p.Status.PodIP = "fd01::9"
				return p
			}()},
			want: []service.Service{
				{Name: "pod:default/dns", PortName: "dns", Frontend: hostPortFE("fd00::1", 53, service.UDP), Backends: []service.Backend{be("[fd01::9]:5353", A)}},
			},
		},
		{
			name: "other nodes' pods are not this node's",
			node: "node-a",
			pods: []*corev1.Pod{pod("web", "node-b", dual, http)},
		},
		{
			name: "finished pods serve nothing; pods without an IP wait",
			pods: []*corev1.Pod{
				func() *corev1.Pod {
					p := pod("done", "node-a", dual, http)
					p.Status.Phase = corev1.PodSucceeded
					return p
				}(),
				pod("new", "node-a", nil, http),
			},
			wantSkipped: []string{"Pod default/new: has hostPorts but no IP yet"},
		},
		{
			name:            "SCTP is reported",
			pods:            []*corev1.Pod{pod("sig", "node-a", dual, corev1.ContainerPort{ContainerPort: 3868, HostPort: 3868, Protocol: corev1.ProtocolSCTP})},
			wantUnsupported: []string{"Pod default/sig: spec.containers[0].ports[0].protocol: SCTP is not handled by the datapath"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := TranslatePods(Options{NodeName: tt.node}, tt.pods)
			require.NoError(t, err, "translate pods")
			assert.Equal(t, tt.want, res.Services, "HostPort services")
			assert.Equal(t, tt.wantSkipped, res.Skipped, "skipped pods")
			assert.Equal(t, tt.wantUnsupported, res.Unsupported, "unsupported ports")
			for _, s := range res.Services {
				assert.NoError(t, s.Validate(), "%s validates", s.Frontend)
			}
		})
	}
}

func TestTranslatePodsErrors(t *testing.T) {
	http := corev1.ContainerPort{Name: "http", ContainerPort: 80, HostPort: 8080}
	dual := []string{"10.0.0.9", "fd01::9"}
	tests := []struct {
		name string
		pods []*corev1.Pod
		want []string
	}{
		{"hostPort out of range", []*corev1.Pod{pod("a", "n", dual, corev1.ContainerPort{ContainerPort: 80, HostPort: 70000})},
			[]string{"Pod default/a: spec.containers[0].ports[0].hostPort: 70000 out of range"}},
		{"containerPort out of range", []*corev1.Pod{pod("a", "n", dual, corev1.ContainerPort{ContainerPort: 0, HostPort: 80})},
			[]string{"Pod default/a: spec.containers[0].ports[0].containerPort: 0 out of range"}},
		{"bad hostIP", []*corev1.Pod{pod("a", "n", dual, corev1.ContainerPort{ContainerPort: 80, HostPort: 80, HostIP: "10.0.0"})},
			[]string{`Pod default/a: spec.containers[0].ports[0].hostIP: invalid IP "10.0.0"`}},
		{"hostIP of a family the pod lacks", []*corev1.Pod{pod("a", "n", dual[:1], corev1.ContainerPort{ContainerPort: 80, HostPort: 80, HostIP: "fd00::1"})},
			[]string{"Pod default/a: spec.containers[0].ports[0].hostIP: fd00::1: the pod has no IP of its family"}},
		{"bad pod IP", []*corev1.Pod{pod("a", "n", []string{"10.0.0.300"}, http)},
			[]string{`Pod default/a: status.podIPs[0].ip: invalid IP "10.0.0.300"`}},
		{"two pods on one hostPort", []*corev1.Pod{pod("a", "n", dual, http), pod("b", "n", dual[:1], http)},
			[]string{"Pod default/b: spec.containers[0].ports[0].hostPort: frontend 0.0.0.0:8080/TCP (HostPort) is already pod:default/a's"}},
		{"pod given twice", []*corev1.Pod{pod("a", "n", dual, http), pod("a", "n", dual, http)},
			[]string{"Pod default/a: given more than once"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := TranslatePods(Options{}, tt.pods)
			require.Error(t, err, "invalid pods refused")
			assert.Equal(t, tt.want, strings.Split(err.Error(), "\n"), "error lines")
			assert.Equal(t, Result{}, res, "no result with an error")
		})
	}
}

// The manifest as a node reads it: every north-south option of the
// Service, this node's endpoints on the external frontends, and this
// node's running pods' hostPorts.
func TestNorthSouthManifest(t *testing.T) {
	objs, err := ReadManifests("testdata/northsouth.yaml")
	require.NoError(t, err, "read the manifest")
	assert.Empty(t, objs.Ignored, "Services, EndpointSlices and Pods are all read")
	require.Len(t, objs.Pods, 3, "three Pods")

	res, err := TranslateWith(Options{NodeName: "node-1"}, objs.Services, objs.EndpointSlices)
	require.NoError(t, err, "translate the Service")
	all4 := []service.Backend{be("10.0.1.5:8080", A), be("10.0.2.5:8080", A)}
	all6 := []service.Backend{be("[fd01::1:5]:8080", A), be("[fd01::2:5]:8080", A)}
	local4, local6 := all4[:1], all6[:1]
	ext := func(f service.Frontend, b []service.Backend, ranges []netip.Prefix) service.Service {
		return service.Service{Name: "shop/edge", PortName: "http", Frontend: f, Backends: b, ExternalLocal: true,
			SourceRanges: ranges, Maglev: true, Mode: service.DSR, Dispatch: service.IPIP}
	}
	assert.Equal(t, []service.Service{
		{Name: "shop/edge", PortName: "http", Frontend: fe("10.96.0.30", 80, service.TCP), Backends: all4},
		{Name: "shop/edge", PortName: "http", Frontend: fe("fd00::30", 80, service.TCP), Backends: all6},
		ext(kindFE("0.0.0.0", 30080, service.NodePort), local4, nil),
		ext(kindFE("::", 30080, service.NodePort), local6, nil),
		ext(kindFE("192.0.2.30", 80, service.LoadBalancer), local4, prefixes("10.0.0.0/8", "192.168.7.0/24")),
		ext(kindFE("2001:db8::30", 80, service.LoadBalancer), local6, prefixes("2001:db8:1::/48")),
	}, withoutInCluster(res.Services), "the Service's frontends on node-1")

	pods, err := TranslatePods(Options{NodeName: "node-1"}, objs.Pods)
	require.NoError(t, err, "translate the Pods")
	assert.Equal(t, []service.Service{
		{Name: "pod:shop/ingress", PortName: "http", Frontend: hostPortFE("0.0.0.0", 8080, service.TCP), Backends: []service.Backend{be("10.0.1.9:80", A)}},
		{Name: "pod:shop/ingress", PortName: "dns", Frontend: hostPortFE("192.0.2.1", 53, service.UDP), Backends: []service.Backend{be("10.0.1.9:5353", A)}},
		{Name: "pod:shop/ingress", PortName: "http", Frontend: hostPortFE("::", 8080, service.TCP), Backends: []service.Backend{be("[fd01::1:9]:80", A)}},
	}, pods.Services, "node-1's running pod's hostPorts; node-2's and the finished one's are not here")
	assert.Equal(t, []string{"pod:shop/ingress", "pod:shop/ingress-b", "pod:shop/job"}, PodNames(objs.Pods), "owner names for delete -f")
}
