// Package kubeproxy writes the rules kube-proxy writes, so benchmarks can
// measure servicepath against the real alternative: iptables-restore input
// in kube-proxy's iptables-mode layout (KUBE-SERVICES -> KUBE-SVC-* ->
// KUBE-SEP-*, KUBE-MARK-MASQ, KUBE-POSTROUTING, partial syncs of changed
// services) and `nft -f` input in its nftables-mode layout (the service-ips
// verdict map, numgen vmaps into endpoint chains, incremental updates).
//
// The generators follow kube-proxy's pkg/proxy/iptables/proxier.go and
// pkg/proxy/nftables/proxier.go (v1.31+): chain names are hashed the same
// way, rules carry the same matches in the same order, and probabilities
// are formatted as kube-proxy formats them. What is left out is named in
// the doc of each generator. Runner applies them inside a netns the caller
// made, never to the caller's own tables.
package kubeproxy

import (
	"crypto/sha256"
	"encoding/base32"
	"fmt"
	"net/netip"
	"strings"
)

// Service is one service port of a ClusterIP Service and its ready
// endpoints, the unit kube-proxy writes chains for.
type Service struct {
	Namespace, Name string
	// PortName is the Service port's name; "" for an unnamed port.
	PortName  string
	ClusterIP netip.Addr
	Port      uint16
	// Protocol is "tcp" or "udp".
	Protocol  string
	Endpoints []netip.AddrPort
}

// PortNameString is kube-proxy's ServicePortName.String(): "ns/name:port",
// or "ns/name" for an unnamed port.
func (s Service) PortNameString() string {
	if s.PortName == "" {
		return s.Namespace + "/" + s.Name
	}
	return s.Namespace + "/" + s.Name + ":" + s.PortName
}

// Key identifies the service port (its ClusterIP, port and protocol).
func (s Service) Key() string {
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(s.ClusterIP, s.Port), s.Protocol)
}

func (s Service) validate() error {
	if s.Namespace == "" || s.Name == "" {
		return fmt.Errorf("service %s: empty namespace or name", s.Key())
	}
	if !s.ClusterIP.Is4() {
		return fmt.Errorf("service %s: the generators write IPv4 rules; ClusterIP %s is not IPv4", s.PortNameString(), s.ClusterIP)
	}
	if s.Protocol != "tcp" && s.Protocol != "udp" {
		return fmt.Errorf("service %s: protocol %q, want tcp or udp", s.PortNameString(), s.Protocol)
	}
	if s.Port == 0 {
		return fmt.Errorf("service %s: port 0", s.PortNameString())
	}
	for _, ep := range s.Endpoints {
		if !ep.Addr().Is4() || ep.Port() == 0 {
			return fmt.Errorf("service %s: endpoint %s: want IPv4 address and non-zero port", s.PortNameString(), ep)
		}
	}
	return nil
}

// Config holds the proxier settings that show up in the rules.
type Config struct {
	// ClusterCIDR is the pod network; traffic to a ClusterIP from outside
	// it is marked for masquerade (kube-proxy's --cluster-cidr local
	// detector).
	ClusterCIDR netip.Prefix
	// MasqueradeMark is the fwmark bit, "0x4000" by default.
	MasqueradeMark string
}

// DefaultConfig is kube-proxy's default mark with the given pod network.
func DefaultConfig(clusterCIDR netip.Prefix) Config {
	return Config{ClusterCIDR: clusterCIDR, MasqueradeMark: "0x4000"}
}

func hash16(s string) string {
	sum := sha256.Sum256([]byte(s))
	return base32.StdEncoding.EncodeToString(sum[:])[:16]
}

// SVCChain is kube-proxy's KUBE-SVC-<hash> name for the service port.
func SVCChain(s Service) string {
	return "KUBE-SVC-" + hash16(s.PortNameString()+s.Protocol)
}

// SEPChain is kube-proxy's KUBE-SEP-<hash> name for one endpoint of s.
func SEPChain(s Service, ep netip.AddrPort) string {
	return "KUBE-SEP-" + hash16(s.PortNameString()+s.Protocol+ep.String())
}

// probability is kube-proxy's computeProbability: the chance that the
// first of n remaining endpoints is picked.
func probability(n int) string {
	return fmt.Sprintf("%0.10f", 1.0/float64(n))
}

// hashAndTruncate is kube-proxy nftables' chain-name base: 8 characters of
// hash, '-', the name, cut to 240 bytes.
func hashAndTruncate(name string) string {
	sum := sha256.Sum256([]byte(name))
	name = base32.StdEncoding.EncodeToString(sum[:])[:8] + "-" + name
	if len(name) > 240 {
		name = name[:237] + "..."
	}
	return name
}

// NFTServiceChain is kube-proxy nftables' service-<hash>-ns/name/proto/port.
func NFTServiceChain(s Service) string {
	return "service-" + hashAndTruncate(fmt.Sprintf("%s/%s/%s/%s", s.Namespace, s.Name, s.Protocol, s.PortName))
}

// NFTEndpointChain is kube-proxy nftables' endpoint chain for ep of s.
func NFTEndpointChain(s Service, ep netip.AddrPort) string {
	ip := strings.ReplaceAll(ep.Addr().String(), ":", ".")
	return "endpoint-" + hashAndTruncate(fmt.Sprintf("%s/%s/%s/%s__%s/%d", s.Namespace, s.Name, s.Protocol, s.PortName, ip, ep.Port()))
}

// Synthetic returns n services like a benchmark cluster's: bench/svc-00000
// upward, ClusterIPs counted up from base, every one on port with the
// same endpoints. The last one is the target a benchmark connects to,
// placed last in KUBE-SERVICES: the worst position.
func Synthetic(n int, base netip.Addr, port uint16, endpoints []netip.AddrPort) []Service {
	out := make([]Service, n)
	ip := base
	for i := range out {
		out[i] = SyntheticService(i, ip, port, endpoints)
		ip = ip.Next()
	}
	return out
}

// SyntheticService is the i-th service of Synthetic, at ip.
func SyntheticService(i int, ip netip.Addr, port uint16, endpoints []netip.AddrPort) Service {
	return Service{
		Namespace: "bench", Name: fmt.Sprintf("svc-%05d", i), PortName: "http",
		ClusterIP: ip, Port: port, Protocol: "tcp",
		Endpoints: append([]netip.AddrPort(nil), endpoints...),
	}
}
