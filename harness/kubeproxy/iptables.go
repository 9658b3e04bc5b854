package kubeproxy

import (
	"fmt"
	"strings"
)

// LargeClusterEndpoints is kube-proxy's largeClusterEndpointsThreshold:
// above this many endpoints it stops writing per-endpoint comments.
const LargeClusterEndpoints = 1000

// IPTables generates iptables-restore input the way kube-proxy's iptables
// proxier does, and remembers what it wrote so later changes come out as
// kube-proxy's partial syncs (MinimizeIPTablesRestore, on by default since
// 1.27): the small filter chains and the top-level nat chains
// (KUBE-SERVICES and friends) are rewritten in full every time, with one
// rule per service in KUBE-SERVICES, but only the changed services' own
// KUBE-SVC/KUBE-SEP chains are written. Chains of removed endpoints and
// services are flushed and deleted (-X) in the same restore, as kube-proxy
// does outside large-cluster mode. Input is meant for
// `iptables-restore --noflush --counters`.
//
// Left out, because ClusterIP services with ready endpoints never reach
// them: NodePort, external IP, load balancer and session affinity rules,
// and reject rules for services without endpoints.
type IPTables struct {
	cfg      Config
	services []Service
	index    map[string]int
}

// NewIPTables starts with nothing written.
func NewIPTables(cfg Config) *IPTables {
	return &IPTables{cfg: cfg, index: map[string]int{}}
}

// Services returns the services as last written, in KUBE-SERVICES order.
func (p *IPTables) Services() []Service { return append([]Service(nil), p.services...) }

func (p *IPTables) largeCluster() bool {
	n := 0
	for _, s := range p.services {
		n += len(s.Endpoints)
	}
	return n > LargeClusterEndpoints
}

// FullSync replaces the state with services and returns kube-proxy's first
// sync: every chain. With jumps it also appends the rules that hook
// kube-proxy's chains into the built-in ones (kube-proxy ensures those with
// separate `iptables -I` calls before its first restore).
func (p *IPTables) FullSync(services []Service, jumps bool) (string, error) {
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
	changed := make(map[string]bool, len(services))
	for _, s := range services {
		changed[s.Key()] = true
	}
	return p.write(changed, nil, jumps), nil
}

// Upsert adds s (last in KUBE-SERVICES) or replaces the service with the
// same key, and returns the partial sync.
func (p *IPTables) Upsert(s Service) (string, error) {
	if err := s.validate(); err != nil {
		return "", err
	}
	var stale []string
	if i, ok := p.index[s.Key()]; ok {
		old := p.services[i]
		keep := map[string]bool{}
		for _, ep := range s.Endpoints {
			keep[SEPChain(s, ep)] = true
		}
		if SVCChain(old) != SVCChain(s) {
			stale = append(stale, SVCChain(old))
		}
		for _, ep := range old.Endpoints {
			if c := SEPChain(old, ep); !keep[c] {
				stale = append(stale, c)
			}
		}
		p.services[i] = s
	} else {
		p.index[s.Key()] = len(p.services)
		p.services = append(p.services, s)
	}
	return p.write(map[string]bool{s.Key(): true}, stale, false), nil
}

// Delete removes the service with key (Service.Key) and returns the
// partial sync.
func (p *IPTables) Delete(key string) (string, error) {
	i, ok := p.index[key]
	if !ok {
		return "", fmt.Errorf("no service %s", key)
	}
	old := p.services[i]
	stale := []string{SVCChain(old)}
	for _, ep := range old.Endpoints {
		stale = append(stale, SEPChain(old, ep))
	}
	p.services = append(p.services[:i], p.services[i+1:]...)
	delete(p.index, key)
	for j := i; j < len(p.services); j++ {
		p.index[p.services[j].Key()] = j
	}
	return p.write(nil, stale, false), nil
}

// write renders one restore: the filter table, then nat with the
// top-level chains in full, the chains of changed services, and stale
// chains flushed and deleted.
func (p *IPTables) write(changed map[string]bool, stale []string, jumps bool) string {
	var b strings.Builder
	b.Grow(256 + len(p.services)*160 + len(changed)*900)
	mark := p.cfg.MasqueradeMark
	large := p.largeCluster()

	b.WriteString("*filter\n")
	for _, c := range []string{"KUBE-NODEPORTS", "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-PROXY-FIREWALL"} {
		chainLine(&b, c)
	}
	if jumps {
		for _, j := range [][3]string{
			{"INPUT", "KUBE-PROXY-FIREWALL", `"kubernetes load balancer firewall" -m conntrack --ctstate NEW`},
			{"INPUT", "KUBE-NODEPORTS", `"kubernetes health check service ports"`},
			{"INPUT", "KUBE-EXTERNAL-SERVICES", `"kubernetes externally-visible service portals" -m conntrack --ctstate NEW`},
			{"FORWARD", "KUBE-PROXY-FIREWALL", `"kubernetes load balancer firewall" -m conntrack --ctstate NEW`},
			{"FORWARD", "KUBE-FORWARD", `"kubernetes forwarding rules"`},
			{"FORWARD", "KUBE-SERVICES", `"kubernetes service portals" -m conntrack --ctstate NEW`},
			{"FORWARD", "KUBE-EXTERNAL-SERVICES", `"kubernetes externally-visible service portals" -m conntrack --ctstate NEW`},
			{"OUTPUT", "KUBE-PROXY-FIREWALL", `"kubernetes load balancer firewall" -m conntrack --ctstate NEW`},
			{"OUTPUT", "KUBE-SERVICES", `"kubernetes service portals" -m conntrack --ctstate NEW`},
		} {
			fmt.Fprintf(&b, "-A %s -m comment --comment %s -j %s\n", j[0], j[2], j[1])
		}
	}
	b.WriteString("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n")
	fmt.Fprintf(&b, "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark %s/%s -j ACCEPT\n", mark, mark)
	b.WriteString("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n")
	b.WriteString("COMMIT\n")

	b.WriteString("*nat\n")
	for _, c := range []string{"KUBE-NODEPORTS", "KUBE-SERVICES", "KUBE-MARK-MASQ", "KUBE-POSTROUTING"} {
		chainLine(&b, c)
	}
	for _, s := range p.services {
		if !changed[s.Key()] {
			continue
		}
		chainLine(&b, SVCChain(s))
		for _, ep := range s.Endpoints {
			chainLine(&b, SEPChain(s, ep))
		}
	}
	for _, c := range stale {
		chainLine(&b, c)
	}
	if jumps {
		b.WriteString("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n")
		b.WriteString("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n")
		b.WriteString("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n")
	}
	for _, s := range p.services {
		if len(s.Endpoints) == 0 {
			continue
		}
		fmt.Fprintf(&b, "-A KUBE-SERVICES -m comment --comment \"%s cluster IP\" -m %s -p %s -d %s --dport %d -j %s\n",
			s.PortNameString(), s.Protocol, s.Protocol, s.ClusterIP, s.Port, SVCChain(s))
		if changed[s.Key()] {
			p.writeService(&b, s, large)
		}
	}
	b.WriteString("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n")
	fmt.Fprintf(&b, "-A KUBE-POSTROUTING -m mark ! --mark %s/%s -j RETURN\n", mark, mark)
	fmt.Fprintf(&b, "-A KUBE-POSTROUTING -j MARK --xor-mark %s\n", mark)
	b.WriteString("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n")
	fmt.Fprintf(&b, "-A KUBE-MARK-MASQ -j MARK --or-mark %s\n", mark)
	for _, c := range stale {
		fmt.Fprintf(&b, "-X %s\n", c)
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// writeService writes a service's KUBE-SVC chain (masquerade of traffic
// from outside the pod network, then one statistic rule per endpoint) and
// its KUBE-SEP chains (hairpin masquerade, DNAT).
func (p *IPTables) writeService(b *strings.Builder, s Service, large bool) {
	svc := SVCChain(s)
	name := s.PortNameString()
	if p.cfg.ClusterCIDR.IsValid() {
		fmt.Fprintf(b, "-A %s -m comment --comment \"%s cluster IP\" -m %s -p %s -d %s --dport %d ! -s %s -j KUBE-MARK-MASQ\n",
			svc, name, s.Protocol, s.Protocol, s.ClusterIP, s.Port, p.cfg.ClusterCIDR)
	}
	n := len(s.Endpoints)
	for i, ep := range s.Endpoints {
		b.WriteString("-A " + svc)
		if !large {
			fmt.Fprintf(b, " -m comment --comment \"%s -> %s\"", name, ep)
		}
		if i < n-1 {
			b.WriteString(" -m statistic --mode random --probability " + probability(n-i))
		}
		b.WriteString(" -j " + SEPChain(s, ep) + "\n")
	}
	for _, ep := range s.Endpoints {
		sep := SEPChain(s, ep)
		comment := ""
		if !large {
			comment = " -m comment --comment " + name
		}
		fmt.Fprintf(b, "-A %s%s -s %s -j KUBE-MARK-MASQ\n", sep, comment, ep.Addr())
		fmt.Fprintf(b, "-A %s%s -m %s -p %s -j DNAT --to-destination %s\n", sep, comment, s.Protocol, s.Protocol, ep)
	}
}

func chainLine(b *strings.Builder, chain string) {
	b.WriteString(":" + chain + " - [0:0]\n")
}

// CountRules counts the rules (-A lines) in restore input, per table.
func CountRules(restore string) map[string]int {
	out := map[string]int{}
	table := ""
	for line := range strings.Lines(restore) {
		switch {
		case strings.HasPrefix(line, "*"):
			table = strings.TrimSpace(line[1:])
		case strings.HasPrefix(line, "-A "):
			out[table]++
		}
	}
	return out
}
