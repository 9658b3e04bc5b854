package agent

import (
	"cmp"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/k8s"
)

// Two Services may claim one frontend: the API server keeps cluster IPs
// apart, but not external IPs or load-balancer ingress IPs. One map entry
// can serve only one of them, so the oldest Service (then the first by
// name) keeps it on every node alike, and the other is programmed without
// it and told so by an Event. Refusing the newer Service whole would keep
// the agent unready, on every node, for as long as the two exist. A Pod's
// hostPort and a Service's NodePort (or external IP) may meet on a node
// too, and the same rule settles it: the scheduler keeps hostPorts of one
// node apart, but not from NodePorts.

const (
	byAddressIndex = "address"
	// byPortIndex indexes Services by the ports and NodePorts they
	// serve, and Pods by their hostPorts ("TCP/30080").
	byPortIndex = "port"
)

func portKey(proto corev1.Protocol, port int32) string { return fmt.Sprintf("%s/%d", proto, port) }

// servicePortIndex indexes Services by every port a frontend of theirs
// can be on.
func servicePortIndex(obj any) ([]string, error) {
	svc, ok := obj.(*corev1.Service)
	if !ok {
		return nil, fmt.Errorf("indexing %T as a Service", obj)
	}
	var keys []string
	for _, sp := range svc.Spec.Ports {
		keys = append(keys, portKey(sp.Protocol, sp.Port))
		if sp.NodePort != 0 {
			keys = append(keys, portKey(sp.Protocol, sp.NodePort))
		}
	}
	return keys, nil
}

// podHostPortIndex indexes Pods by their hostPorts.
func podHostPortIndex(obj any) ([]string, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return nil, fmt.Errorf("indexing %T as a Pod", obj)
	}
	var keys []string
	for _, c := range pod.Spec.Containers {
		for _, cp := range c.Ports {
			if cp.HostPort != 0 {
				keys = append(keys, portKey(cmp.Or(cp.Protocol, corev1.ProtocolTCP), cp.HostPort))
			}
		}
	}
	return keys, nil
}

// claim is an owner of frontends, as the rule orders them.
type claim struct {
	what    string // "Service ns/name", "Pod ns/name"
	name    string // the owner name in the maps
	created metav1.Time
}

func serviceClaim(svc *corev1.Service) claim {
	return claim{"Service " + k8s.ServiceName(svc), k8s.ServiceName(svc), svc.CreationTimestamp}
}

func podClaim(pod *corev1.Pod) claim {
	return claim{"Pod " + pod.Namespace + "/" + pod.Name, k8s.PodName(pod), pod.CreationTimestamp}
}

// before says c's claim on a frontend comes before o's.
func (c claim) before(o claim) bool {
	if !c.created.Equal(&o.created) {
		return c.created.Before(&o.created)
	}
	return c.name < o.name
}

// serviceAddrIndex indexes Services by every address a frontend of theirs
// can be on.
func serviceAddrIndex(obj any) ([]string, error) {
	svc, ok := obj.(*corev1.Service)
	if !ok {
		return nil, fmt.Errorf("indexing %T as a Service", obj)
	}
	return serviceAddrs(svc), nil
}

func serviceAddrs(svc *corev1.Service) []string {
	addrs := append([]string(nil), svc.Spec.ClusterIPs...)
	addrs = append(addrs, svc.Spec.ExternalIPs...)
	for _, in := range svc.Status.LoadBalancer.Ingress {
		if in.IP != "" {
			addrs = append(addrs, in.IP)
		}
	}
	return addrs
}

// sharing returns the other Services with an address of svc's.
func (a *Agent) sharing(svc *corev1.Service) []*corev1.Service {
	seen := map[string]bool{k8s.ServiceName(svc): true}
	var out []*corev1.Service
	for _, addr := range serviceAddrs(svc) {
		objs, err := a.serviceIndex.ByIndex(byAddressIndex, addr)
		if err != nil {
			a.log.Error("read Services by address from cache", "address", addr, "err", err)
			continue
		}
		for _, o := range objs {
			other := o.(*corev1.Service)
			if name := k8s.ServiceName(other); !seen[name] {
				seen[name] = true
				out = append(out, other)
			}
		}
	}
	return out
}

// byPort returns the objects of index with a port of keys.
func (a *Agent) byPort(index cache.Indexer, keys []string) []any {
	seen := map[any]bool{}
	var out []any
	for _, k := range keys {
		objs, err := index.ByIndex(byPortIndex, k)
		if err != nil {
			a.log.Error("read the cache by port", "port", k, "err", err)
			continue
		}
		for _, o := range objs {
			if !seen[o] {
				seen[o] = true
				out = append(out, o)
			}
		}
	}
	return out
}

// podsSharing returns this node's Pods with a hostPort on a port of svc's.
func (a *Agent) podsSharing(svc *corev1.Service) []*corev1.Pod {
	if a.pods == nil {
		return nil
	}
	keys, _ := servicePortIndex(svc)
	var out []*corev1.Pod
	for _, o := range a.byPort(a.pods.index, keys) {
		if pod := o.(*corev1.Pod); pod.Spec.NodeName == a.cfg.NodeName {
			out = append(out, pod)
		}
	}
	return out
}

// servicesSharing returns the Services with a port on a hostPort of pod's.
func (a *Agent) servicesSharing(pod *corev1.Pod) []*corev1.Service {
	keys, _ := podHostPortIndex(pod)
	var out []*corev1.Service
	for _, o := range a.byPort(a.serviceIndex, keys) {
		out = append(out, o.(*corev1.Service))
	}
	return out
}

// podHostPortFrontends are what pod's hostPorts would program.
func podHostPortFrontends(opts k8s.Options, pod *corev1.Pod) []service.Service {
	if pod.Spec.HostNetwork {
		return nil
	}
	res, err := k8s.TranslatePods(opts, []*corev1.Pod{pod})
	if err != nil {
		return nil // refused, it owns nothing
	}
	return res.Services
}

// frontendKey is a frontend as the maps key it: one entry whatever the kind.
func frontendKey(fe service.Frontend) service.Frontend {
	fe.Kind, fe.InCluster = service.ClusterIP, false
	return fe
}

// serviceFrontends are what svc would program, endpoints aside.
func serviceFrontends(opts k8s.Options, svc *corev1.Service) []service.Service {
	res, err := k8s.TranslateWith(opts, []*corev1.Service{svc}, nil)
	if err != nil {
		return nil // refused, it owns nothing
	}
	return res.Services
}

// claimsOn are the frontends that owners whose claims come before self's
// hold, by frontend, naming the owner: Services sharing an address or
// port, and this node's Pods sharing a port.
func (a *Agent) claimsOn(self claim, opts k8s.Options, services []*corev1.Service, pods []*corev1.Pod) map[service.Frontend]string {
	claimed := map[service.Frontend]string{}
	hold := func(c claim, fes []service.Service) {
		if c.name == self.name || !c.before(self) {
			return
		}
		for _, s := range fes {
			claimed[frontendKey(s.Frontend)] = c.what
		}
	}
	for _, other := range services {
		hold(serviceClaim(other), serviceFrontends(opts, other))
	}
	for _, pod := range pods {
		hold(podClaim(pod), podHostPortFrontends(opts, pod))
	}
	return claimed
}

// withoutClaimed drops from services (svc's) the frontends an owner whose
// claim comes first holds, and says which. Services meet through shared
// addresses (the API server keeps NodePorts apart), Pods through ports.
func (a *Agent) withoutClaimed(svc *corev1.Service, opts k8s.Options, services []service.Service) ([]service.Service, []string) {
	return dropClaimed(services, a.claimsOn(serviceClaim(svc), opts, a.sharing(svc), a.podsSharing(svc)))
}

// hostPortsWithoutClaimed is withoutClaimed for pod's hostPorts.
func (a *Agent) hostPortsWithoutClaimed(pod *corev1.Pod, opts k8s.Options, services []service.Service) ([]service.Service, []string) {
	return dropClaimed(services, a.claimsOn(podClaim(pod), opts, a.servicesSharing(pod), nil))
}

// dropClaimed drops the claimed frontends from services, saying which.
func dropClaimed(services []service.Service, claimed map[service.Frontend]string) ([]service.Service, []string) {
	if len(claimed) == 0 {
		return services, nil
	}
	var kept []service.Service
	var conflicts []string
	for _, s := range services {
		if owner, ok := claimed[frontendKey(s.Frontend)]; ok {
			if !s.Frontend.InCluster {
				conflicts = append(conflicts, fmt.Sprintf("frontend %s not programmed: %s, older, has it", s.Frontend, owner))
			}
			continue
		}
		kept = append(kept, s)
	}
	return kept, conflicts
}
