package k8s

import (
	"cmp"
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apivalidation "k8s.io/apimachinery/pkg/api/validation"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	metav1validation "k8s.io/apimachinery/pkg/apis/meta/v1/validation"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/validation/field"
	netutils "k8s.io/utils/net"
)

// The rules below are the API server's create-time validation (v1.34) as far
// as it concerns a manifest servicepath programs; each names its upstream
// function in k8s.io/kubernetes. They run on a copy defaulted as the API
// server defaults it (SetDefaults_Service, normalizeClusterIPs), so a
// manifest is refused when `kubectl apply` would be refused. Where
// servicepath cannot do what the API server does it allocates nothing
// (cluster IPs, node ports, health-check ports) and knows neither the
// service CIDRs nor the node-port range: it checks numbers only. What the
// datapath itself needs beyond this (parseService, parseSlice) is checked
// after, at read time too.

var (
	portProtocols    = []string{string(corev1.ProtocolSCTP), string(corev1.ProtocolTCP), string(corev1.ProtocolUDP)}
	serviceTypes     = []string{string(corev1.ServiceTypeClusterIP), string(corev1.ServiceTypeExternalName), string(corev1.ServiceTypeLoadBalancer), string(corev1.ServiceTypeNodePort)}
	affinities       = []string{string(corev1.ServiceAffinityClientIP), string(corev1.ServiceAffinityNone)}
	trafficPolicies  = []string{"Cluster", "Local"}
	ipFamilies       = []string{string(corev1.IPv4Protocol), string(corev1.IPv6Protocol)}
	ipFamilyPolicies = []string{string(corev1.IPFamilyPolicyPreferDualStack), string(corev1.IPFamilyPolicyRequireDualStack), string(corev1.IPFamilyPolicySingleStack)}
	distributions    = []string{corev1.ServiceTrafficDistributionPreferClose, corev1.ServiceTrafficDistributionPreferSameZone, corev1.ServiceTrafficDistributionPreferSameNode}
	addressTypes     = []string{string(discoveryv1.AddressTypeFQDN), string(discoveryv1.AddressTypeIPv4), string(discoveryv1.AddressTypeIPv6)}
)

// Limits of ValidateEndpointSlice (pkg/apis/discovery/validation).
const (
	maxSliceEndpoints = 1000
	maxSliceAddresses = 100
	maxSlicePorts     = 20000
)

// maxAffinitySeconds is core.MaxClientIPServiceAffinitySeconds.
const maxAffinitySeconds = 86400

// validateMeta is ValidateObjectMeta with the namespace defaulted as
// kubectl does.
func validateMeta(m *metav1.ObjectMeta, nameFn apivalidation.ValidateNameFunc) field.ErrorList {
	meta := *m
	meta.Namespace = cmp.Or(meta.Namespace, "default")
	return apivalidation.ValidateObjectMeta(&meta, true, nameFn, field.NewPath("metadata"))
}

// validateService is ValidateServiceCreate (pkg/apis/core/validation) on
// svc defaulted as the API server would.
func validateService(in *corev1.Service) field.ErrorList {
	svc := defaultService(in)
	spec := &svc.Spec
	specPath := field.NewPath("spec")
	// ValidateServiceName is NameIsDNS1035Label.
	errs := validateMeta(&svc.ObjectMeta, apivalidation.NameIsDNS1035Label)

	// The registry checks cluster IPs and families first and stops there
	// (Allocators.initIPFamilyFields).
	if ipErrs := validateClusterIPs(svc); len(ipErrs) > 0 {
		return append(errs, ipErrs...)
	}

	headless := len(spec.ClusterIPs) > 0 && spec.ClusterIPs[0] == corev1.ClusterIPNone
	if len(spec.Ports) == 0 && !headless && spec.Type != corev1.ServiceTypeExternalName {
		errs = append(errs, field.Required(specPath.Child("ports"), ""))
	}
	if !slices.Contains(serviceTypes, string(spec.Type)) {
		errs = append(errs, field.NotSupported(specPath.Child("type"), spec.Type, serviceTypes))
	}
	if headless && (spec.Type == corev1.ServiceTypeNodePort || spec.Type == corev1.ServiceTypeLoadBalancer) {
		errs = append(errs, field.Invalid(specPath.Child("clusterIPs").Index(0), spec.ClusterIPs[0], fmt.Sprintf("may not be set to 'None' for %s services", spec.Type)))
	}
	// validateLoadBalancerClassField
	if c := spec.LoadBalancerClass; c != nil {
		if spec.Type == corev1.ServiceTypeLoadBalancer {
			errs = append(errs, dnsErrors(specPath.Child("loadBalancerClass"), *c, validation.IsQualifiedName)...)
		} else {
			errs = append(errs, field.Forbidden(specPath.Child("loadBalancerClass"), "may only be used when `type` is 'LoadBalancer'"))
		}
	}
	if spec.Type == corev1.ServiceTypeExternalName {
		if cname := strings.TrimSuffix(spec.ExternalName, "."); cname == "" {
			errs = append(errs, field.Required(specPath.Child("externalName"), ""))
		} else {
			errs = append(errs, dnsErrors(specPath.Child("externalName"), cname, validation.IsDNS1123Subdomain)...)
		}
	}

	// validateServicePort and the duplicate checks of validateService.
	names := map[string]bool{}
	ports := map[corev1.ServicePort]bool{}
	nodePorts := map[corev1.ServicePort]bool{}
	for i, p := range spec.Ports {
		f := specPath.Child("ports").Index(i)
		switch {
		case p.Name == "" && len(spec.Ports) > 1:
			errs = append(errs, field.Required(f.Child("name"), ""))
		case p.Name != "":
			errs = append(errs, dnsErrors(f.Child("name"), p.Name, validation.IsDNS1123Label)...)
			if names[p.Name] {
				errs = append(errs, field.Duplicate(f.Child("name"), p.Name))
			}
			names[p.Name] = true
		}
		for _, msg := range validation.IsValidPortNum(int(p.Port)) {
			errs = append(errs, field.Invalid(f.Child("port"), p.Port, msg))
		}
		if !slices.Contains(portProtocols, string(p.Protocol)) {
			errs = append(errs, field.NotSupported(f.Child("protocol"), p.Protocol, portProtocols))
		}
		errs = append(errs, validatePortNumOrName(p.TargetPort, f.Child("targetPort"))...)
		if p.AppProtocol != nil {
			errs = append(errs, dnsErrors(f.Child("appProtocol"), *p.AppProtocol, validation.IsQualifiedName)...)
		}
		if p.NodePort != 0 {
			if spec.Type == corev1.ServiceTypeClusterIP {
				errs = append(errs, field.Forbidden(f.Child("nodePort"), "may not be used when `type` is 'ClusterIP'"))
			}
			// The API server's allocator refuses what is outside its
			// --service-node-port-range; servicepath has no range.
			for _, msg := range validation.IsValidPortNum(int(p.NodePort)) {
				errs = append(errs, field.Invalid(f.Child("nodePort"), p.NodePort, msg))
			}
			key := corev1.ServicePort{Protocol: p.Protocol, NodePort: p.NodePort}
			if nodePorts[key] {
				errs = append(errs, field.Duplicate(f.Child("nodePort"), p.NodePort))
			}
			nodePorts[key] = true
		}
		key := corev1.ServicePort{Protocol: p.Protocol, Port: p.Port}
		if ports[key] {
			errs = append(errs, field.Duplicate(f, fmt.Sprintf("%d/%s", p.Port, p.Protocol)))
		}
		ports[key] = true
	}

	if spec.Selector != nil {
		errs = append(errs, metav1validation.ValidateLabels(spec.Selector, specPath.Child("selector"))...)
	}
	errs = append(errs, validateAffinity(spec, specPath)...)
	for i, ip := range spec.ExternalIPs {
		errs = append(errs, validateEndpointIP(specPath.Child("externalIPs").Index(i), ip)...)
	}
	errs = append(errs, validateSourceRanges(svc)...)
	if spec.AllocateLoadBalancerNodePorts != nil && spec.Type != corev1.ServiceTypeLoadBalancer {
		errs = append(errs, field.Forbidden(specPath.Child("allocateLoadBalancerNodePorts"), "may only be used when `type` is 'LoadBalancer'"))
	}
	errs = append(errs, validateTrafficPolicies(svc)...)
	if d := spec.TrafficDistribution; d != nil && !slices.Contains(distributions, *d) {
		errs = append(errs, field.NotSupported(specPath.Child("trafficDistribution"), *d, distributions))
	}
	return errs
}

// defaultService is SetDefaults_Service and normalizeClusterIPs
// (pkg/registry/core/service/storage) on a copy.
func defaultService(in *corev1.Service) *corev1.Service {
	svc := in.DeepCopy()
	spec := &svc.Spec
	spec.SessionAffinity = cmp.Or(spec.SessionAffinity, corev1.ServiceAffinityNone)
	if spec.SessionAffinity == corev1.ServiceAffinityNone {
		spec.SessionAffinityConfig = nil
	}
	if spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		if c := spec.SessionAffinityConfig; c == nil || c.ClientIP == nil || c.ClientIP.TimeoutSeconds == nil {
			t := corev1.DefaultClientIPServiceAffinitySeconds
			spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: &t}}
		}
	}
	spec.Type = cmp.Or(spec.Type, corev1.ServiceTypeClusterIP)
	for i := range spec.Ports {
		p := &spec.Ports[i]
		p.Protocol = cmp.Or(p.Protocol, corev1.ProtocolTCP)
		if p.TargetPort == intstr.FromInt32(0) || p.TargetPort == intstr.FromString("") {
			p.TargetPort = intstr.FromInt32(p.Port)
		}
	}
	if externallyAccessible(svc) && spec.ExternalTrafficPolicy == "" {
		spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyCluster
	}
	if spec.InternalTrafficPolicy == nil && spec.Type != corev1.ServiceTypeExternalName {
		cluster := corev1.ServiceInternalTrafficPolicyCluster
		spec.InternalTrafficPolicy = &cluster
	}
	if spec.ClusterIP != "" && len(spec.ClusterIPs) == 0 {
		spec.ClusterIPs = []string{spec.ClusterIP}
	}
	return svc
}

// externallyAccessible is ExternallyAccessible (pkg/api/service).
func externallyAccessible(svc *corev1.Service) bool {
	return svc.Spec.Type == corev1.ServiceTypeLoadBalancer || svc.Spec.Type == corev1.ServiceTypeNodePort ||
		svc.Spec.Type == corev1.ServiceTypeClusterIP && len(svc.Spec.ExternalIPs) > 0
}

// validateClusterIPs is ValidateServiceClusterIPsRelatedFields plus the
// single-stack check of Allocators.initIPFamilyFields.
func validateClusterIPs(svc *corev1.Service) field.ErrorList {
	spec := &svc.Spec
	specPath := field.NewPath("spec")
	ipsPath, familiesPath, policyPath := specPath.Child("clusterIPs"), specPath.Child("ipFamilies"), specPath.Child("ipFamilyPolicy")
	var errs field.ErrorList
	if spec.Type == corev1.ServiceTypeExternalName {
		if len(spec.ClusterIPs) > 0 {
			errs = append(errs, field.Forbidden(ipsPath, "may not be set for ExternalName services"))
		}
		if len(spec.IPFamilies) > 0 {
			errs = append(errs, field.Forbidden(familiesPath, "may not be set for ExternalName services"))
		}
		if spec.IPFamilyPolicy != nil {
			errs = append(errs, field.Forbidden(policyPath, "may not be set for ExternalName services"))
		}
		return errs
	}
	switch {
	case spec.ClusterIP != "" && spec.ClusterIPs[0] != spec.ClusterIP:
		errs = append(errs, field.Invalid(ipsPath, spec.ClusterIPs, "first value must match `clusterIP`"))
	case spec.ClusterIP == "" && len(spec.ClusterIPs) > 0:
		errs = append(errs, field.Invalid(ipsPath, spec.ClusterIPs, "must be empty when `clusterIP` is not specified"))
	}
	seen := map[corev1.IPFamily]bool{}
	for i, fam := range spec.IPFamilies {
		if !slices.Contains(ipFamilies, string(fam)) {
			errs = append(errs, field.NotSupported(familiesPath.Index(i), fam, ipFamilies))
		}
		if seen[fam] {
			errs = append(errs, field.Duplicate(familiesPath.Index(i), fam))
		}
		seen[fam] = true
	}
	if p := spec.IPFamilyPolicy; p != nil && !slices.Contains(ipFamilyPolicies, string(*p)) {
		errs = append(errs, field.NotSupported(policyPath, *p, ipFamilyPolicies))
	}
	badIP := false
	for i, ip := range spec.ClusterIPs {
		if i == 0 && ip == corev1.ClusterIPNone {
			if len(spec.ClusterIPs) > 1 {
				badIP = true
				errs = append(errs, field.Invalid(ipsPath, spec.ClusterIPs, "'None' must be the first and only value"))
			}
			continue
		}
		ipErrs := validation.IsValidIPForLegacyField(ipsPath.Index(i), ip, false, nil)
		badIP = badIP || len(ipErrs) > 0
		errs = append(errs, ipErrs...)
	}
	if len(spec.ClusterIPs) > 2 {
		errs = append(errs, field.Invalid(ipsPath, spec.ClusterIPs, "may only hold up to 2 values"))
	}
	if badIP {
		return errs
	}
	if len(spec.ClusterIPs) == 2 && netutils.IsIPv6String(spec.ClusterIPs[0]) == netutils.IsIPv6String(spec.ClusterIPs[1]) {
		errs = append(errs, field.Invalid(ipsPath, spec.ClusterIPs, "may specify no more than one IP for each IP family"))
	}
	if len(spec.ClusterIPs) == 0 || spec.ClusterIPs[0] != corev1.ClusterIPNone {
		for i, ip := range spec.ClusterIPs {
			if i >= len(spec.IPFamilies) {
				break
			}
			switch fam, v6 := spec.IPFamilies[i], netutils.IsIPv6String(ip); {
			case fam == corev1.IPv4Protocol && v6:
				errs = append(errs, field.Invalid(ipsPath.Index(i), spec.ClusterIPs[i], fmt.Sprintf("expected an IPv4 value as indicated by `ipFamilies[%v]`", i)))
			case fam == corev1.IPv6Protocol && !v6:
				errs = append(errs, field.Invalid(ipsPath.Index(i), spec.ClusterIPs[i], fmt.Sprintf("expected an IPv6 value as indicated by `ipFamilies[%v]`", i)))
			}
		}
	}
	if len(errs) > 0 {
		return errs
	}
	if p := spec.IPFamilyPolicy; p != nil && *p == corev1.IPFamilyPolicySingleStack {
		if len(spec.ClusterIPs) == 2 {
			errs = append(errs, field.Invalid(policyPath, *p, "must be 'RequireDualStack' or 'PreferDualStack' when multiple cluster IPs are specified"))
		}
		if len(spec.IPFamilies) == 2 {
			errs = append(errs, field.Invalid(policyPath, *p, "must be 'RequireDualStack' or 'PreferDualStack' when multiple IP families are specified"))
		}
	}
	return errs
}

// validateAffinity is the sessionAffinity part of validateService and
// validateClientIPAffinityConfig.
func validateAffinity(spec *corev1.ServiceSpec, specPath *field.Path) field.ErrorList {
	var errs field.ErrorList
	if !slices.Contains(affinities, string(spec.SessionAffinity)) {
		return append(errs, field.NotSupported(specPath.Child("sessionAffinity"), spec.SessionAffinity, affinities))
	}
	if spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		t := *spec.SessionAffinityConfig.ClientIP.TimeoutSeconds
		if t <= 0 || t > maxAffinitySeconds {
			errs = append(errs, field.Invalid(specPath.Child("sessionAffinityConfig", "clientIP", "timeoutSeconds"), t,
				fmt.Sprintf("must be greater than 0 and less than %d", maxAffinitySeconds)))
		}
	}
	return errs
}

// validateSourceRanges is the loadBalancerSourceRanges part of
// validateService, whose field path is spelt with a capital L upstream.
func validateSourceRanges(svc *corev1.Service) field.ErrorList {
	var errs field.ErrorList
	lb := svc.Spec.Type == corev1.ServiceTypeLoadBalancer
	if len(svc.Spec.LoadBalancerSourceRanges) > 0 {
		f := field.NewPath("spec", "LoadBalancerSourceRanges")
		if !lb {
			errs = append(errs, field.Forbidden(f, "may only be used when `type` is 'LoadBalancer'"))
		}
		for i, r := range svc.Spec.LoadBalancerSourceRanges {
			errs = append(errs, validation.IsValidCIDRForLegacyField(f.Index(i), strings.TrimSpace(r), false, nil)...)
		}
		return errs
	}
	v, ok := svc.Annotations[corev1.AnnotationLoadBalancerSourceRangesKey]
	if !ok {
		return nil
	}
	f := field.NewPath("metadata", "annotations").Key(corev1.AnnotationLoadBalancerSourceRangesKey)
	if !lb {
		errs = append(errs, field.Forbidden(f, "may only be used when `type` is 'LoadBalancer'"))
	}
	if v = strings.TrimSpace(v); v != "" {
		for _, r := range strings.Split(v, ",") {
			errs = append(errs, validation.IsValidCIDRForLegacyField(f, strings.TrimSpace(r), false, nil)...)
		}
	}
	return errs
}

// validateTrafficPolicies is validateServiceExternalTrafficPolicy and
// validateServiceInternalTrafficFieldsValue; servicepath allocates no
// health-check node port, so one is not required.
func validateTrafficPolicies(svc *corev1.Service) field.ErrorList {
	var errs field.ErrorList
	spec, specPath := &svc.Spec, field.NewPath("spec")
	etp := specPath.Child("externalTrafficPolicy")
	external := externallyAccessible(svc)
	switch {
	case !external && spec.ExternalTrafficPolicy != "":
		errs = append(errs, field.Invalid(etp, spec.ExternalTrafficPolicy, "may only be set for externally-accessible services"))
	case external && !slices.Contains(trafficPolicies, string(spec.ExternalTrafficPolicy)):
		errs = append(errs, field.NotSupported(etp, spec.ExternalTrafficPolicy, trafficPolicies))
	}
	needsHealthCheck := spec.Type == corev1.ServiceTypeLoadBalancer && spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal
	if hc := spec.HealthCheckNodePort; hc != 0 {
		f := specPath.Child("healthCheckNodePort")
		if !needsHealthCheck {
			errs = append(errs, field.Invalid(f, hc, "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'"))
		}
		for _, msg := range validation.IsValidPortNum(int(hc)) {
			errs = append(errs, field.Invalid(f, hc, msg))
		}
	}
	if p := spec.InternalTrafficPolicy; p != nil && !slices.Contains(trafficPolicies, string(*p)) {
		errs = append(errs, field.NotSupported(specPath.Child("internalTrafficPolicy"), *p, trafficPolicies))
	}
	return errs
}

// validatePortNumOrName is ValidatePortNumOrName.
func validatePortNumOrName(p intstr.IntOrString, f *field.Path) field.ErrorList {
	var errs field.ErrorList
	if p.Type == intstr.Int {
		for _, msg := range validation.IsValidPortNum(p.IntValue()) {
			errs = append(errs, field.Invalid(f, p.IntValue(), msg))
		}
		return errs
	}
	for _, msg := range validation.IsValidPortName(p.StrVal) {
		errs = append(errs, field.Invalid(f, p.StrVal, msg))
	}
	return errs
}

// dnsErrors turns a validation.Is* check into field errors.
func dnsErrors(f *field.Path, value string, check func(string) []string) field.ErrorList {
	var errs field.ErrorList
	for _, msg := range check(value) {
		errs = append(errs, field.Invalid(f, value, msg))
	}
	return errs
}

// validateEndpointIP is IsValidIPForLegacyField followed by
// ValidateEndpointIP (pkg/apis/core/validation).
func validateEndpointIP(f *field.Path, ip string) field.ErrorList {
	if errs := validation.IsValidIPForLegacyField(f, ip, false, nil); len(errs) > 0 {
		return errs
	}
	a := netutils.ParseIPSloppy(ip)
	var errs field.ErrorList
	// Upstream checks each range in turn; an address is in one at most.
	switch {
	case a.IsUnspecified():
		errs = append(errs, field.Invalid(f, ip, fmt.Sprintf("may not be unspecified (%v)", ip)))
	case a.IsLoopback():
		errs = append(errs, field.Invalid(f, ip, "may not be in the loopback range (127.0.0.0/8, ::1/128)"))
	case a.IsLinkLocalUnicast():
		errs = append(errs, field.Invalid(f, ip, "may not be in the link-local range (169.254.0.0/16, fe80::/10)"))
	case a.IsLinkLocalMulticast():
		errs = append(errs, field.Invalid(f, ip, "may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)"))
	}
	return errs
}

// validateEndpointSlice is ValidateEndpointSliceCreate
// (pkg/apis/discovery/validation) on es defaulted as the API server would
// (SetDefaults_EndpointPort: name "", protocol TCP).
func validateEndpointSlice(es *discoveryv1.EndpointSlice) field.ErrorList {
	errs := validateMeta(&es.ObjectMeta, apivalidation.NameIsDNSSubdomain)
	switch {
	case es.AddressType == "":
		errs = append(errs, field.Required(field.NewPath("addressType"), ""))
	case !slices.Contains(addressTypes, string(es.AddressType)):
		errs = append(errs, field.NotSupported(field.NewPath("addressType"), es.AddressType, addressTypes))
	}

	portsPath := field.NewPath("ports")
	if len(es.Ports) > maxSlicePorts {
		errs = append(errs, field.TooMany(portsPath, len(es.Ports), maxSlicePorts))
	} else {
		names := map[string]bool{}
		for i, p := range es.Ports {
			f := portsPath.Index(i)
			name := ptrValue(p.Name)
			if name != "" {
				errs = append(errs, dnsErrors(f.Child("name"), name, validation.IsDNS1123Label)...)
			}
			if names[name] {
				errs = append(errs, field.Duplicate(f.Child("name"), name))
			}
			names[name] = true
			if p.Protocol != nil && !slices.Contains(portProtocols, string(*p.Protocol)) {
				errs = append(errs, field.NotSupported(f.Child("protocol"), *p.Protocol, portProtocols))
			}
			if p.AppProtocol != nil {
				errs = append(errs, dnsErrors(f.Child("appProtocol"), *p.AppProtocol, validation.IsQualifiedName)...)
			}
		}
	}

	endpointsPath := field.NewPath("endpoints")
	if len(es.Endpoints) > maxSliceEndpoints {
		return append(errs, field.TooMany(endpointsPath, len(es.Endpoints), maxSliceEndpoints))
	}
	for i, ep := range es.Endpoints {
		f := endpointsPath.Index(i)
		addrPath := f.Child("addresses")
		switch {
		case len(ep.Addresses) == 0:
			errs = append(errs, field.Required(addrPath, "must contain at least 1 address"))
		case len(ep.Addresses) > maxSliceAddresses:
			errs = append(errs, field.TooMany(addrPath, len(ep.Addresses), maxSliceAddresses))
		}
		for j, addr := range ep.Addresses {
			switch es.AddressType {
			case discoveryv1.AddressTypeIPv4, discoveryv1.AddressTypeIPv6:
				errs = append(errs, validateSliceIP(addrPath, j, addr, es.AddressType)...)
			case discoveryv1.AddressTypeFQDN:
				errs = append(errs, validation.IsFullyQualifiedDomainName(addrPath.Index(j), addr)...)
			}
		}
		if ep.NodeName != nil {
			// ValidateNodeName is NameIsDNSSubdomain.
			for _, msg := range apivalidation.NameIsDNSSubdomain(*ep.NodeName, false) {
				errs = append(errs, field.Invalid(f.Child("nodeName"), *ep.NodeName, msg))
			}
		}
		if ep.Hostname != nil {
			errs = append(errs, dnsErrors(f.Child("hostname"), *ep.Hostname, validation.IsDNS1123Label)...)
		}
	}
	return errs
}

// validateSliceIP is validateEndpoints' check of one IP address: IPv4 is
// a legacy field, IPv6 must be canonical.
func validateSliceIP(addrPath *field.Path, j int, addr string, at discoveryv1.AddressType) field.ErrorList {
	f := addrPath.Index(j)
	var ipErrs field.ErrorList
	if at == discoveryv1.AddressTypeIPv4 {
		ipErrs = validation.IsValidIPForLegacyField(f, addr, false, nil)
	} else {
		ipErrs = validation.IsValidIP(f, addr)
	}
	if len(ipErrs) > 0 {
		return ipErrs
	}
	var errs field.ErrorList
	if v6 := netutils.IsIPv6String(addr); at == discoveryv1.AddressTypeIPv4 && v6 {
		errs = append(errs, field.Invalid(addrPath, addr, "must be an IPv4 address"))
	} else if at == discoveryv1.AddressTypeIPv6 && !v6 {
		errs = append(errs, field.Invalid(addrPath, addr, "must be an IPv6 address"))
	}
	return append(errs, validateEndpointIP(f, addr)...)
}
