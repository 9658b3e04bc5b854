package kubeproxy

import (
	"fmt"
	"strings"
)

// NFTTable is the table kube-proxy's nftables mode owns.
const NFTTable = "ip kube-proxy"

// NFTables generates `nft -f` input in the layout of kube-proxy's nftables
// proxier: base chains that jump to "services", where one verdict-map
// lookup on `ip daddr . meta l4proto . th dport` (the service-ips map)
// goes to the service's chain; that chain marks traffic from outside the
// pod network for masquerade and picks an endpoint chain with `numgen
// random mod N vmap`; the endpoint chain marks hairpin traffic and DNATs.
// Updates are incremental, as kube-proxy's partial syncs are: only the
// changed service's chains and map elements. Stale endpoint and service
// chains are deleted in the same transaction (kube-proxy defers that
// deletion a little; the work is the same).
//
// Left out, as for IPTables: NodePort, external, load balancer, firewall
// and affinity handling beyond the empty maps and base chains kube-proxy
// always creates.
type NFTables struct {
	cfg      Config
	services []Service
	index    map[string]int
}

// NewNFTables starts with nothing written.
func NewNFTables(cfg Config) *NFTables {
	return &NFTables{cfg: cfg, index: map[string]int{}}
}

// FullSync returns the table with every service, for an empty netns: what
// kube-proxy writes on its first sync.
func (p *NFTables) FullSync(services []Service) (string, error) {
	index := map[string]int{}
	for i, s := range services {
		if err := s.validate(); err != nil {
			return "", err
		}
		if _, dup := index[s.Key()]; dup {
			return "", fmt.Errorf("service %s listed twice", s.Key())
		}
		index[s.Key()] = i
	}
	p.services = append([]Service(nil), services...)
	p.index = index

	var b strings.Builder
	b.Grow(4096 + len(services)*1200)
	p.base(&b)
	for _, s := range services {
		p.addService(&b, s)
	}
	return b.String(), nil
}

// base writes the table, its base chains, helper chains and maps.
func (p *NFTables) base(b *strings.Builder) {
	t := NFTTable
	mark := p.cfg.MasqueradeMark
	fmt.Fprintf(b, "add table %s { comment \"rules for kube-proxy\" ; }\n", t)
	for _, c := range []struct{ name, spec string }{
		{"filter-prerouting", "type filter hook prerouting priority -110 ;"},
		{"filter-input", "type filter hook input priority -110 ;"},
		{"filter-forward", "type filter hook forward priority -110 ;"},
		{"filter-output", "type filter hook output priority -110 ;"},
		{"filter-output-post-dnat", "type filter hook output priority -90 ;"},
		{"nat-prerouting", "type nat hook prerouting priority -100 ;"},
		{"nat-output", "type nat hook output priority -100 ;"},
		{"nat-postrouting", "type nat hook postrouting priority 100 ;"},
	} {
		fmt.Fprintf(b, "add chain %s %s { %s }\n", t, c.name, c.spec)
	}
	for _, c := range []string{"mark-for-masquerade", "masquerading", "services", "service-endpoints-check",
		"nodeport-endpoints-check", "firewall-check", "cluster-ips-check"} {
		fmt.Fprintf(b, "add chain %s %s\n", t, c)
	}
	fmt.Fprintf(b, "add set %s cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }\n", t)
	fmt.Fprintf(b, "add map %s service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }\n", t)
	fmt.Fprintf(b, "add map %s service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }\n", t)
	fmt.Fprintf(b, "add map %s no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }\n", t)
	fmt.Fprintf(b, "add map %s no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }\n", t)
	fmt.Fprintf(b, "add map %s firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }\n", t)

	for _, r := range []string{
		"filter-prerouting ct state new jump firewall-check",
		"filter-input ct state new jump nodeport-endpoints-check",
		"filter-input ct state new jump service-endpoints-check",
		"filter-forward ct state new jump service-endpoints-check",
		"filter-forward ct state new jump cluster-ips-check",
		"filter-output ct state new jump service-endpoints-check",
		"filter-output ct state new jump firewall-check",
		"filter-output-post-dnat ct state new jump cluster-ips-check",
		"nat-prerouting jump services",
		"nat-output jump services",
		"nat-postrouting jump masquerading",
		"mark-for-masquerade mark set mark or " + mark,
		"masquerading mark and " + mark + " == 0 return",
		"masquerading mark set mark xor " + mark,
		"masquerading masquerade fully-random",
		"services ip daddr . meta l4proto . th dport vmap @service-ips",
		"services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports",
		"service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
		"nodeport-endpoints-check fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports",
		"firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips",
		"cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"",
	} {
		fmt.Fprintf(b, "add rule %s %s\n", t, r)
	}
}

// addService writes a service's chains, rules and map elements; for a
// changed service the chains are flushed first, so "add chain" + "flush
// chain" + rules is right whether they existed or not.
func (p *NFTables) addService(b *strings.Builder, s Service) {
	t := NFTTable
	svc := NFTServiceChain(s)
	for _, ep := range s.Endpoints {
		c := NFTEndpointChain(s, ep)
		fmt.Fprintf(b, "add chain %s %s\n", t, c)
		fmt.Fprintf(b, "flush chain %s %s\n", t, c)
		fmt.Fprintf(b, "add rule %s %s ip saddr %s jump mark-for-masquerade\n", t, c, ep.Addr())
		fmt.Fprintf(b, "add rule %s %s meta l4proto %s dnat to %s\n", t, c, s.Protocol, ep)
	}
	fmt.Fprintf(b, "add chain %s %s\n", t, svc)
	fmt.Fprintf(b, "flush chain %s %s\n", t, svc)
	if p.cfg.ClusterCIDR.IsValid() {
		fmt.Fprintf(b, "add rule %s %s ip daddr %s %s dport %d ip saddr != %s jump mark-for-masquerade\n",
			t, svc, s.ClusterIP, s.Protocol, s.Port, p.cfg.ClusterCIDR)
	}
	if n := len(s.Endpoints); n > 0 {
		fmt.Fprintf(b, "add rule %s %s numgen random mod %d vmap { ", t, svc, n)
		for i, ep := range s.Endpoints {
			if i > 0 {
				b.WriteString(", ")
			}
			fmt.Fprintf(b, "%d : goto %s", i, NFTEndpointChain(s, ep))
		}
		b.WriteString(" }\n")
	}
	fmt.Fprintf(b, "add element %s cluster-ips { %s }\n", t, s.ClusterIP)
	fmt.Fprintf(b, "add element %s service-ips { %s . %s . %d : goto %s }\n", t, s.ClusterIP, s.Protocol, s.Port, svc)
}

// Upsert adds s or replaces the service with its key, incrementally.
func (p *NFTables) Upsert(s Service) (string, error) {
	if err := s.validate(); err != nil {
		return "", err
	}
	var b strings.Builder
	i, exists := p.index[s.Key()]
	if exists {
		old := p.services[i]
		if NFTServiceChain(old) != NFTServiceChain(s) {
			// Renamed: remove the old service wholesale, then add anew.
			p.removeService(&b, old, i)
			p.addService(&b, s)
		} else {
			// Same chains: flushed and rewritten; the map elements
			// already point at them ("add element" leaves them be).
			p.addService(&b, s)
			keep := map[string]bool{}
			for _, ep := range s.Endpoints {
				keep[NFTEndpointChain(s, ep)] = true
			}
			for _, ep := range old.Endpoints {
				if c := NFTEndpointChain(old, ep); !keep[c] {
					fmt.Fprintf(&b, "delete chain %s %s\n", NFTTable, c)
				}
			}
		}
		p.services[i] = s
	} else {
		p.addService(&b, s)
		p.index[s.Key()] = len(p.services)
		p.services = append(p.services, s)
	}
	return b.String(), nil
}

// Delete removes the service with key (Service.Key), incrementally.
func (p *NFTables) Delete(key string) (string, error) {
	i, ok := p.index[key]
	if !ok {
		return "", fmt.Errorf("no service %s", key)
	}
	var b strings.Builder
	p.removeService(&b, p.services[i], i)
	p.services = append(p.services[:i], p.services[i+1:]...)
	delete(p.index, key)
	for j := i; j < len(p.services); j++ {
		p.index[p.services[j].Key()] = j
	}
	return b.String(), nil
}

// removeService deletes s (at index i) with its chains and elements; the
// ClusterIP stays in cluster-ips while another port of it remains.
func (p *NFTables) removeService(b *strings.Builder, s Service, i int) {
	t := NFTTable
	svc := NFTServiceChain(s)
	fmt.Fprintf(b, "delete element %s service-ips { %s . %s . %d }\n", t, s.ClusterIP, s.Protocol, s.Port)
	shared := false
	for j, o := range p.services {
		if j != i && o.ClusterIP == s.ClusterIP {
			shared = true
			break
		}
	}
	if !shared {
		fmt.Fprintf(b, "delete element %s cluster-ips { %s }\n", t, s.ClusterIP)
	}
	fmt.Fprintf(b, "flush chain %s %s\n", t, svc)
	fmt.Fprintf(b, "delete chain %s %s\n", t, svc)
	for _, ep := range s.Endpoints {
		c := NFTEndpointChain(s, ep)
		fmt.Fprintf(b, "flush chain %s %s\n", t, c)
		fmt.Fprintf(b, "delete chain %s %s\n", t, c)
	}
}
