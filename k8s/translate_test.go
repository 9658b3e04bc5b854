package k8s

import (
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/servicepath/servicepath/datapath/service"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func ptr[T any](v T) *T { return &v }

// svc is a ClusterIP Service in namespace "default".
func svc(name string, ips []string, ports ...corev1.ServicePort) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec:       corev1.ServiceSpec{ClusterIPs: ips, Ports: ports},
	}
	if len(ips) > 0 {
		s.Spec.ClusterIP = ips[0]
	}
	return s
}

func sport(name string, proto corev1.Protocol, port int32) corev1.ServicePort {
	return corev1.ServicePort{Name: name, Protocol: proto, Port: port}
}

// eslice is an EndpointSlice of Service owner in namespace "default".
func eslice(name, owner string, at discoveryv1.AddressType, ports []discoveryv1.EndpointPort, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name: name, Namespace: "default",
			Labels: map[string]string{discoveryv1.LabelServiceName: owner},
		},
		AddressType: at,
		Ports:       slices.Clone(ports), // tests mutate their slice's ports
		Endpoints:   eps,
	}
}

func eport(name string, proto corev1.Protocol, port int32) discoveryv1.EndpointPort {
	return discoveryv1.EndpointPort{Name: &name, Protocol: &proto, Port: &port}
}

// ep is an endpoint with the given conditions; nil leaves one unset.
func ep(addr string, ready, serving, terminating *bool) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{
		Addresses:  []string{addr},
		Conditions: discoveryv1.EndpointConditions{Ready: ready, Serving: serving, Terminating: terminating},
	}
}

func readyEP(addr string) discoveryv1.Endpoint { return ep(addr, nil, nil, nil) }

func fe(addr string, port uint16, proto service.Protocol) service.Frontend {
	return service.Frontend{Addr: netip.MustParseAddr(addr), Port: port, Protocol: proto}
}

func be(addrPort string, state service.BackendState) service.Backend {
	ap := netip.MustParseAddrPort(addrPort)
	return service.Backend{Addr: ap.Addr(), Port: ap.Port(), State: state}
}

const (
	A = service.Active
	T = service.Terminating
)

var (
	httpEP  = []discoveryv1.EndpointPort{eport("http", corev1.ProtocolTCP, 8080)}
	httpSvc = sport("http", corev1.ProtocolTCP, 80)
)

func TestTranslate(t *testing.T) {
	tests := []struct {
		name            string
		services        []*corev1.Service
		slices          []*discoveryv1.EndpointSlice
		want            []service.Service
		wantSkipped     []string
		wantUnsupported []string
	}{
		{
			name: "dual-stack, named ports, slices matched by family",
			services: []*corev1.Service{svc("web", []string{"10.96.0.1", "fd00::1"},
				sport("http", corev1.ProtocolTCP, 80), sport("dns", corev1.ProtocolUDP, 53))},
			slices: []*discoveryv1.EndpointSlice{
				eslice("web-v4", "web", discoveryv1.AddressTypeIPv4,
					[]discoveryv1.EndpointPort{eport("http", corev1.ProtocolTCP, 8080), eport("dns", corev1.ProtocolUDP, 5353)},
					readyEP("10.0.0.1")),
				eslice("web-v6", "web", discoveryv1.AddressTypeIPv6,
					[]discoveryv1.EndpointPort{eport("http", corev1.ProtocolTCP, 8080), eport("dns", corev1.ProtocolUDP, 5353)},
					readyEP("fd01::1")),
			},
			want: []service.Service{
				{Name: "default/web", PortName: "dns", Frontend: fe("10.96.0.1", 53, service.UDP), Backends: []service.Backend{be("10.0.0.1:5353", A)}},
				{Name: "default/web", PortName: "dns", Frontend: fe("fd00::1", 53, service.UDP), Backends: []service.Backend{be("[fd01::1]:5353", A)}},
				{Name: "default/web", PortName: "http", Frontend: fe("10.96.0.1", 80, service.TCP), Backends: []service.Backend{be("10.0.0.1:8080", A)}},
				{Name: "default/web", PortName: "http", Frontend: fe("fd00::1", 80, service.TCP), Backends: []service.Backend{be("[fd01::1]:8080", A)}},
			},
		},
		{
			name: "unnamed port, defaulted protocol, clusterIP without clusterIPs, empty namespace",
			services: []*corev1.Service{{
				ObjectMeta: metav1.ObjectMeta{Name: "web"},
				Spec:       corev1.ServiceSpec{ClusterIP: "10.96.0.1", Ports: []corev1.ServicePort{{Port: 80}}},
			}},
			slices: []*discoveryv1.EndpointSlice{{
				ObjectMeta:  metav1.ObjectMeta{Name: "web-1", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
				AddressType: discoveryv1.AddressTypeIPv4,
				Ports:       []discoveryv1.EndpointPort{{Port: ptr[int32](8080)}},
				Endpoints:   []discoveryv1.Endpoint{readyEP("10.0.0.1")},
			}},
			want: []service.Service{
				{Name: "default/web", Frontend: fe("10.96.0.1", 80, service.TCP), Backends: []service.Backend{be("10.0.0.1:8080", A)}},
			},
		},
		{
			name:     "port name mismatch gives no backends",
			services: []*corev1.Service{svc("web", []string{"10.96.0.1"}, httpSvc)},
			slices: []*discoveryv1.EndpointSlice{eslice("web-1", "web", discoveryv1.AddressTypeIPv4,
				[]discoveryv1.EndpointPort{eport("web", corev1.ProtocolTCP, 8080), eport("", corev1.ProtocolTCP, 8081)},
				readyEP("10.0.0.1"))},
			want: []service.Service{
				{Name: "default/web", PortName: "http", Frontend: fe("10.96.0.1", 80, service.TCP), Backends: []service.Backend{}},
			},
		},
		{
			name:     "protocol mismatch gives no backends",
			services: []*corev1.Service{svc("dns", []string{"10.96.0.1"}, sport("dns", corev1.ProtocolUDP, 53))},
			slices: []*discoveryv1.EndpointSlice{eslice("dns-1", "dns", discoveryv1.AddressTypeIPv4,
				[]discoveryv1.EndpointPort{eport("dns", corev1.ProtocolTCP, 53)}, readyEP("10.0.0.1"))},
			want: []service.Service{
				{Name: "default/dns", PortName: "dns", Frontend: fe("10.96.0.1", 53, service.UDP), Backends: []service.Backend{}},
			},
		},
		{
			name:     "several slices merged, a duplicate address once and Active",
			services: []*corev1.Service{svc("web", []string{"10.96.0.1"}, httpSvc)},
			slices: []*discoveryv1.EndpointSlice{
				eslice("web-b", "web", discoveryv1.AddressTypeIPv4, httpEP,
					readyEP("10.0.0.3"), ep("10.0.0.2", ptr(false), ptr(true), ptr(true))),
				eslice("web-a", "web", discoveryv1.AddressTypeIPv4, httpEP,
					readyEP("10.0.0.2"), readyEP("10.0.0.1")),
				eslice("web-c", "web", discoveryv1.AddressTypeIPv4, httpEP,
					ep("10.0.0.4", ptr(false), ptr(true), ptr(true)), ep("10.0.0.4", ptr(false), ptr(true), ptr(true))),
			},
			want: []service.Service{{Name: "default/web", PortName: "http", Frontend: fe("10.96.0.1", 80, service.TCP),
				Backends: []service.Backend{be("10.0.0.1:8080", A), be("10.0.0.2:8080", A), be("10.0.0.3:8080", A), be("10.0.0.4:8080", T)}}},
		},
		{
			name:     "same address on different target ports are two backends",
			services: []*corev1.Service{svc("web", []string{"10.96.0.1"}, httpSvc)},
			slices: []*discoveryv1.EndpointSlice{
				eslice("web-old", "web", discoveryv1.AddressTypeIPv4, httpEP, readyEP("10.0.0.1")),
				eslice("web-new", "web", discoveryv1.AddressTypeIPv4,
					[]discoveryv1.EndpointPort{eport("http", corev1.ProtocolTCP, 9090)}, readyEP("10.0.0.1")),
			},
			want: []service.Service{{Name: "default/web", PortName: "http", Frontend: fe("10.96.0.1", 80, service.TCP),
				Backends: []service.Backend{be("10.0.0.1:8080", A), be("10.0.0.1:9090", A)}}},
		},
		{
			name:     "ready, serving and terminating conditions",
			services: []*corev1.Service{svc("web", []string{"10.96.0.1"}, httpSvc)},
			slices: []*discoveryv1.EndpointSlice{eslice("web-1", "web", discoveryv1.AddressTypeIPv4, httpEP,
				ep("10.0.0.1", nil, nil, nil),                      // ready nil: ready
				ep("10.0.0.2", ptr(true), ptr(true), ptr(false)),   // ready
				ep("10.0.0.3", ptr(true), ptr(true), ptr(true)),    // ready wins over terminating
				ep("10.0.0.4", ptr(false), ptr(true), ptr(true)),   // draining
				ep("10.0.0.5", ptr(false), nil, ptr(true)),         // serving nil means true
				ep("10.0.0.6", ptr(false), ptr(false), ptr(true)),  // terminating, not serving
				ep("10.0.0.7", ptr(false), ptr(true), ptr(false)),  // serving, not terminating
				ep("10.0.0.8", ptr(false), ptr(true), nil),         // terminating nil means false
				ep("10.0.0.9", ptr(false), ptr(false), ptr(false)), // not ready
			)},
			want: []service.Service{{Name: "default/web", PortName: "http", Frontend: fe("10.96.0.1", 80, service.TCP),
				Backends: []service.Backend{
					be("10.0.0.1:8080", A), be("10.0.0.2:8080", A), be("10.0.0.3:8080", A),
					be("10.0.0.4:8080", T), be("10.0.0.5:8080", T),
				}}},
		},
		{
			name:     "slices of other Services, namespaces and families, FQDN and portless slices are not used",
			services: []*corev1.Service{svc("web", []string{"10.96.0.1"}, httpSvc)},
			slices: []*discoveryv1.EndpointSlice{
				eslice("other-1", "other", discoveryv1.AddressTypeIPv4, httpEP, readyEP("10.0.0.1")),
				func() *discoveryv1.EndpointSlice {
					es := eslice("web-1", "web", discoveryv1.AddressTypeIPv4, httpEP, readyEP("10.0.0.2"))
					es.Namespace = "shop"
					return es
				}(),
				eslice("web-v6", "web", discoveryv1.AddressTypeIPv6, httpEP, readyEP("fd00::2")),
				eslice("web-fqdn", "web", discoveryv1.AddressTypeFQDN, httpEP, readyEP("web.example.com")),
				eslice("web-noport", "web", discoveryv1.AddressTypeIPv4,
					[]discoveryv1.EndpointPort{{Name: ptr("http"), Protocol: ptr(corev1.ProtocolTCP)}}, readyEP("10.0.0.3")),
				eslice("web-4", "web", discoveryv1.AddressTypeIPv4, httpEP, readyEP("10.0.0.4")),
			},
			want: []service.Service{{Name: "default/web", PortName: "http", Frontend: fe("10.96.0.1", 80, service.TCP),
				Backends: []service.Backend{be("10.0.0.4:8080", A)}}},
		},
		{
			name:     "only an endpoint's first address is used",
			services: []*corev1.Service{svc("web", []string{"10.96.0.1"}, httpSvc)},
			slices: []*discoveryv1.EndpointSlice{eslice("web-1", "web", discoveryv1.AddressTypeIPv4, httpEP,
				discoveryv1.Endpoint{Addresses: []string{"10.0.0.1", "10.0.0.2"}})},
			want: []service.Service{{Name: "default/web", PortName: "http", Frontend: fe("10.96.0.1", 80, service.TCP),
				Backends: []service.Backend{be("10.0.0.1:8080", A)}}},
		},
		{
			name: "NodePort and LoadBalancer: cluster IP, NodePort on every node address, external and ingress IPs",
			services: []*corev1.Service{
				func() *corev1.Service {
					s := svc("np", []string{"10.96.0.1"}, corev1.ServicePort{Name: "http", Port: 80, NodePort: 30080})
					s.Spec.Type = corev1.ServiceTypeNodePort
					s.Spec.ExternalIPs = []string{"192.0.2.1"}
					return s
				}(),
				func() *corev1.Service {
					s := svc("lb", []string{"10.96.0.2"}, corev1.ServicePort{Name: "http", Port: 80, NodePort: 30081})
					s.Spec.Type = corev1.ServiceTypeLoadBalancer
					s.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: "192.0.2.2"}}
					return s
				}(),
			},
			want: []service.Service{
				{Name: "default/lb", PortName: "http", Frontend: fe("10.96.0.2", 80, service.TCP), Backends: []service.Backend{}},
				{Name: "default/lb", PortName: "http", Frontend: kindFE("0.0.0.0", 30081, service.NodePort), Backends: []service.Backend{}},
				{Name: "default/lb", PortName: "http", Frontend: kindFE("192.0.2.2", 80, service.LoadBalancer), Backends: []service.Backend{}},
				{Name: "default/np", PortName: "http", Frontend: fe("10.96.0.1", 80, service.TCP), Backends: []service.Backend{}},
				{Name: "default/np", PortName: "http", Frontend: kindFE("0.0.0.0", 30080, service.NodePort), Backends: []service.Backend{}},
				{Name: "default/np", PortName: "http", Frontend: kindFE("192.0.2.1", 80, service.ExternalIP), Backends: []service.Backend{}},
			},
		},
		{
			name: "headless, ExternalName and another proxy's Services are skipped",
			services: []*corev1.Service{
				svc("headless", []string{"None"}, httpSvc),
				func() *corev1.Service {
					s := svc("headless-old", nil, httpSvc)
					s.Spec.ClusterIP = "None"
					return s
				}(),
				{
					ObjectMeta: metav1.ObjectMeta{Name: "ext", Namespace: "default"},
					Spec:       corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: "example.com"},
				},
				func() *corev1.Service {
					s := svc("claimed", []string{"10.96.0.1"}, httpSvc)
					s.Labels = map[string]string{LabelServiceProxyName: "other-proxy"}
					return s
				}(),
				func() *corev1.Service {
					s := svc("labelled-headless", []string{"10.96.0.2"}, httpSvc)
					s.Labels = map[string]string{corev1.IsHeadlessService: ""}
					return s
				}(),
			},
			slices: []*discoveryv1.EndpointSlice{
				eslice("headless-1", "headless", discoveryv1.AddressTypeIPv4, httpEP, readyEP("10.0.0.1")),
			},
			wantSkipped: []string{
				`Service default/claimed: label service.kubernetes.io/service-proxy-name="other-proxy": handled by another proxy`,
				"Service default/ext: type ExternalName has no cluster IP",
				"Service default/headless: headless (clusterIP None)",
				"Service default/headless-old: headless (clusterIP None)",
				"Service default/labelled-headless: label service.kubernetes.io/headless: headless",
			},
		},
		{
			name: "SCTP and unknown protocols are reported, other ports translate",
			services: []*corev1.Service{svc("sctp", []string{"10.96.0.1"},
				sport("sig", corev1.ProtocolSCTP, 3868), sport("http", corev1.ProtocolTCP, 80), sport("odd", "QUIC", 443))},
			slices: []*discoveryv1.EndpointSlice{eslice("sctp-1", "sctp", discoveryv1.AddressTypeIPv4,
				[]discoveryv1.EndpointPort{eport("sig", corev1.ProtocolSCTP, 3868), eport("http", corev1.ProtocolTCP, 8080)},
				readyEP("10.0.0.1"))},
			want: []service.Service{{Name: "default/sctp", PortName: "http", Frontend: fe("10.96.0.1", 80, service.TCP),
				Backends: []service.Backend{be("10.0.0.1:8080", A)}}},
			wantUnsupported: []string{
				"Service default/sctp: spec.ports[0].protocol: SCTP is not handled by the datapath",
				"Service default/sctp: spec.ports[2].protocol: QUIC is not handled by the datapath",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := Translate(tt.services, tt.slices)
			require.NoError(t, err, "translating valid objects")
			assert.Equal(t, tt.want, res.Services, "services")
			assert.Equal(t, tt.wantSkipped, res.Skipped, "skipped Services")
			assert.Equal(t, tt.wantUnsupported, res.Unsupported, "unsupported ports")
		})
	}
}

func TestTranslateDeterministic(t *testing.T) {
	services := []*corev1.Service{
		svc("b", []string{"fd00::2", "10.96.0.2"}, sport("x", corev1.ProtocolTCP, 80), sport("a", corev1.ProtocolUDP, 53)),
		svc("a", []string{"10.96.0.1"}, httpSvc),
		svc("headless", []string{"None"}, httpSvc),
		svc("sctp", []string{"10.96.0.3"}, sport("", corev1.ProtocolSCTP, 9)),
	}
	endpointSlices := []*discoveryv1.EndpointSlice{
		eslice("a-2", "a", discoveryv1.AddressTypeIPv4, httpEP, readyEP("10.0.0.9"), readyEP("10.0.0.1")),
		eslice("a-1", "a", discoveryv1.AddressTypeIPv4, httpEP, readyEP("10.0.0.5")),
	}
	want, err := Translate(services, endpointSlices)
	require.NoError(t, err, "translating")

	var keys []string
	for _, s := range want.Services {
		keys = append(keys, s.Name+" "+s.PortName+" "+s.Frontend.String())
	}
	assert.Equal(t, []string{
		"default/a http 10.96.0.1:80/TCP",
		"default/b a 10.96.0.2:53/UDP",
		"default/b a [fd00::2]:53/UDP",
		"default/b x 10.96.0.2:80/TCP",
		"default/b x [fd00::2]:80/TCP",
	}, keys, "services sorted by name, port name, frontend")
	assert.Equal(t, []service.Backend{be("10.0.0.1:8080", A), be("10.0.0.5:8080", A), be("10.0.0.9:8080", A)},
		want.Services[0].Backends, "backends sorted by address")

	for i := range 10 {
		rs, rl := reversed(services), reversed(endpointSlices)
		if i%2 == 1 {
			rs, rl = rotate(services, i), rotate(endpointSlices, i)
		}
		got, err := Translate(rs, rl)
		require.NoError(t, err, "translating permutation %d", i)
		assert.Equal(t, want, got, "permutation %d gives the same result", i)
	}
}

func reversed[T any](s []T) []T {
	r := slices.Clone(s)
	slices.Reverse(r)
	return r
}

func rotate[T any](s []T, n int) []T {
	n %= len(s)
	return append(slices.Clone(s[n:]), s[:n]...)
}

func TestTranslateErrors(t *testing.T) {
	web := func(mut func(*corev1.Service)) []*corev1.Service {
		s := svc("web", []string{"10.96.0.1"}, httpSvc)
		mut(s)
		return []*corev1.Service{s}
	}
	webSlice := func(mut func(*discoveryv1.EndpointSlice)) []*discoveryv1.EndpointSlice {
		es := eslice("web-abc", "web", discoveryv1.AddressTypeIPv4, httpEP, readyEP("10.0.0.1"), readyEP("10.0.0.2"), readyEP("10.0.0.3"))
		mut(es)
		return []*discoveryv1.EndpointSlice{es}
	}
	okSvc := web(func(*corev1.Service) {})
	tests := []struct {
		name     string
		services []*corev1.Service
		slices   []*discoveryv1.EndpointSlice
		want     []string // the error's lines
	}{
		{
			name:     "invalid cluster IP",
			services: web(func(s *corev1.Service) { s.Spec.ClusterIPs = []string{"10.96.0.1", "10.0.0.300"} }),
			want:     []string{`Service default/web: spec.clusterIPs[1]: invalid IP "10.0.0.300"`},
		},
		{
			name:     "invalid clusterIP without clusterIPs",
			services: web(func(s *corev1.Service) { s.Spec.ClusterIPs, s.Spec.ClusterIP = nil, "10.96.0" }),
			want:     []string{`Service default/web: spec.clusterIP: invalid IP "10.96.0"`},
		},
		{
			name:     "zone in cluster IP",
			services: web(func(s *corev1.Service) { s.Spec.ClusterIPs, s.Spec.ClusterIP = []string{"fe80::1%eth0"}, "" }),
			want:     []string{`Service default/web: spec.clusterIPs[0]: invalid IP "fe80::1%eth0": zone not allowed`},
		},
		{
			name:     "IPv4-mapped cluster IP",
			services: web(func(s *corev1.Service) { s.Spec.ClusterIPs, s.Spec.ClusterIP = []string{"::ffff:10.96.0.1"}, "" }),
			want:     []string{`Service default/web: spec.clusterIPs[0]: invalid IP "::ffff:10.96.0.1": IPv4-mapped IPv6 address not allowed`},
		},
		{
			name:     "no cluster IP",
			services: web(func(s *corev1.Service) { s.Spec.ClusterIPs, s.Spec.ClusterIP = nil, "" }),
			want:     []string{"Service default/web: spec.clusterIP: missing (servicepath does not allocate cluster IPs)"},
		},
		{
			name:     "clusterIP and clusterIPs disagree",
			services: web(func(s *corev1.Service) { s.Spec.ClusterIP = "10.96.0.2" }),
			want:     []string{`Service default/web: spec.clusterIP: "10.96.0.2" differs from spec.clusterIPs[0] "10.96.0.1"`},
		},
		{
			name:     "two cluster IPs of one family",
			services: web(func(s *corev1.Service) { s.Spec.ClusterIPs = []string{"10.96.0.1", "10.96.0.2"} }),
			want:     []string{"Service default/web: spec.clusterIPs[1]: 10.96.0.2 has the IP family of spec.clusterIPs[0]"},
		},
		{
			name:     "three cluster IPs",
			services: web(func(s *corev1.Service) { s.Spec.ClusterIPs = []string{"10.96.0.1", "fd00::1", "fd00::2"} }),
			want: []string{
				"Service default/web: spec.clusterIPs: 3 entries, at most one per IP family",
				"Service default/web: spec.clusterIPs[2]: fd00::2 has the IP family of spec.clusterIPs[1]",
			},
		},
		{
			name:     "port out of range",
			services: web(func(s *corev1.Service) { s.Spec.Ports[0].Port = 70000 }),
			want:     []string{"Service default/web: spec.ports[0].port: 70000 out of range"},
		},
		{
			name:     "port 0",
			services: web(func(s *corev1.Service) { s.Spec.Ports[0].Port = 0 }),
			want:     []string{"Service default/web: spec.ports[0].port: 0 out of range"},
		},
		{
			name:     "no ports",
			services: web(func(s *corev1.Service) { s.Spec.Ports = nil }),
			want:     []string{"Service default/web: spec.ports: at least one port is required"},
		},
		{
			name: "unnamed port among several",
			services: web(func(s *corev1.Service) {
				s.Spec.Ports = append(s.Spec.Ports, sport("", corev1.ProtocolTCP, 81))
			}),
			want: []string{"Service default/web: spec.ports[1].name: required when the Service has more than one port"},
		},
		{
			name: "duplicate port name",
			services: web(func(s *corev1.Service) {
				s.Spec.Ports = append(s.Spec.Ports, sport("http", corev1.ProtocolTCP, 81))
			}),
			want: []string{`Service default/web: spec.ports[1].name: duplicate name "http"`},
		},
		{
			name: "duplicate port number and protocol",
			services: web(func(s *corev1.Service) {
				s.Spec.Ports = append(s.Spec.Ports, sport("web", corev1.ProtocolTCP, 80), sport("dns", corev1.ProtocolUDP, 80))
			}),
			want: []string{"Service default/web: spec.ports[1]: duplicate port 80/TCP"},
		},
		{
			name:     "unknown type",
			services: web(func(s *corev1.Service) { s.Spec.Type = "Magic" }),
			want:     []string{`Service default/web: spec.type: unknown type "Magic"`},
		},
		{
			name:     "missing Service name",
			services: web(func(s *corev1.Service) { s.Name = "" }),
			want:     []string{"Service default/: metadata.name: missing"},
		},
		{
			name:     "Service given twice",
			services: append(web(func(*corev1.Service) {}), okSvc...),
			want:     []string{"Service default/web: given more than once"},
		},
		{
			name: "two Services on one frontend",
			services: append(web(func(*corev1.Service) {}),
				svc("web2", []string{"fd00::1", "10.96.0.1"}, sport("web", corev1.ProtocolTCP, 80))),
			want: []string{"Service default/web2: spec.clusterIPs[1], spec.ports[0]: frontend 10.96.0.1:80/TCP is already Service default/web's"},
		},
		{
			name:     "slice without service-name label",
			services: okSvc,
			slices:   webSlice(func(es *discoveryv1.EndpointSlice) { es.Labels = nil }),
			want:     []string{"EndpointSlice default/web-abc: metadata.labels: label kubernetes.io/service-name naming the Service is missing"},
		},
		{
			name:     "missing slice name",
			services: okSvc,
			slices:   webSlice(func(es *discoveryv1.EndpointSlice) { es.Name = "" }),
			want:     []string{"EndpointSlice default/: metadata.name: missing"},
		},
		{
			name:     "invalid endpoint address",
			services: okSvc,
			slices:   webSlice(func(es *discoveryv1.EndpointSlice) { es.Endpoints[2].Addresses[0] = "10.0.0.300" }),
			want:     []string{`EndpointSlice default/web-abc: endpoints[2].addresses[0]: invalid IP "10.0.0.300"`},
		},
		{
			name:     "address not of the slice's addressType",
			services: okSvc,
			slices:   webSlice(func(es *discoveryv1.EndpointSlice) { es.Endpoints[1].Addresses = []string{"10.0.0.2", "fd00::2"} }),
			want:     []string{`EndpointSlice default/web-abc: endpoints[1].addresses[1]: "fd00::2" is not an IPv4 address`},
		},
		{
			name:     "IPv4 address in an IPv6 slice",
			services: okSvc,
			slices: webSlice(func(es *discoveryv1.EndpointSlice) {
				es.AddressType = discoveryv1.AddressTypeIPv6
				es.Endpoints = es.Endpoints[:1]
			}),
			want: []string{`EndpointSlice default/web-abc: endpoints[0].addresses[0]: "10.0.0.1" is not an IPv6 address`},
		},
		{
			name:     "endpoint without address",
			services: okSvc,
			slices:   webSlice(func(es *discoveryv1.EndpointSlice) { es.Endpoints[0].Addresses = nil }),
			want:     []string{"EndpointSlice default/web-abc: endpoints[0].addresses: at least one address is required"},
		},
		{
			name:     "unknown address type",
			services: okSvc,
			slices:   webSlice(func(es *discoveryv1.EndpointSlice) { es.AddressType = "IPX" }),
			want:     []string{`EndpointSlice default/web-abc: addressType: unknown address type "IPX"`},
		},
		{
			name:     "slice port out of range",
			services: okSvc,
			slices:   webSlice(func(es *discoveryv1.EndpointSlice) { es.Ports[0].Port = ptr[int32](0) }),
			want:     []string{"EndpointSlice default/web-abc: ports[0].port: 0 out of range"},
		},
		{
			name:     "slice port name duplicated",
			services: okSvc,
			slices: webSlice(func(es *discoveryv1.EndpointSlice) {
				es.Ports = append(es.Ports, eport("http", corev1.ProtocolUDP, 53))
			}),
			want: []string{`EndpointSlice default/web-abc: ports[1].name: duplicate name "http"`},
		},
		{
			name:     "slice port protocol unknown",
			services: okSvc,
			slices:   webSlice(func(es *discoveryv1.EndpointSlice) { es.Ports[0].Protocol = ptr[corev1.Protocol]("tcp") }),
			want:     []string{`EndpointSlice default/web-abc: ports[0].protocol: unknown protocol "tcp"`},
		},
		{
			name:     "slice given twice",
			services: okSvc,
			slices:   append(webSlice(func(*discoveryv1.EndpointSlice) {}), webSlice(func(*discoveryv1.EndpointSlice) {})...),
			want:     []string{"EndpointSlice default/web-abc: given more than once"},
		},
		{
			name:     "bad slice of no Service is still an error",
			services: okSvc,
			slices: []*discoveryv1.EndpointSlice{eslice("gone-1", "gone", discoveryv1.AddressTypeIPv4, httpEP,
				readyEP("not-an-ip"))},
			want: []string{`EndpointSlice default/gone-1: endpoints[0].addresses[0]: invalid IP "not-an-ip"`},
		},
		{
			name: "bad source range in the field",
			services: web(func(s *corev1.Service) {
				s.Spec.LoadBalancerSourceRanges = []string{"10.0.0.0/8", "10.0.0.0/33", "::ffff:10.0.0.0/104"}
			}),
			want: []string{
				`Service default/web: spec.loadBalancerSourceRanges[1]: invalid CIDR "10.0.0.0/33"`,
				`Service default/web: spec.loadBalancerSourceRanges[2]: invalid CIDR "::ffff:10.0.0.0/104": IPv4-mapped IPv6 not allowed`,
			},
		},
		{
			name: "bad source range in the annotation",
			services: web(func(s *corev1.Service) {
				s.Annotations = map[string]string{AnnotationSourceRanges: "10.0.0.0/8,10.0.0.1"}
			}),
			want: []string{`Service default/web: metadata.annotations[service.beta.kubernetes.io/load-balancer-source-ranges]: invalid CIDR "10.0.0.1"`},
		},
		{
			name:     "unknown lb-mode",
			services: web(func(s *corev1.Service) { s.Annotations = map[string]string{AnnotationLBMode: "DSR"} }),
			want:     []string{`Service default/web: metadata.annotations[servicepath.io/lb-mode]: unknown load-balancing mode "DSR" (want snat, dsr or hybrid)`},
		},
		{
			name: "unknown dsr-dispatch",
			services: web(func(s *corev1.Service) {
				s.Annotations = map[string]string{AnnotationLBMode: "dsr", AnnotationDSRDispatch: "gre"}
			}),
			want: []string{`Service default/web: metadata.annotations[servicepath.io/dsr-dispatch]: unknown DSR dispatch "gre" (want option or ipip)`},
		},
		{
			name:     "ipip dispatch without DSR",
			services: web(func(s *corev1.Service) { s.Annotations = map[string]string{AnnotationDSRDispatch: "ipip"} }),
			want:     []string{"Service default/web: metadata.annotations[servicepath.io/dsr-dispatch]: ipip needs servicepath.io/lb-mode dsr or hybrid"},
		},
		{
			name:     "unknown lb-algorithm",
			services: web(func(s *corev1.Service) { s.Annotations = map[string]string{AnnotationLBAlgorithm: "round-robin"} }),
			want:     []string{`Service default/web: metadata.annotations[servicepath.io/lb-algorithm]: unknown algorithm "round-robin" (want random or maglev)`},
		},
		{
			name:     "unknown externalTrafficPolicy",
			services: web(func(s *corev1.Service) { s.Spec.ExternalTrafficPolicy = "Nearest" }),
			want:     []string{`Service default/web: spec.externalTrafficPolicy: unknown policy "Nearest"`},
		},
		{
			name: "every error is reported, slices first, then Services by name",
			services: []*corev1.Service{
				svc("z", []string{"10.96.0.300"}, httpSvc),
				svc("a", []string{"10.96.0.1"}, sport("http", corev1.ProtocolTCP, -1), sport("", corev1.ProtocolSCTP, 9)),
			},
			slices: []*discoveryv1.EndpointSlice{eslice("a-1", "a", discoveryv1.AddressTypeIPv4, httpEP, readyEP("fd00::1"))},
			want: []string{
				`EndpointSlice default/a-1: endpoints[0].addresses[0]: "fd00::1" is not an IPv4 address`,
				"Service default/a: spec.ports[0].port: -1 out of range",
				"Service default/a: spec.ports[1].name: required when the Service has more than one port",
				`Service default/z: spec.clusterIPs[0]: invalid IP "10.96.0.300"`,
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := Translate(tt.services, tt.slices)
			require.Error(t, err, "invalid objects must be refused")
			assert.Equal(t, tt.want, strings.Split(err.Error(), "\n"), "error lines")
			assert.Equal(t, Result{}, res, "no result with an error")
		})
	}
}

func TestServiceNames(t *testing.T) {
	s := func(ns, name string) *corev1.Service {
		return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	}
	got := ServiceNames([]*corev1.Service{s("shop", "web"), s("", "web"), s("default", "api"), s("default", "web")})
	assert.Equal(t, []string{"default/api", "default/web", "shop/web"}, got, "sorted, namespace defaulted, deduplicated")
	assert.Empty(t, ServiceNames(nil), "no Services, no names")
}

func TestDemoManifest(t *testing.T) {
	objs, err := ReadManifests("../deploy/examples/demo.yaml")
	require.NoError(t, err, "reading the demo manifest")
	assert.Empty(t, objs.Ignored, "the demo has only Services and EndpointSlices")
	res, err := Translate(objs.Services, objs.EndpointSlices)
	require.NoError(t, err, "translating the demo")
	assert.Empty(t, res.Skipped, "nothing skipped")
	assert.Empty(t, res.Unsupported, "nothing unsupported")
	assert.Equal(t, []string{"default/demo"}, ServiceNames(objs.Services), "owner name for delete -f")

	v4 := func(port uint16) []service.Backend {
		return []service.Backend{be("198.18.0.11:"+strconv.Itoa(int(port)), A), be("198.18.0.12:"+strconv.Itoa(int(port)), A), be("198.18.0.13:"+strconv.Itoa(int(port)), A)}
	}
	v6 := func(port uint16) []service.Backend {
		return []service.Backend{be("[fd00:5e::11]:"+strconv.Itoa(int(port)), A), be("[fd00:5e::12]:"+strconv.Itoa(int(port)), A), be("[fd00:5e::13]:"+strconv.Itoa(int(port)), A)}
	}
	want := []service.Service{
		{Name: "default/demo", PortName: "tcp-echo", Frontend: fe("198.19.0.10", 80, service.TCP), Backends: v4(8080)},
		{Name: "default/demo", PortName: "tcp-echo", Frontend: fe("fd00:5f::10", 80, service.TCP), Backends: v6(8080)},
		{Name: "default/demo", PortName: "udp-echo", Frontend: fe("198.19.0.10", 53, service.UDP), Backends: v4(5353)},
		{Name: "default/demo", PortName: "udp-echo", Frontend: fe("fd00:5f::10", 53, service.UDP), Backends: v6(5353)},
	}
	assert.Equal(t, want, res.Services, "4 services with 3 active backends each")
	for _, s := range res.Services {
		assert.NoError(t, s.Validate(), "demo service %s validates", s.Frontend)
	}
}
