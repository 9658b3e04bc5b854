package k8s

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"

	"github.com/servicepath/servicepath/datapath/service"
)

// PodName is the owner name of a Pod's HostPort frontends,
// "pod:namespace/name", which no Service's "namespace/name" can be.
func PodName(pod *corev1.Pod) string { return "pod:" + objectName(pod.Namespace, pod.Name) }

// PodNames returns the owner name of each Pod, sorted and without
// duplicates: the owners whose frontends "delete -f" removes.
func PodNames(pods []*corev1.Pod) []string {
	names := make([]string, 0, len(pods))
	for _, p := range pods {
		names = append(names, PodName(p))
	}
	slices.Sort(names)
	return slices.Compact(names)
}

// TranslatePods turns the hostPorts of this node's Pods (spec.nodeName is
// opts.NodeName; every Pod when it is empty) into HostPort frontends, as
// CNI's portmap plugin does: the node's addresses (or the port's hostIP)
// on hostPort, to the pod's IP on containerPort. A port without a hostIP
// answers on every family the pod has an IP of. Pods that finished get no
// frontend; Pods without an IP yet are listed in Skipped. Like
// TranslateWith it validates all first and returns every error, naming Pod
// and field, and no result.
func TranslatePods(opts Options, pods []*corev1.Pod) (Result, error) {
	sorted, errs := byName("Pod", pods)
	var res Result
	owners := map[service.Frontend]string{}
	for _, pod := range sorted {
		name := objectName(pod.Namespace, pod.Name)
		if opts.NodeName != "" && pod.Spec.NodeName != opts.NodeName {
			continue
		}
		ports, waiting, unsupported, perrs := podHostPorts(pod)
		res.Unsupported = append(res.Unsupported, unsupported...)
		errs = append(errs, perrs...)
		if waiting {
			res.Skipped = append(res.Skipped, fmt.Sprintf("Pod %s: has hostPorts but no IP yet", name))
		}
		for _, hp := range ports {
			key := hp.svc.Frontend
			key.Kind = service.ClusterIP // one map entry, whatever the kinds
			if other, ok := owners[key]; ok {
				errs = append(errs, fieldError("Pod", name, hp.field, "frontend %s is already %s's", hp.svc.Frontend, other))
				continue
			}
			owners[key] = PodName(pod)
			res.Services = append(res.Services, hp.svc)
		}
	}
	if len(errs) > 0 {
		return Result{}, errors.Join(errs...)
	}
	slices.SortFunc(res.Services, func(a, b service.Service) int {
		return cmp.Or(
			cmp.Compare(a.Name, b.Name),
			a.Frontend.Addr.Compare(b.Frontend.Addr),
			cmp.Compare(a.Frontend.Port, b.Frontend.Port),
			cmp.Compare(a.Frontend.Protocol, b.Frontend.Protocol),
		)
	})
	return res, nil
}

// hostPort is one frontend of a pod and the field it came from.
type hostPort struct {
	svc   service.Service
	field string
}

// podHostPorts validates a pod's IPs and hostPorts and returns a frontend
// per (hostPort, family); none for a finished pod, and waiting for one
// with hostPorts but no IP yet.
func podHostPorts(pod *corev1.Pod) (ports []hostPort, waiting bool, unsupported []string, errs []error) {
	name := objectName(pod.Namespace, pod.Name)
	fail := func(field, format string, args ...any) {
		errs = append(errs, fieldError("Pod", name, field, format, args...))
	}
	if pod.Name == "" {
		fail("metadata.name", "missing")
	}
	ips, field := pod.Status.PodIPs, "status.podIPs"
	if len(ips) == 0 && pod.Status.PodIP != "" {
		ips, field = []corev1.PodIP{{IP: pod.Status.PodIP}}, "status.podIP"
	}
	podIP := map[bool]netip.Addr{} // by Is4
	for i, ip := range ips {
		f := field
		if field == "status.podIPs" {
			f = fmt.Sprintf("%s[%d].ip", field, i)
		}
		a, err := parseIP(ip.IP)
		if err != nil {
			fail(f, "%v", err)
			continue
		}
		if _, dup := podIP[a.Is4()]; dup {
			fail(f, "%s: a second IP of one family", a)
			continue
		}
		podIP[a.Is4()] = a
	}
	finished := pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed

	for i, c := range pod.Spec.Containers {
		for j, p := range c.Ports {
			if p.HostPort == 0 {
				continue
			}
			field := fmt.Sprintf("spec.containers[%d].ports[%d]", i, j)
			if p.HostPort < 1 || p.HostPort > 65535 {
				fail(field+".hostPort", "%d out of range", p.HostPort)
				continue
			}
			if p.ContainerPort < 1 || p.ContainerPort > 65535 {
				fail(field+".containerPort", "%d out of range", p.ContainerPort)
				continue
			}
			protocol := cmp.Or(p.Protocol, corev1.ProtocolTCP)
			proto, err := service.ParseProtocol(string(protocol))
			if err != nil {
				unsupported = append(unsupported, fmt.Sprintf("Pod %s: %s.protocol: %s is not handled by the datapath", name, field, protocol))
				continue
			}
			var hostIP netip.Addr
			if p.HostIP != "" {
				if hostIP, err = parseIP(p.HostIP); err != nil {
					fail(field+".hostIP", "%v", err)
					continue
				}
				if _, ok := podIP[hostIP.Is4()]; !ok && len(podIP) > 0 {
					fail(field+".hostIP", "%s: the pod has no IP of its family", hostIP)
					continue
				}
			}
			if finished {
				continue
			}
			if len(podIP) == 0 {
				waiting = true
				continue
			}
			for _, is4 := range []bool{true, false} {
				ip, ok := podIP[is4]
				if !ok || hostIP.IsValid() && hostIP.Is4() != is4 {
					continue
				}
				addr := hostIP
				if !addr.IsValid() {
					addr = netip.IPv6Unspecified()
					if is4 {
						addr = netip.IPv4Unspecified()
					}
				}
				ports = append(ports, hostPort{field: field + ".hostPort", svc: service.Service{
					Name:     PodName(pod),
					PortName: p.Name,
					Frontend: service.Frontend{Addr: addr, Port: uint16(p.HostPort), Protocol: proto, Kind: service.HostPort},
					Backends: []service.Backend{{Addr: ip, Port: uint16(p.ContainerPort)}},
				}})
			}
		}
	}
	return ports, waiting, unsupported, errs
}
