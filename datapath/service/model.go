// Package service is servicepath's model of a load-balanced service and the
// manager that programs it into the datapath's maps.
package service

import (
	"fmt"
	"net/netip"
	"time"
)

// Protocol is an IP protocol number the datapath load-balances.
type Protocol uint8

const (
	TCP Protocol = 6
	UDP Protocol = 17
)

func (p Protocol) String() string {
	switch p {
	case TCP:
		return "TCP"
	case UDP:
		return "UDP"
	}
	return fmt.Sprintf("proto-%d", uint8(p))
}

// ParseProtocol accepts Kubernetes' protocol names.
func ParseProtocol(s string) (Protocol, error) {
	switch s {
	case "TCP", "":
		return TCP, nil
	case "UDP":
		return UDP, nil
	}
	return 0, fmt.Errorf("unsupported protocol %q (servicepath handles TCP and UDP)", s)
}

// Kind is how a frontend is reached.
type Kind uint8

const (
	ClusterIP Kind = iota
	// NodePort answers on every address of the node; its Addr is the
	// unspecified address of its family (0.0.0.0 or ::).
	NodePort
	ExternalIP
	LoadBalancer
)

func (k Kind) String() string {
	switch k {
	case NodePort:
		return "NodePort"
	case ExternalIP:
		return "ExternalIP"
	case LoadBalancer:
		return "LoadBalancer"
	}
	return "ClusterIP"
}

// Frontend is the address a client connects to: one (VIP, port, protocol).
type Frontend struct {
	Addr     netip.Addr
	Port     uint16
	Protocol Protocol
	Kind     Kind
}

func (f Frontend) String() string {
	s := fmt.Sprintf("%s/%s", netip.AddrPortFrom(f.Addr, f.Port), f.Protocol)
	if f.Kind != ClusterIP {
		s += " (" + f.Kind.String() + ")"
	}
	return s
}

// BackendState says whether a backend may take new flows.
type BackendState uint8

const (
	// Active backends are selected for new flows.
	Active BackendState = iota
	// Terminating backends keep the flows they have but get no new ones.
	Terminating
)

func (s BackendState) String() string {
	if s == Terminating {
		return "terminating"
	}
	return "active"
}

// Backend is one endpoint behind a frontend.
type Backend struct {
	Addr  netip.Addr
	Port  uint16
	State BackendState
}

func (b Backend) String() string {
	return netip.AddrPortFrom(b.Addr, b.Port).String()
}

// Service is one frontend with its backends. A Kubernetes Service with
// several ports or IP families becomes several of these, one per frontend.
type Service struct {
	// Name is the owning Kubernetes Service, "namespace/name".
	Name string
	// PortName is the Kubernetes service port's name ("" when unnamed).
	PortName string
	Frontend Frontend
	Backends []Backend
	// Affinity is sessionAffinity ClientIP's timeout; 0 turns it off.
	Affinity time.Duration
}

// MaxAffinity is Kubernetes' upper bound for timeoutSeconds.
const MaxAffinity = 86400 * time.Second

// Validate checks everything the datapath relies on, so a bad service is
// refused before any map is touched.
func (s *Service) Validate() error {
	if s.Name == "" {
		return fmt.Errorf("service %s: empty name", s.Frontend)
	}
	f := s.Frontend
	if !f.Addr.IsValid() || f.Addr.Zone() != "" {
		return fmt.Errorf("service %s: invalid frontend address %q", s.Name, f.Addr)
	}
	if f.Port == 0 {
		return fmt.Errorf("service %s: frontend port 0", s.Name)
	}
	if f.Kind > LoadBalancer {
		return fmt.Errorf("service %s: unknown frontend kind %d", s.Name, f.Kind)
	}
	if (f.Kind == NodePort) != f.Addr.IsUnspecified() {
		return fmt.Errorf("service %s: frontend %s: a NodePort, and only a NodePort, has the unspecified address", s.Name, f)
	}
	if f.Protocol != TCP && f.Protocol != UDP {
		return fmt.Errorf("service %s: unsupported protocol %s", s.Name, f.Protocol)
	}
	if s.Affinity < 0 || s.Affinity > MaxAffinity || s.Affinity%time.Second != 0 {
		return fmt.Errorf("service %s: session affinity timeout %s: want whole seconds from 1s to %s", s.Name, s.Affinity, MaxAffinity)
	}
	seen := make(map[netip.AddrPort]bool, len(s.Backends))
	for i, b := range s.Backends {
		if !b.Addr.IsValid() || b.Addr.Zone() != "" {
			return fmt.Errorf("service %s: backend %d: invalid address %q", s.Name, i, b.Addr)
		}
		if b.Addr.Unmap().Is4() != f.Addr.Unmap().Is4() {
			return fmt.Errorf("service %s: backend %s is not of the frontend's address family", s.Name, b)
		}
		if b.Port == 0 {
			return fmt.Errorf("service %s: backend %s: port 0", s.Name, b)
		}
		if b.State != Active && b.State != Terminating {
			return fmt.Errorf("service %s: backend %s: unknown state %d", s.Name, b, b.State)
		}
		ap := netip.AddrPortFrom(b.Addr.Unmap(), b.Port)
		if seen[ap] {
			return fmt.Errorf("service %s: backend %s listed twice", s.Name, b)
		}
		seen[ap] = true
	}
	return nil
}
