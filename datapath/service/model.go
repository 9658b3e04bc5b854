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
	// HostPort is a pod's containers[].ports[].hostPort: like a NodePort,
	// the unspecified address answers on every node address, unless the
	// pod gave a hostIP. Its backends are pods of this node.
	HostPort
)

func (k Kind) String() string {
	switch k {
	case NodePort:
		return "NodePort"
	case ExternalIP:
		return "ExternalIP"
	case LoadBalancer:
		return "LoadBalancer"
	case HostPort:
		return "HostPort"
	}
	return "ClusterIP"
}

// external is a frontend reached from outside the cluster, where the
// traffic policy and the north-south mode apply.
func (k Kind) external() bool {
	return k == NodePort || k == ExternalIP || k == LoadBalancer
}

// Mode is how the node that takes a north-south flow reaches a backend on
// another node.
type Mode uint8

const (
	// SNAT rewrites the client's source to the node's address, so replies
	// come back through this node.
	SNAT Mode = iota
	// DSR keeps the client's address; the backend's node replies straight
	// to the client.
	DSR
	// Hybrid is DSR for TCP and SNAT for UDP.
	Hybrid
)

func (m Mode) String() string {
	switch m {
	case DSR:
		return "dsr"
	case Hybrid:
		return "hybrid"
	}
	return "snat"
}

// ParseMode reads the spelling String gives.
func ParseMode(s string) (Mode, error) {
	for _, m := range []Mode{SNAT, DSR, Hybrid} {
		if s == m.String() {
			return m, nil
		}
	}
	return 0, fmt.Errorf("unknown load-balancing mode %q (want snat, dsr or hybrid)", s)
}

// Dispatch is how a DSR flow tells the backend's node the service it was
// sent to.
type Dispatch uint8

const (
	// Option carries the service in an IPv4 option or IPv6 extension
	// header.
	Option Dispatch = iota
	// IPIP encapsulates the packet to the backend's node (IPIP/IP6IP6).
	IPIP
)

func (d Dispatch) String() string {
	if d == IPIP {
		return "ipip"
	}
	return "option"
}

// ParseDispatch reads the spelling String gives.
func ParseDispatch(s string) (Dispatch, error) {
	for _, d := range []Dispatch{Option, IPIP} {
		if s == d.String() {
			return d, nil
		}
	}
	return 0, fmt.Errorf("unknown DSR dispatch %q (want option or ipip)", s)
}

// Frontend is the address a client connects to: one (VIP, port, protocol).
type Frontend struct {
	Addr     netip.Addr
	Port     uint16
	Protocol Protocol
	Kind     Kind
	// InCluster is an externalTrafficPolicy Local frontend as clients in
	// the cluster (this node's pods and the host) see it: a second entry
	// beside the one outside clients use, with all of the service's
	// backends, as kube-proxy sends in-cluster traffic to every endpoint.
	InCluster bool
}

func (f Frontend) String() string {
	s := fmt.Sprintf("%s/%s", netip.AddrPortFrom(f.Addr, f.Port), f.Protocol)
	switch {
	case f.InCluster:
		s += " (" + f.Kind.String() + ", in-cluster)"
	case f.Kind != ClusterIP:
		s += " (" + f.Kind.String() + ")"
	}
	return s
}

// BackendState says whether a backend may take new flows.
type BackendState uint8

const (
	// Active backends are selected for new flows.
	Active BackendState = iota
	// Terminating backends keep the flows they have and get new ones
	// only while no backend of their frontend is Active: Kubernetes'
	// fallback to serving terminating endpoints.
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
	// ExternalLocal is externalTrafficPolicy Local on an external frontend:
	// Backends are this node's only, and without any the node drops.
	ExternalLocal bool
	// InternalLocal is internalTrafficPolicy Local on a cluster IP: the
	// same, as kube-proxy drops when the node has no local endpoint.
	InternalLocal bool
	// SourceRanges are loadBalancerSourceRanges: only clients in them may
	// use a LoadBalancer frontend. Empty lets everyone in.
	SourceRanges []netip.Prefix
	// Maglev picks new flows' backends from a Maglev table by flow hash,
	// so every node picks alike; otherwise at random. The table is
	// maglev.Build over the active backends' "addr:port", sorted, of the
	// size the loader gave sp_maglev (loader.Config.MaglevTableSize).
	Maglev bool
	// Mode and Dispatch say how an external frontend reaches backends on
	// other nodes.
	Mode     Mode
	Dispatch Dispatch
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
	if f.Kind > HostPort {
		return fmt.Errorf("service %s: unknown frontend kind %d", s.Name, f.Kind)
	}
	switch {
	case f.Kind == NodePort && !f.Addr.IsUnspecified():
		return fmt.Errorf("service %s: frontend %s: a NodePort has the unspecified address", s.Name, f)
	case f.Addr.IsUnspecified() && f.Kind != NodePort && f.Kind != HostPort:
		return fmt.Errorf("service %s: frontend %s: only a NodePort or HostPort has the unspecified address", s.Name, f)
	}
	if f.Protocol != TCP && f.Protocol != UDP {
		return fmt.Errorf("service %s: unsupported protocol %s", s.Name, f.Protocol)
	}
	if s.Affinity < 0 || s.Affinity > MaxAffinity || s.Affinity%time.Second != 0 {
		return fmt.Errorf("service %s: session affinity timeout %s: want whole seconds from 1s to %s", s.Name, s.Affinity, MaxAffinity)
	}
	if err := s.validateBehaviour(); err != nil {
		return fmt.Errorf("service %s: frontend %s: %w", s.Name, f, err)
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

// validateBehaviour checks the fields that apply to some frontend kinds
// only; the error names the field.
func (s *Service) validateBehaviour() error {
	k := s.Frontend.Kind
	if s.ExternalLocal && !k.external() {
		return fmt.Errorf("ExternalLocal: only for NodePort, ExternalIP and LoadBalancer frontends, not %s", k)
	}
	if s.InternalLocal && k != ClusterIP {
		return fmt.Errorf("InternalLocal: only for ClusterIP frontends, not %s", k)
	}
	if s.Frontend.InCluster && (!k.external() || s.ExternalLocal) {
		return fmt.Errorf("Frontend.InCluster: only for NodePort, ExternalIP and LoadBalancer frontends without ExternalLocal, not %s", s.Frontend)
	}
	if len(s.SourceRanges) > 0 && k != LoadBalancer {
		return fmt.Errorf("SourceRanges: only for LoadBalancer frontends, not %s", k)
	}
	seen := make(map[netip.Prefix]bool, len(s.SourceRanges))
	for i, r := range s.SourceRanges {
		switch {
		case !r.IsValid() || r.Addr().Zone() != "":
			return fmt.Errorf("SourceRanges[%d]: invalid prefix %q", i, r)
		case r.Addr().Is4In6():
			return fmt.Errorf("SourceRanges[%d]: %s: IPv4-mapped IPv6 prefix not allowed", i, r)
		case r.Addr().Is4() != s.Frontend.Addr.Unmap().Is4():
			return fmt.Errorf("SourceRanges[%d]: %s is not of the frontend's address family", i, r)
		case seen[r.Masked()]:
			return fmt.Errorf("SourceRanges[%d]: %s listed twice", i, r.Masked())
		}
		seen[r.Masked()] = true
	}
	if s.Mode > Hybrid {
		return fmt.Errorf("Mode: unknown mode %d", s.Mode)
	}
	if s.Dispatch > IPIP {
		return fmt.Errorf("Dispatch: unknown dispatch %d", s.Dispatch)
	}
	if s.Mode != SNAT && !k.external() {
		return fmt.Errorf("Mode %s: only for NodePort, ExternalIP and LoadBalancer frontends, not %s", s.Mode, k)
	}
	if s.Dispatch != Option && s.Mode == SNAT {
		return fmt.Errorf("Dispatch %s: only with Mode dsr or hybrid", s.Dispatch)
	}
	return nil
}
