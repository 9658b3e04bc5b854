package agent

import (
	"fmt"

	corev1 "k8s.io/api/core/v1"

	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/k8s"
)

// Two Services may claim one frontend: the API server keeps cluster IPs
// apart, but not external IPs or load-balancer ingress IPs. One map entry
// can serve only one of them, so the oldest Service (then the first by
// name) keeps it on every node alike, and the other is programmed without
// it and told so by an Event. Refusing the newer Service whole would keep
// the agent unready, on every node, for as long as the two exist.

const byAddressIndex = "address"

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

// older says a's claim on a frontend comes before b's.
func older(a, b *corev1.Service) bool {
	if !a.CreationTimestamp.Equal(&b.CreationTimestamp) {
		return a.CreationTimestamp.Before(&b.CreationTimestamp)
	}
	return k8s.ServiceName(a) < k8s.ServiceName(b)
}

// frontendKey is a frontend as the maps key it: one entry whatever the kind.
func frontendKey(fe service.Frontend) service.Frontend {
	fe.Kind, fe.InCluster = service.ClusterIP, false
	return fe
}

// withoutClaimed drops from services the frontends an older Service
// sharing an address claims, and says which, naming that Service.
func (a *Agent) withoutClaimed(svc *corev1.Service, opts k8s.Options, services []service.Service) ([]service.Service, []string) {
	claimed := map[service.Frontend]string{}
	for _, other := range a.sharing(svc) {
		if !older(other, svc) {
			continue
		}
		res, err := k8s.TranslateWith(opts, []*corev1.Service{other}, nil)
		if err != nil {
			continue // refused, it owns nothing
		}
		for _, s := range res.Services {
			claimed[frontendKey(s.Frontend)] = s.Name
		}
	}
	if len(claimed) == 0 {
		return services, nil
	}
	var kept []service.Service
	var conflicts []string
	for _, s := range services {
		if owner, ok := claimed[frontendKey(s.Frontend)]; ok {
			if !s.Frontend.InCluster {
				conflicts = append(conflicts, fmt.Sprintf("frontend %s not programmed: Service %s, older, has it", s.Frontend, owner))
			}
			continue
		}
		kept = append(kept, s)
	}
	return kept, conflicts
}
