// Package k8s translates Kubernetes Services and EndpointSlices into
// servicepath's service model, and reads them from manifests.
package k8s

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/servicepath/servicepath/datapath/service"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// LabelServiceProxyName marks a Service as handled by another proxy;
// kube-proxy leaves such Services alone, and so does servicepath.
const LabelServiceProxyName = "service.kubernetes.io/service-proxy-name"

// Annotations that choose how a Service's external frontends (NodePort,
// external IPs, load-balancer IPs) balance; cluster IPs keep the defaults.
const (
	// AnnotationLBMode is snat (default), dsr or hybrid (DSR for TCP, SNAT
	// for UDP): how a node reaches a backend on another node.
	AnnotationLBMode = "servicepath.io/lb-mode"
	// AnnotationDSRDispatch is option (default) or ipip: how a DSR flow
	// names its service to the backend's node.
	AnnotationDSRDispatch = "servicepath.io/dsr-dispatch"
	// AnnotationLBAlgorithm is random (default) or maglev: Maglev makes
	// every node pick the same backend for a flow.
	AnnotationLBAlgorithm = "servicepath.io/lb-algorithm"
	// AnnotationSourceRanges is the older spelling of
	// spec.loadBalancerSourceRanges, comma-separated; the field wins.
	AnnotationSourceRanges = "service.beta.kubernetes.io/load-balancer-source-ranges"
)

// Result is the datapath's view of a set of Services.
type Result struct {
	// Services are sorted by Name, then PortName, then Frontend.
	Services []service.Service
	// Skipped lists Services that get no frontend by design, with why.
	Skipped []string
	// Unsupported lists service ports that the datapath cannot handle.
	Unsupported []string
}

// ServiceNames returns the "namespace/name" of each Service, sorted and
// without duplicates: the owners whose frontends "delete -f" removes.
func ServiceNames(services []*corev1.Service) []string {
	names := make([]string, 0, len(services))
	for _, svc := range services {
		names = append(names, objectName(svc.Namespace, svc.Name))
	}
	slices.Sort(names)
	return slices.Compact(names)
}

// byName sorts objs by "namespace/name", keeping the first of a name given
// more than once and an error for each other, naming its kind.
func byName[T metav1.Object](kind string, objs []T) ([]T, []error) {
	name := func(o T) string { return objectName(o.GetNamespace(), o.GetName()) }
	sorted := slices.Clone(objs)
	slices.SortStableFunc(sorted, func(a, b T) int { return cmp.Compare(name(a), name(b)) })
	var out []T
	var errs []error
	for i, o := range sorted {
		if i > 0 && name(o) == name(sorted[i-1]) {
			errs = append(errs, fmt.Errorf("%s %s: given more than once", kind, name(o)))
			continue
		}
		out = append(out, o)
	}
	return out, errs
}

// SliceOwner is the "namespace/name" of the Service an EndpointSlice
// belongs to, or "" when its label does not name one.
func SliceOwner(es *discoveryv1.EndpointSlice) string {
	if es.Labels[discoveryv1.LabelServiceName] == "" {
		return ""
	}
	return objectName(es.Namespace, es.Labels[discoveryv1.LabelServiceName])
}

// ServiceName is the "namespace/name" Translate names a Service's
// frontends by.
func ServiceName(svc *corev1.Service) string { return objectName(svc.Namespace, svc.Name) }

// objectName defaults the namespace as kubectl does for a manifest.
func objectName(namespace, name string) string {
	if namespace == "" {
		namespace = "default"
	}
	return namespace + "/" + name
}

// fieldError names the object and field at fault.
func fieldError(kind, name, field, format string, args ...any) error {
	return fmt.Errorf("%s %s: %s: %s", kind, name, field, fmt.Sprintf(format, args...))
}

// parseIP refuses what the datapath could not treat as one plain address.
func parseIP(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	switch {
	case err != nil:
		return netip.Addr{}, fmt.Errorf("invalid IP %q", s)
	case a.Zone() != "":
		return netip.Addr{}, fmt.Errorf("invalid IP %q: zone not allowed", s)
	case a.Is4In6():
		return netip.Addr{}, fmt.Errorf("invalid IP %q: IPv4-mapped IPv6 address not allowed", s)
	}
	return a, nil
}

type slicePort struct {
	name     string
	protocol service.Protocol
	port     uint16
}

type endpoint struct {
	addr netip.Addr
	// port is the slice port's, once matched to a service port.
	port     uint16
	state    service.BackendState
	nodeName string
	// forZones and forNodes are the slice's topology hints.
	forZones, forNodes []string
}

type parsedSlice struct {
	ipv4      bool
	ports     []slicePort
	endpoints []endpoint
}

// parseSlice validates a slice; it returns nil for an FQDN slice, which
// has no addresses the datapath can use.
func parseSlice(es *discoveryv1.EndpointSlice) (*parsedSlice, []error) {
	name := objectName(es.Namespace, es.Name)
	var errs []error
	fail := func(field, format string, args ...any) {
		errs = append(errs, fieldError("EndpointSlice", name, field, format, args...))
	}
	if es.Name == "" {
		fail("metadata.name", "missing")
	}
	if es.Labels[discoveryv1.LabelServiceName] == "" {
		fail("metadata.labels", "label %s naming the Service is missing", discoveryv1.LabelServiceName)
	}
	ps := &parsedSlice{ipv4: es.AddressType == discoveryv1.AddressTypeIPv4}
	switch es.AddressType {
	case discoveryv1.AddressTypeIPv4, discoveryv1.AddressTypeIPv6:
	case discoveryv1.AddressTypeFQDN:
		ps = nil
	default:
		fail("addressType", "unknown address type %q", es.AddressType)
		ps = nil
	}

	names := map[string]bool{}
	for i, p := range es.Ports {
		// Defaults as the API server applies them.
		var name string
		if p.Name != nil {
			name = *p.Name
		}
		protocol := corev1.ProtocolTCP
		if p.Protocol != nil {
			protocol = *p.Protocol
		}
		if names[name] {
			fail(fmt.Sprintf("ports[%d].name", i), "duplicate name %q", name)
		}
		names[name] = true
		switch protocol {
		case corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP:
		default:
			fail(fmt.Sprintf("ports[%d].protocol", i), "unknown protocol %q", protocol)
		}
		if p.Port == nil {
			continue // kube-proxy ignores a port without a number
		}
		if *p.Port < 1 || *p.Port > 65535 {
			fail(fmt.Sprintf("ports[%d].port", i), "%d out of range", *p.Port)
			continue
		}
		// An SCTP port matches no service port the datapath handles.
		if proto, err := service.ParseProtocol(string(protocol)); err == nil && ps != nil {
			ps.ports = append(ps.ports, slicePort{name: name, protocol: proto, port: uint16(*p.Port)})
		}
	}
	if ps == nil {
		return nil, errs
	}

	for i, ep := range es.Endpoints {
		if len(ep.Addresses) == 0 {
			fail(fmt.Sprintf("endpoints[%d].addresses", i), "at least one address is required")
			continue
		}
		var first netip.Addr
		for j, s := range ep.Addresses {
			field := fmt.Sprintf("endpoints[%d].addresses[%d]", i, j)
			a, err := parseIP(s)
			if err != nil {
				fail(field, "%v", err)
				continue
			}
			if a.Is4() != ps.ipv4 {
				fail(field, "%q is not an %s address", s, es.AddressType)
				continue
			}
			if j == 0 {
				first = a
			}
		}
		// Like kube-proxy, only the first address is used.
		if state, ok := endpointState(ep.Conditions); ok && first.IsValid() {
			e := endpoint{addr: first, state: state, nodeName: ptrValue(ep.NodeName)}
			if h := ep.Hints; h != nil {
				for _, z := range h.ForZones {
					e.forZones = append(e.forZones, z.Name)
				}
				for _, n := range h.ForNodes {
					e.forNodes = append(e.forNodes, n.Name)
				}
			}
			ps.endpoints = append(ps.endpoints, e)
		}
	}
	return ps, errs
}

func ptrValue[T any](p *T) T {
	var v T
	if p != nil {
		v = *p
	}
	return v
}

// endpointState applies the API's defaults: nil ready and nil serving
// mean true, nil terminating means false.
func endpointState(c discoveryv1.EndpointConditions) (service.BackendState, bool) {
	ready := c.Ready == nil || *c.Ready
	serving := c.Serving == nil || *c.Serving
	terminating := c.Terminating != nil && *c.Terminating
	switch {
	case ready:
		return service.Active, true
	case serving && terminating:
		return service.Terminating, true
	}
	return 0, false
}

type servicePort struct {
	name     string
	protocol service.Protocol
	port     uint16
	nodePort uint16 // 0: none
	field    string
}

// frontAddr is an address a Service answers on, and where it came from.
type frontAddr struct {
	addr  netip.Addr // the unspecified address of its family for NodePort
	kind  service.Kind
	field string
}

type parsedService struct {
	name string
	// localOnly is internalTrafficPolicy Local; externalLocal is
	// externalTrafficPolicy Local.
	localOnly, externalLocal bool
	addrs                    []frontAddr
	ports                    []servicePort
	affinity                 time.Duration
	// sourceRanges are masked and deduplicated, both families; a family
	// with an allow-all range has none.
	sourceRanges []netip.Prefix
	maglev       bool
	mode         service.Mode
	dispatch     service.Dispatch
}

// frontends lists every (frontend, fields) a parsed Service produces: each
// address with each port, NodePorts on their node port.
func (ps *parsedService) frontends(fn func(fe service.Frontend, p servicePort, field string)) {
	for _, a := range ps.addrs {
		for _, p := range ps.ports {
			port, field := p.port, a.field+", "+p.field
			if a.kind == service.NodePort {
				if p.nodePort == 0 {
					continue
				}
				port, field = p.nodePort, p.field+".nodePort"
			}
			fn(service.Frontend{Addr: a.addr, Port: port, Protocol: p.protocol, Kind: a.kind}, p, field)
		}
	}
}

// skipReason says why a Service gets no frontend at all, or "".
func skipReason(svc *corev1.Service) string {
	if owner, ok := svc.Labels[LabelServiceProxyName]; ok {
		return fmt.Sprintf("label %s=%q: handled by another proxy", LabelServiceProxyName, owner)
	}
	// kube-proxy's informer leaves these out whatever the label's value.
	if _, ok := svc.Labels[corev1.IsHeadlessService]; ok {
		return fmt.Sprintf("label %s: headless", corev1.IsHeadlessService)
	}
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		return "type ExternalName has no cluster IP"
	}
	if svc.Spec.ClusterIP == corev1.ClusterIPNone ||
		len(svc.Spec.ClusterIPs) > 0 && svc.Spec.ClusterIPs[0] == corev1.ClusterIPNone {
		return "headless (clusterIP None)"
	}
	return ""
}

// parseService validates a Service that is not skipped. Ports with a
// protocol the datapath lacks are returned as unsupported, not as errors.
func parseService(svc *corev1.Service) (*parsedService, []string, []error) {
	ps := &parsedService{
		name:          objectName(svc.Namespace, svc.Name),
		localOnly:     ptrValue(svc.Spec.InternalTrafficPolicy) == corev1.ServiceInternalTrafficPolicyLocal,
		externalLocal: svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal,
	}
	var errs []error
	var unsupported []string
	fail := func(field, format string, args ...any) {
		errs = append(errs, fieldError("Service", ps.name, field, format, args...))
	}
	if svc.Name == "" {
		fail("metadata.name", "missing")
	}
	switch svc.Spec.Type {
	case "", corev1.ServiceTypeClusterIP, corev1.ServiceTypeNodePort, corev1.ServiceTypeLoadBalancer:
	default:
		fail("spec.type", "unknown type %q", svc.Spec.Type)
	}
	switch svc.Spec.ExternalTrafficPolicy {
	case "", corev1.ServiceExternalTrafficPolicyCluster, corev1.ServiceExternalTrafficPolicyLocal:
	default:
		fail("spec.externalTrafficPolicy", "unknown policy %q", svc.Spec.ExternalTrafficPolicy)
	}
	parseBalancing(svc, ps, fail)

	ips, field := svc.Spec.ClusterIPs, "spec.clusterIPs"
	switch {
	case len(ips) == 0 && svc.Spec.ClusterIP == "":
		fail("spec.clusterIP", "missing (servicepath does not allocate cluster IPs)")
	case len(ips) == 0:
		ips, field = []string{svc.Spec.ClusterIP}, "spec.clusterIP"
	case svc.Spec.ClusterIP != "" && svc.Spec.ClusterIP != ips[0]:
		fail("spec.clusterIP", "%q differs from spec.clusterIPs[0] %q", svc.Spec.ClusterIP, ips[0])
	case len(ips) > 2:
		fail("spec.clusterIPs", "%d entries, at most one per IP family", len(ips))
	}
	for i, s := range ips {
		f := field
		if field == "spec.clusterIPs" {
			f = fmt.Sprintf("%s[%d]", field, i)
		}
		a, err := parseIP(s)
		if err != nil {
			fail(f, "%v", err)
			continue
		}
		if j := slices.IndexFunc(ps.addrs, func(v frontAddr) bool { return v.addr.Is4() == a.Is4() }); j >= 0 {
			fail(f, "%s has the IP family of %s", a, ps.addrs[j].field)
			continue
		}
		ps.addrs = append(ps.addrs, frontAddr{addr: a, kind: service.ClusterIP, field: f})
	}
	clusterIPs := slices.Clone(ps.addrs)
	if svc.Spec.Type == corev1.ServiceTypeNodePort || svc.Spec.Type == corev1.ServiceTypeLoadBalancer {
		// A NodePort answers on every node address of each of the
		// Service's families.
		for _, c := range clusterIPs {
			any := netip.IPv4Unspecified()
			if c.addr.Is6() {
				any = netip.IPv6Unspecified()
			}
			ps.addrs = append(ps.addrs, frontAddr{addr: any, kind: service.NodePort})
		}
	}
	for i, e := range svc.Spec.ExternalIPs {
		f := fmt.Sprintf("spec.externalIPs[%d]", i)
		a, err := parseIP(e)
		if err != nil {
			fail(f, "%v", err)
			continue
		}
		ps.addrs = append(ps.addrs, frontAddr{addr: a, kind: service.ExternalIP, field: f})
	}
	if svc.Spec.Type == corev1.ServiceTypeLoadBalancer {
		for i, in := range svc.Status.LoadBalancer.Ingress {
			if in.IP == "" {
				continue // a hostname: the load balancer resolves it, not us
			}
			f := fmt.Sprintf("status.loadBalancer.ingress[%d].ip", i)
			a, err := parseIP(in.IP)
			if err != nil {
				fail(f, "%v", err)
				continue
			}
			ps.addrs = append(ps.addrs, frontAddr{addr: a, kind: service.LoadBalancer, field: f})
		}
	}
	switch svc.Spec.SessionAffinity {
	case "", corev1.ServiceAffinityNone:
	case corev1.ServiceAffinityClientIP:
		ps.affinity = time.Duration(corev1.DefaultClientIPServiceAffinitySeconds) * time.Second
		if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
			t := *c.ClientIP.TimeoutSeconds
			if t < 1 || t > int32(service.MaxAffinity/time.Second) {
				fail("spec.sessionAffinityConfig.clientIP.timeoutSeconds", "%d out of range (1 to %d)", t, int(service.MaxAffinity/time.Second))
			}
			ps.affinity = time.Duration(t) * time.Second
		}
	default:
		fail("spec.sessionAffinity", "unknown affinity %q", svc.Spec.SessionAffinity)
	}

	if len(svc.Spec.Ports) == 0 {
		fail("spec.ports", "at least one port is required")
	}
	names := map[string]bool{}
	numbers := map[string]bool{}
	for i, p := range svc.Spec.Ports {
		f := fmt.Sprintf("spec.ports[%d]", i)
		switch {
		case p.Name == "" && len(svc.Spec.Ports) > 1:
			fail(f+".name", "required when the Service has more than one port")
		case names[p.Name]:
			fail(f+".name", "duplicate name %q", p.Name)
		}
		names[p.Name] = true
		if p.Port < 1 || p.Port > 65535 {
			fail(f+".port", "%d out of range", p.Port)
			continue
		}
		protocol := cmp.Or(p.Protocol, corev1.ProtocolTCP)
		key := fmt.Sprintf("%d/%s", p.Port, protocol)
		if numbers[key] {
			fail(f, "duplicate port %s", key)
		}
		numbers[key] = true
		proto, err := service.ParseProtocol(string(protocol))
		if err != nil {
			unsupported = append(unsupported, fmt.Sprintf("Service %s: %s.protocol: %s is not handled by the datapath", ps.name, f, protocol))
			continue
		}
		if p.NodePort < 0 || p.NodePort > 65535 {
			fail(f+".nodePort", "%d out of range", p.NodePort)
			continue
		}
		ps.ports = append(ps.ports, servicePort{name: p.Name, protocol: proto, port: uint16(p.Port), nodePort: uint16(p.NodePort), field: f})
	}
	return ps, unsupported, errs
}

// parseBalancing reads the source ranges and servicepath's annotations.
func parseBalancing(svc *corev1.Service, ps *parsedService, fail func(field, format string, args ...any)) {
	annotation := func(key string) string { return "metadata.annotations[" + key + "]" }
	// The field wins over the annotation, as in Kubernetes; both may be
	// padded with spaces, which the API lets through.
	ranges, field := svc.Spec.LoadBalancerSourceRanges, "spec.loadBalancerSourceRanges"
	if a, ok := svc.Annotations[AnnotationSourceRanges]; ok && len(ranges) == 0 {
		ranges, field = strings.Split(a, ","), annotation(AnnotationSourceRanges)
	}
	allowAll := map[bool]bool{}
	for i, r := range ranges {
		f := field
		if field == "spec.loadBalancerSourceRanges" {
			f = fmt.Sprintf("%s[%d]", field, i)
		}
		p, err := netip.ParsePrefix(strings.TrimSpace(r))
		switch {
		case err != nil:
			fail(f, "invalid CIDR %q", r)
			continue
		case p.Addr().Is4In6():
			fail(f, "invalid CIDR %q: IPv4-mapped IPv6 not allowed", r)
			continue
		case p.Bits() == 0:
			allowAll[p.Addr().Is4()] = true // kube-proxy: the family is not restricted
		}
		if p = p.Masked(); !slices.Contains(ps.sourceRanges, p) {
			ps.sourceRanges = append(ps.sourceRanges, p)
		}
	}
	ps.sourceRanges = slices.DeleteFunc(ps.sourceRanges, func(p netip.Prefix) bool { return allowAll[p.Addr().Is4()] })
	slices.SortFunc(ps.sourceRanges, func(a, b netip.Prefix) int {
		return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
	})

	if v, ok := svc.Annotations[AnnotationLBMode]; ok {
		m, err := service.ParseMode(v)
		if err != nil {
			fail(annotation(AnnotationLBMode), "%v", err)
		}
		ps.mode = m
	}
	if v, ok := svc.Annotations[AnnotationDSRDispatch]; ok {
		d, err := service.ParseDispatch(v)
		switch {
		case err != nil:
			fail(annotation(AnnotationDSRDispatch), "%v", err)
		case d == service.IPIP && ps.mode == service.SNAT:
			fail(annotation(AnnotationDSRDispatch), "%s needs %s dsr or hybrid", d, AnnotationLBMode)
		}
		ps.dispatch = d
	}
	switch v, ok := svc.Annotations[AnnotationLBAlgorithm]; {
	case !ok || v == "random":
	case v == "maglev":
		ps.maglev = true
	default:
		fail(annotation(AnnotationLBAlgorithm), "unknown algorithm %q (want random or maglev)", v)
	}
}

// Options adapt a translation to the node whose datapath it programs.
type Options struct {
	// NodeName is the node the datapath runs on. When set, as kube-proxy
	// does, a Service with internalTrafficPolicy Local gets only the
	// endpoints whose nodeName is this node on its cluster IPs, and one
	// with externalTrafficPolicy Local the same on its external frontends.
	// Where the Service has endpoints on other nodes, these say
	// InternalLocal or ExternalLocal (no local endpoint: the node drops;
	// with no endpoint anywhere it refuses, as kube-proxy), and the
	// external ones get a second, InCluster frontend with the cluster's
	// endpoints, for this node's pods and the host.
	// Manifests name no node: every endpoint is used, and both policies
	// act as Cluster. Only this node's Pods give HostPort frontends.
	NodeName string
	// Zone is the node's topology.kubernetes.io/zone label. With it (or
	// the node name) the frontends that use every endpoint honour the
	// slices' topology hints as kube-proxy does: see topologyMode.
	Zone string
}

// Translate turns Services and their EndpointSlices into datapath
// services, one per cluster IP and service port, with kube-proxy's
// semantics. It validates every object first: on any error it returns all
// errors found, each naming the object and field, and no result.
// Besides cluster IPs, NodePorts (every node address), external IPs and
// load-balancer ingress IPs become frontends; sessionAffinity ClientIP
// carries its timeout. The external frontends also carry
// externalTrafficPolicy (with a node name), loadBalancerSourceRanges
// (load-balancer IPs only) and the servicepath.io annotations.
func Translate(services []*corev1.Service, endpointSlices []*discoveryv1.EndpointSlice) (Result, error) {
	return TranslateWith(Options{}, services, endpointSlices)
}

// TranslateWith is Translate for the node opts names.
func TranslateWith(opts Options, services []*corev1.Service, endpointSlices []*discoveryv1.EndpointSlice) (Result, error) {
	var errs []error

	// Every slice is validated, even one no Service uses.
	sorted, dups := byName("EndpointSlice", endpointSlices)
	errs = append(errs, dups...)
	slicesOf := map[string][]*parsedSlice{}
	for _, es := range sorted {
		ps, perrs := parseSlice(es)
		errs = append(errs, perrs...)
		if ps != nil && len(perrs) == 0 {
			owner := objectName(es.Namespace, es.Labels[discoveryv1.LabelServiceName])
			slicesOf[owner] = append(slicesOf[owner], ps)
		}
	}

	sortedSvcs, dups := byName("Service", services)
	errs = append(errs, dups...)
	var res Result
	var parsed []*parsedService
	owners := map[service.Frontend]string{}
	for _, svc := range sortedSvcs {
		name := objectName(svc.Namespace, svc.Name)
		if reason := skipReason(svc); reason != "" {
			res.Skipped = append(res.Skipped, fmt.Sprintf("Service %s: %s", name, reason))
			continue
		}
		ps, unsupported, perrs := parseService(svc)
		res.Unsupported = append(res.Unsupported, unsupported...)
		errs = append(errs, perrs...)
		if len(perrs) > 0 {
			continue
		}
		// Two Services on one frontend would fight over its map entry.
		ps.frontends(func(fe service.Frontend, _ servicePort, field string) {
			key := fe
			key.Kind = service.ClusterIP // one map entry, whatever the kinds
			if other, ok := owners[key]; ok && other != name {
				errs = append(errs, fieldError("Service", name, field, "frontend %s is already Service %s's", fe, other))
			}
			owners[key] = name
		})
		parsed = append(parsed, ps)
	}
	if len(errs) > 0 {
		return Result{}, errors.Join(errs...)
	}

	for _, ps := range parsed {
		ps.frontends(func(fe service.Frontend, p servicePort, _ string) {
			eps := portEndpoints(slicesOf[ps.name], fe.Addr.Is4(), p)
			mode := opts.topologyMode(eps)
			// Terminating endpoints serve only while none is ready, and
			// then, as in kube-proxy, whatever the topology.
			cluster := backends(eps, func(ep endpoint) bool { return ep.state == service.Terminating || opts.inTopology(ep, mode) })
			local := backends(eps, func(ep endpoint) bool { return ep.nodeName == opts.NodeName })
			s := service.Service{
				Name:     ps.name,
				PortName: p.name,
				Frontend: fe,
				Backends: cluster,
				Affinity: ps.affinity,
			}
			// kube-proxy drops for want of local endpoints only when there
			// are endpoints elsewhere; without any it rejects, as for any
			// Service.
			switch {
			case opts.NodeName == "":
			case fe.Kind == service.ClusterIP && ps.localOnly:
				s.Backends, s.InternalLocal = local, len(eps) > 0
			case fe.Kind != service.ClusterIP && ps.externalLocal:
				s.Backends, s.ExternalLocal = local, len(eps) > 0
			}
			if fe.Kind != service.ClusterIP {
				s.Maglev, s.Mode, s.Dispatch = ps.maglev, ps.mode, ps.dispatch
			}
			if fe.Kind == service.LoadBalancer {
				for _, r := range ps.sourceRanges {
					if r.Addr().Is4() == fe.Addr.Is4() {
						s.SourceRanges = append(s.SourceRanges, r)
					}
				}
			}
			add := func(s service.Service) {
				if err := s.Validate(); err != nil {
					errs = append(errs, fmt.Errorf("Service %s: %w", ps.name, err))
				}
				res.Services = append(res.Services, s)
			}
			add(s)
			// kube-proxy sends this node's pods and the host to the
			// cluster's endpoints whatever the external policy:
			// UsesClusterEndpoints.
			if s.ExternalLocal {
				in := s
				in.Frontend.InCluster = true
				in.ExternalLocal = false
				in.Backends = cluster
				add(in)
			}
		})
	}
	if len(errs) > 0 {
		return Result{}, errors.Join(errs...)
	}
	// Stable: an InCluster frontend stays after its twin.
	slices.SortStableFunc(res.Services, func(a, b service.Service) int {
		return cmp.Or(
			cmp.Compare(a.Name, b.Name),
			cmp.Compare(a.PortName, b.PortName),
			cmp.Compare(a.Frontend.Kind, b.Frontend.Kind),
			a.Frontend.Addr.Compare(b.Frontend.Addr),
			cmp.Compare(a.Frontend.Port, b.Frontend.Port),
			cmp.Compare(a.Frontend.Protocol, b.Frontend.Protocol),
		)
	})
	return res, nil
}

// portEndpoints merges the endpoints of a Service's slices of one IP
// family for one service port, which a slice port matches by name and
// protocol, with their addresses on the slice's port.
func portEndpoints(pss []*parsedSlice, ipv4 bool, p servicePort) []endpoint {
	merged := map[netip.AddrPort]endpoint{}
	for _, ps := range pss {
		if ps.ipv4 != ipv4 {
			continue
		}
		for _, sp := range ps.ports {
			if sp.name != p.name || sp.protocol != p.protocol {
				continue
			}
			for _, ep := range ps.endpoints {
				ep.port = sp.port
				ap := netip.AddrPortFrom(ep.addr, ep.port)
				// A slice may lag behind another: Active wins.
				if e, ok := merged[ap]; !ok || e.state == service.Terminating {
					merged[ap] = ep
				}
			}
		}
	}
	return slices.Collect(maps.Values(merged))
}

// topology is which hints a node's cluster-wide frontends follow.
type topology int

const (
	anyTopology topology = iota
	sameNode             // PreferSameNode: the endpoints hinted for this node
	sameZone             // PreferSameZone, topology-mode Auto: for this zone
)

// topologyMode is kube-proxy 1.34's: the hints count only when every ready
// endpoint has one of their kind and one is for this node (node hints
// first) or its zone; otherwise every endpoint is used. kube-proxy reads
// no Service field for this: the EndpointSlice controller writes hints
// for trafficDistribution and the topology-mode annotation.
func (o Options) topologyMode(eps []endpoint) topology {
	ready, allNodes, forNode, allZones, forZone := false, true, false, true, false
	for _, ep := range eps {
		if ep.state != service.Active {
			continue
		}
		ready = true
		allNodes = allNodes && len(ep.forNodes) > 0
		forNode = forNode || o.NodeName != "" && slices.Contains(ep.forNodes, o.NodeName)
		allZones = allZones && len(ep.forZones) > 0
		forZone = forZone || o.Zone != "" && slices.Contains(ep.forZones, o.Zone)
	}
	switch {
	case ready && allNodes && forNode:
		return sameNode
	case ready && allZones && forZone:
		return sameZone
	}
	return anyTopology
}

func (o Options) inTopology(ep endpoint, mode topology) bool {
	switch mode {
	case sameNode:
		return slices.Contains(ep.forNodes, o.NodeName)
	case sameZone:
		return slices.Contains(ep.forZones, o.Zone)
	}
	return true
}

// backends are the endpoints keep accepts, sorted.
func backends(eps []endpoint, keep func(endpoint) bool) []service.Backend {
	out := []service.Backend{}
	for _, ep := range eps {
		if keep(ep) {
			out = append(out, service.Backend{Addr: ep.addr, Port: ep.port, State: ep.state})
		}
	}
	slices.SortFunc(out, func(a, b service.Backend) int {
		return cmp.Or(a.Addr.Compare(b.Addr), cmp.Compare(a.Port, b.Port))
	})
	return out
}
