package clusterip

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/packet"
	"github.com/servicepath/servicepath/k8s"
)

// placed is an endpoint on one of the family's backends: its node and
// the zone it is hinted for.
type placed struct {
	backend    int
	node, zone string
}

// translated programs what k8s.TranslateWith makes, for node-a in zone-a,
// of a TCP ClusterIP Service on the family's VIP and its endpoints, so a
// row shows the translation's choice of endpoints reaching the datapath.
func (f Family) translated(localOnly bool, eps ...placed) func(e *inject.Env) error {
	return func(e *inject.Env) error {
		svc := &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: "fixture", Namespace: "default"},
			Spec: corev1.ServiceSpec{ClusterIP: f.VIP.String(),
				Ports: []corev1.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: VIPPort}}},
		}
		if localOnly {
			svc.Spec.InternalTrafficPolicy = new(corev1.ServiceInternalTrafficPolicyLocal)
		}
		es := &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Name: "fixture-1", Namespace: "default",
				Labels: map[string]string{discoveryv1.LabelServiceName: "fixture"}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Name: new("http"), Protocol: new(corev1.ProtocolTCP), Port: new(int32(BackendPort))}},
		}
		if f.VIP.Is6() {
			es.AddressType = discoveryv1.AddressTypeIPv6
		}
		for _, p := range eps {
			es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{
				Addresses: []string{f.Backends[p.backend].String()}, NodeName: new(p.node),
				Hints: &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: p.zone}}},
			})
		}
		res, err := k8s.TranslateWith(k8s.Options{NodeName: "node-a", Zone: "zone-a"}, []*corev1.Service{svc}, []*discoveryv1.EndpointSlice{es})
		if err != nil {
			return err
		}
		for _, s := range res.Services {
			if err := e.Services.Upsert(s); err != nil {
				return err
			}
		}
		return nil
	}
}

// programmedBackends asserts the backends the VIP's frontend holds.
func programmedBackends(want ...service.Backend) func(t testing.TB, e *inject.Env) {
	return func(t testing.TB, e *inject.Env) {
		progs := e.Services.List()
		require.Len(t, progs, 1, "one frontend")
		assert.Equal(t, want, progs[0].Backends, "the frontend holds what the translation chose")
	}
}

func topologyFixtures(f Family) []inject.Fixture {
	name := func(s string) string { return f.Name + "/" + s }
	syn := packet.TCP(f.Client, f.vip(), packet.SYN, nil, packet.Opts{})
	return []inject.Fixture{
		{
			Name: name("zone-hints-leave-this-zones-backend-alone-in-the-frontend"),
			Setup: f.translated(false, placed{0, "node-b", "zone-b"}, placed{1, "node-c", "zone-b"},
				placed{2, "node-b", "zone-a"}),
			Input:    syn,
			Verdict:  inject.OK,
			Output:   packet.TCP(f.Client, f.backend(2), packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("lb_new", 1),
			Check:    programmedBackends(f.active(2)),
		},
		{
			// kube-proxy DROPs for want of local endpoints...
			Name:     name("itp-local-with-endpoints-elsewhere-translated-to-a-drop"),
			Setup:    f.translated(true, placed{0, "node-b", "zone-a"}),
			Input:    syn,
			Verdict:  inject.Shot,
			Counters: inject.CountersOf("itp_local_drop", 1),
		},
		{
			// ...and REJECTs when the Service has none anywhere.
			Name:     name("itp-local-without-endpoints-anywhere-translated-to-a-reject"),
			Setup:    f.translated(true),
			Input:    syn,
			Verdict:  inject.Redirect,
			Output:   packet.ICMPError(packet.PortUnreachable, f.VIP, f.Client.Addr(), packet.HeaderQuote(syn), reply()),
			Counters: inject.CountersOf("no_backend_reject", 1),
		},
	}
}
