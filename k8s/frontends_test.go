package k8s

import (
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/servicepath/servicepath/datapath/service"
)

func kindFE(addr string, port uint16, kind service.Kind) service.Frontend {
	return service.Frontend{Addr: netip.MustParseAddr(addr), Port: port, Protocol: service.TCP, Kind: kind}
}

func frontendsOf(res Result) []service.Frontend {
	var out []service.Frontend
	for _, s := range res.Services {
		out = append(out, s.Frontend)
	}
	return out
}

// A dual-stack NodePort answers on both families' node addresses, each
// with that family's endpoints.
func TestNodePortDualStack(t *testing.T) {
	s := svc("np", []string{"10.96.0.1", "fd00::1"}, corev1.ServicePort{Name: "http", Port: 80, NodePort: 30080})
	s.Spec.Type = corev1.ServiceTypeNodePort
	res, err := Translate([]*corev1.Service{s}, []*discoveryv1.EndpointSlice{
		eslice("np-4", "np", discoveryv1.AddressTypeIPv4, httpEP, readyEP("10.0.0.1")),
		eslice("np-6", "np", discoveryv1.AddressTypeIPv6, httpEP, readyEP("fd00::a")),
	})
	require.NoError(t, err, "translate")
	assert.ElementsMatch(t, []service.Frontend{
		fe("10.96.0.1", 80, service.TCP), fe("fd00::1", 80, service.TCP),
		kindFE("0.0.0.0", 30080, service.NodePort), kindFE("::", 30080, service.NodePort),
	}, frontendsOf(res), "cluster IPs and a NodePort per family")
	for _, sv := range res.Services {
		require.Len(t, sv.Backends, 1, "%s has its family's endpoint", sv.Frontend)
		assert.Equal(t, sv.Frontend.Addr.Is4(), sv.Backends[0].Addr.Is4(), "%s: backend of the same family", sv.Frontend)
	}
}

func TestSessionAffinity(t *testing.T) {
	timeout := int32(600)
	for _, tc := range []struct {
		name    string
		mod     func(*corev1.Service)
		want    time.Duration
		wantErr string
	}{
		{"none", func(*corev1.Service) {}, 0, ""},
		{"ClientIP, Kubernetes' default timeout", func(s *corev1.Service) {
			s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
		}, 3 * time.Hour, ""},
		{"ClientIP with a timeout", func(s *corev1.Service) {
			s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
			s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: &timeout}}
		}, 10 * time.Minute, ""},
		{"timeout out of range", func(s *corev1.Service) {
			big := int32(86401)
			s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
			s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: &big}}
		}, 0, "Service default/web: spec.sessionAffinityConfig.clientIP.timeoutSeconds: 86401 out of range"},
		{"unknown affinity", func(s *corev1.Service) { s.Spec.SessionAffinity = "Cookie" }, 0,
			`Service default/web: spec.sessionAffinity: unknown affinity "Cookie"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := svc("web", []string{"10.96.0.1"}, httpSvc)
			tc.mod(s)
			res, err := Translate([]*corev1.Service{s}, nil)
			if tc.wantErr != "" {
				require.Error(t, err, "invalid affinity refused")
				assert.Contains(t, err.Error(), tc.wantErr, "the error names object and field")
				return
			}
			require.NoError(t, err, "translate")
			require.Len(t, res.Services, 1, "one frontend")
			assert.Equal(t, tc.want, res.Services[0].Affinity, "affinity timeout")
		})
	}
}

// Two Services may not claim one node port, nor a cluster IP another's
// external IP.
func TestFrontendConflicts(t *testing.T) {
	a := svc("a", []string{"10.96.0.1"}, corev1.ServicePort{Name: "http", Port: 80, NodePort: 30080})
	a.Spec.Type = corev1.ServiceTypeNodePort
	b := svc("b", []string{"10.96.0.2"}, corev1.ServicePort{Name: "http", Port: 80, NodePort: 30080})
	b.Spec.Type = corev1.ServiceTypeNodePort
	_, err := Translate([]*corev1.Service{a, b}, nil)
	require.Error(t, err, "a node port claimed twice")
	assert.Contains(t, err.Error(), "Service default/b: spec.ports[0].nodePort: frontend 0.0.0.0:30080/TCP (NodePort) is already Service default/a's",
		"the error names the second Service and its field")

	c := svc("c", []string{"10.96.0.3"}, httpSvc)
	c.Spec.ExternalIPs = []string{"10.96.0.1"}
	_, err = Translate([]*corev1.Service{a, c}, nil)
	require.Error(t, err, "an external IP that is another Service's cluster IP")
	assert.Contains(t, err.Error(), "Service default/c: spec.externalIPs[0], spec.ports[0]", "the error names the field")
}
