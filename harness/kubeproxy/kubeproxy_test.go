package kubeproxy

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var cfg = DefaultConfig(netip.MustParsePrefix("10.0.0.0/8"))

// svc1 is the service kube-proxy's own proxier tests use most
// (ns1/svc1:p80 at 172.30.0.41), so the chain names below can be checked
// against kube-proxy's expected output.
func svc1(eps ...string) Service {
	s := Service{Namespace: "ns1", Name: "svc1", PortName: "p80", ClusterIP: netip.MustParseAddr("172.30.0.41"), Port: 80, Protocol: "tcp"}
	for _, e := range eps {
		s.Endpoints = append(s.Endpoints, netip.MustParseAddrPort(e))
	}
	return s
}

func TestChainNamesMatchKubeProxy(t *testing.T) {
	s := svc1("10.180.0.1:80")
	assert.Equal(t, "KUBE-SVC-XPGD46QRK7WJZT7O", SVCChain(s), "KUBE-SVC name of ns1/svc1:p80 as in kube-proxy's proxier_test.go")
	assert.Equal(t, "KUBE-SEP-SXIVWICOYRO3J4NJ", SEPChain(s, s.Endpoints[0]), "KUBE-SEP name of 10.180.0.1:80 as in kube-proxy's proxier_test.go")
	assert.Equal(t, "service-ULMVA6XW-ns1/svc1/tcp/p80", NFTServiceChain(s), "nftables service chain as in kube-proxy's nftables tests")
	assert.Equal(t, "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80", NFTEndpointChain(s, s.Endpoints[0]), "nftables endpoint chain as in kube-proxy's nftables tests")
}

func TestProbabilities(t *testing.T) {
	assert.Equal(t, "0.3333333333", probability(3), "first of three")
	assert.Equal(t, "0.5000000000", probability(2), "second of three")
	assert.Equal(t, "0.0010000000", probability(1000), "first of a thousand")
}

func lines(s, prefix string) []string {
	var out []string
	for l := range strings.Lines(s) {
		if strings.HasPrefix(l, prefix) {
			out = append(out, strings.TrimSuffix(l, "\n"))
		}
	}
	return out
}

func TestIPTablesServiceRules(t *testing.T) {
	s := svc1("10.180.0.1:80", "10.180.0.2:80", "10.180.0.3:80")
	out, err := NewIPTables(cfg).FullSync([]Service{s}, false)
	require.NoError(t, err, "full sync")
	svc := SVCChain(s)
	sep := func(i int) string { return SEPChain(s, s.Endpoints[i]) }
	assert.Equal(t, []string{
		`-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j ` + svc,
		`-A ` + svc + ` -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ`,
		`-A ` + svc + ` -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.3333333333 -j ` + sep(0),
		`-A ` + svc + ` -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -m statistic --mode random --probability 0.5000000000 -j ` + sep(1),
		`-A ` + svc + ` -m comment --comment "ns1/svc1:p80 -> 10.180.0.3:80" -j ` + sep(2),
		`-A ` + sep(0) + ` -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ`,
		`-A ` + sep(0) + ` -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80`,
		`-A ` + sep(1) + ` -m comment --comment ns1/svc1:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ`,
		`-A ` + sep(1) + ` -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80`,
		`-A ` + sep(2) + ` -m comment --comment ns1/svc1:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ`,
		`-A ` + sep(2) + ` -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80`,
	}, lines(out, "-A KUBE-S")[:11], "the service's 11 nat rules, in kube-proxy's order and spelling")
	assert.Equal(t, []string{
		`-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS`,
		`-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN`,
		`-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000`,
		`-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully`,
		`-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000`,
	}, append(lines(out, "-A KUBE-SERVICES -m comment --comment \"kubernetes"), append(lines(out, "-A KUBE-POSTROUTING"), lines(out, "-A KUBE-MARK-MASQ")...)...),
		"top-level nat rules")
	assert.Equal(t, map[string]int{"filter": 3, "nat": 11 + 5}, CountRules(out), "rule count per table")
	assert.Contains(t, out, "*nat\n:KUBE-NODEPORTS - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n", "nat top-level chains declared (flushed) first")
	assert.True(t, strings.HasSuffix(out, "COMMIT\n"), "ends with COMMIT")
	assert.NotContains(t, out, "-A PREROUTING", "no jumps unless asked")
}

func TestIPTablesJumps(t *testing.T) {
	out, err := NewIPTables(cfg).FullSync([]Service{svc1("10.180.0.1:80")}, true)
	require.NoError(t, err, "full sync")
	for _, want := range []string{
		`-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`,
		`-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`,
		`-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING`,
		`-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD`,
	} {
		assert.Contains(t, out, want+"\n", "jump rule")
	}
	assert.NotContains(t, out, ":PREROUTING", "built-in chains are never declared, so --noflush keeps their other rules")
}

func TestIPTablesLargeClusterDropsEndpointComments(t *testing.T) {
	eps := []netip.AddrPort{netip.MustParseAddrPort("10.1.0.1:80"), netip.MustParseAddrPort("10.1.0.2:80"), netip.MustParseAddrPort("10.1.0.3:80")}
	services := Synthetic(LargeClusterEndpoints/3+1, netip.MustParseAddr("10.96.0.1"), 80, eps)
	out, err := NewIPTables(cfg).FullSync(services, false)
	require.NoError(t, err, "full sync")
	sep := SEPChain(services[0], eps[0])
	assert.Equal(t, []string{
		"-A " + sep + " -s 10.1.0.1 -j KUBE-MARK-MASQ",
		"-A " + sep + " -m tcp -p tcp -j DNAT --to-destination 10.1.0.1:80",
	}, lines(out, "-A "+sep), "above 1000 endpoints the per-endpoint comments go, as in kube-proxy")
	assert.Equal(t, 11*len(services)+5, CountRules(out)["nat"], "11 nat rules per service")
}

func TestIPTablesPartialSync(t *testing.T) {
	eps := []netip.AddrPort{netip.MustParseAddrPort("10.1.0.1:80"), netip.MustParseAddrPort("10.1.0.2:80"), netip.MustParseAddrPort("10.1.0.3:80")}
	services := Synthetic(3, netip.MustParseAddr("10.96.0.1"), 80, eps)
	p := NewIPTables(cfg)
	_, err := p.FullSync(services, true)
	require.NoError(t, err, "full sync")

	changed := services[1]
	changed.Endpoints = eps[:2]
	out, err := p.Upsert(changed)
	require.NoError(t, err, "upsert")
	assert.Len(t, lines(out, "-A KUBE-SERVICES -m comment --comment \"bench/"), 3, "KUBE-SERVICES rewritten with every service")
	assert.Equal(t, []string{":" + SVCChain(changed) + " - [0:0]"}, lines(out, ":KUBE-SVC-"), "only the changed service's chain is declared")
	assert.Equal(t, []string{"-X " + SEPChain(changed, eps[2])}, lines(out, "-X "), "the removed endpoint's chain is deleted")
	assert.Len(t, lines(out, "-A "+SVCChain(changed)), 3, "masquerade + two endpoint rules")
	assert.NotContains(t, out, "-A PREROUTING", "partial syncs leave the jumps alone")

	out, err = p.Delete(services[0].Key())
	require.NoError(t, err, "delete")
	assert.Len(t, lines(out, "-A KUBE-SERVICES -m comment --comment \"bench/"), 2, "KUBE-SERVICES without the removed service")
	assert.Len(t, lines(out, "-X "), 4, "the removed service's KUBE-SVC and three KUBE-SEP chains are deleted")
	assert.Empty(t, lines(out, "-A KUBE-SVC-"), "no unchanged service is rewritten")

	added := SyntheticService(9, netip.MustParseAddr("10.97.0.1"), 80, eps)
	out, err = p.Upsert(added)
	require.NoError(t, err, "add")
	ks := lines(out, "-A KUBE-SERVICES -m comment --comment \"bench/")
	require.Len(t, ks, 3, "KUBE-SERVICES with the new service")
	assert.Contains(t, ks[2], "-d 10.97.0.1 ", "a new service goes last")
	assert.Equal(t, []string{services[1].Key(), services[2].Key(), added.Key()}, keys(p.Services()), "state after the changes")

	_, err = p.Delete("10.0.0.1:1/tcp")
	assert.Error(t, err, "deleting an unknown service fails")
}

func keys(ss []Service) []string {
	var out []string
	for _, s := range ss {
		out = append(out, s.Key())
	}
	return out
}

func TestValidation(t *testing.T) {
	bad := svc1("10.180.0.1:80")
	bad.Protocol = "sctp"
	_, err := NewIPTables(cfg).FullSync([]Service{bad}, false)
	assert.ErrorContains(t, err, "protocol", "SCTP refused")
	v6 := svc1()
	v6.ClusterIP = netip.MustParseAddr("fd00::1")
	_, err = NewNFTables(cfg).Upsert(v6)
	assert.ErrorContains(t, err, "IPv4", "IPv6 refused")
	_, err = NewNFTables(cfg).FullSync([]Service{svc1(), svc1()})
	assert.ErrorContains(t, err, "twice", "duplicates refused")
}

func TestNFTablesLayout(t *testing.T) {
	s := svc1("10.180.0.1:80", "10.180.0.2:80")
	out, err := NewNFTables(cfg).FullSync([]Service{s})
	require.NoError(t, err, "full sync")
	svc, ep0, ep1 := NFTServiceChain(s), NFTEndpointChain(s, s.Endpoints[0]), NFTEndpointChain(s, s.Endpoints[1])
	for _, want := range []string{
		"add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }",
		"add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }",
		"add rule ip kube-proxy nat-prerouting jump services",
		"add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips",
		"add rule ip kube-proxy masquerading masquerade fully-random",
		"add rule ip kube-proxy " + svc + " ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
		"add rule ip kube-proxy " + svc + " numgen random mod 2 vmap { 0 : goto " + ep0 + ", 1 : goto " + ep1 + " }",
		"add rule ip kube-proxy " + ep0 + " ip saddr 10.180.0.1 jump mark-for-masquerade",
		"add rule ip kube-proxy " + ep0 + " meta l4proto tcp dnat to 10.180.0.1:80",
		"add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto " + svc + " }",
		"add element ip kube-proxy cluster-ips { 172.30.0.41 }",
	} {
		assert.Contains(t, out, want+"\n", "kube-proxy nftables layout")
	}
}

func TestNFTablesIncremental(t *testing.T) {
	eps := []netip.AddrPort{netip.MustParseAddrPort("10.1.0.1:80"), netip.MustParseAddrPort("10.1.0.2:80"), netip.MustParseAddrPort("10.1.0.3:80")}
	services := Synthetic(3, netip.MustParseAddr("10.96.0.1"), 80, eps)
	p := NewNFTables(cfg)
	_, err := p.FullSync(services)
	require.NoError(t, err, "full sync")

	changed := services[1]
	changed.Endpoints = eps[1:]
	out, err := p.Upsert(changed)
	require.NoError(t, err, "upsert")
	assert.NotContains(t, out, services[0].Name+"/", "other services untouched")
	assert.Contains(t, out, "flush chain ip kube-proxy "+NFTServiceChain(changed)+"\n", "service chain rewritten")
	assert.Contains(t, out, "numgen random mod 2 vmap", "two endpoints now")
	assert.Equal(t, []string{"delete chain ip kube-proxy " + NFTEndpointChain(changed, eps[0])}, lines(out, "delete chain"), "stale endpoint chain deleted")
	assert.NotContains(t, out, "add table", "no table-wide work")

	out, err = p.Delete(services[2].Key())
	require.NoError(t, err, "delete")
	assert.Equal(t, []string{
		"delete element ip kube-proxy service-ips { 10.96.0.3 . tcp . 80 }",
		"delete element ip kube-proxy cluster-ips { 10.96.0.3 }",
	}, lines(out, "delete element"), "map elements removed")
	assert.Len(t, lines(out, "delete chain"), 4, "service chain and three endpoint chains deleted")

	other := services[1]
	other.Port = 443
	_, err = p.Upsert(other)
	require.NoError(t, err, "second port on a ClusterIP")
	out, err = p.Delete(other.Key())
	require.NoError(t, err, "delete second port")
	assert.Empty(t, lines(out, "delete element ip kube-proxy cluster-ips"), "a ClusterIP another port still uses stays in cluster-ips")
}
