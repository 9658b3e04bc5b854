package k8s

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/servicepath/servicepath/datapath/service"
)

func onNode(e discoveryv1.Endpoint, node string) discoveryv1.Endpoint {
	e.NodeName = &node
	return e
}

func TestTranslateInternalTrafficPolicy(t *testing.T) {
	slices := []*discoveryv1.EndpointSlice{eslice("web-1", "web", discoveryv1.AddressTypeIPv4, httpEP,
		onNode(readyEP("10.0.0.1"), "node-a"), onNode(readyEP("10.0.0.2"), "node-b"), readyEP("10.0.0.3"))}
	all := []service.Backend{be("10.0.0.1:8080", A), be("10.0.0.2:8080", A), be("10.0.0.3:8080", A)}
	tests := []struct {
		name   string
		policy *corev1.ServiceInternalTrafficPolicy
		opts   Options
		want   []service.Backend
	}{
		{"Local keeps this node's endpoints", ptr(corev1.ServiceInternalTrafficPolicyLocal), Options{NodeName: "node-a"},
			[]service.Backend{be("10.0.0.1:8080", A)}},
		{"Local on a node without endpoints has none", ptr(corev1.ServiceInternalTrafficPolicyLocal), Options{NodeName: "node-c"},
			[]service.Backend{}},
		{"Local without a node name (manifests) keeps all", ptr(corev1.ServiceInternalTrafficPolicyLocal), Options{}, all},
		{"Cluster keeps all", ptr(corev1.ServiceInternalTrafficPolicyCluster), Options{NodeName: "node-a"}, all},
		{"unset is Cluster", nil, Options{NodeName: "node-a"}, all},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := svc("web", []string{"10.96.0.1"}, httpSvc)
			s.Spec.InternalTrafficPolicy = tt.policy
			res, err := TranslateWith(tt.opts, []*corev1.Service{s}, slices)
			require.NoError(t, err, "translate")
			require.Len(t, res.Services, 1, "one frontend")
			assert.Equal(t, tt.want, res.Services[0].Backends, "backends for node %q", tt.opts.NodeName)
		})
	}
}

func TestOwnerNames(t *testing.T) {
	es := eslice("web-1", "web", discoveryv1.AddressTypeIPv4, httpEP)
	assert.Equal(t, "default/web", SliceOwner(es), "slice owner from its service-name label")
	delete(es.Labels, discoveryv1.LabelServiceName)
	assert.Empty(t, SliceOwner(es), "a slice without the label has no owner")
	assert.Equal(t, "default/web", ServiceName(svc("web", nil)), "service name")
}
