package coexist

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"time"

	"github.com/google/nftables"
)

// Both iptables backends are read and written with their own
// iptables-save and iptables-restore, as kube-proxy does: the legacy
// backend has no library interface but its binaries, and one restore per
// table flushes, unlinks and deletes chains that refer to each other in a
// single transaction, which per-rule library calls cannot.

// backend is one iptables binary set for one address family.
type backend struct {
	name    string // as the user knows it: iptables-legacy, ip6tables-nft, ...
	family  string // IPv4 or IPv6
	save    string
	restore string
	// legacy: the x_tables list of this netns' tables, read through
	// thread-self so a caller inside another netns sees that netns.
	procNames string
	// nft: the nftables family iptables-nft keeps its tables in.
	nftFamily nftables.TableFamily
}

var backends = []backend{
	{name: "iptables-legacy", family: "IPv4", save: "iptables-legacy-save", restore: "iptables-legacy-restore", procNames: "/proc/thread-self/net/ip_tables_names"},
	{name: "ip6tables-legacy", family: "IPv6", save: "ip6tables-legacy-save", restore: "ip6tables-legacy-restore", procNames: "/proc/thread-self/net/ip6_tables_names"},
	{name: "iptables-nft", family: "IPv4", save: "iptables-nft-save", restore: "iptables-nft-restore", nftFamily: nftables.TableFamilyIPv4},
	{name: "ip6tables-nft", family: "IPv6", save: "ip6tables-nft-save", restore: "ip6tables-nft-restore", nftFamily: nftables.TableFamilyIPv6},
}

// xtablesTables are the tables iptables-nft creates in nftables.
var xtablesTables = []string{"filter", "nat", "mangle", "raw", "security"}

// inUse probes whether the backend holds any table in this netns, so a
// backend that is not in use is never run (running legacy iptables would
// create its tables).
func (b backend) inUse() (bool, error) {
	if b.procNames != "" {
		data, err := os.ReadFile(b.procNames)
		if errors.Is(err, os.ErrNotExist) {
			return false, nil // x_tables not loaded: no legacy table anywhere
		}
		if err != nil {
			return false, err
		}
		return len(strings.TrimSpace(string(data))) > 0, nil
	}
	conn, err := nftables.New()
	if err != nil {
		return false, err
	}
	tables, err := conn.ListTablesOfFamily(b.nftFamily)
	if err != nil {
		return false, fmt.Errorf("list nftables tables: %w", err)
	}
	for _, t := range tables {
		if slices.Contains(xtablesTables, t.Name) {
			return true, nil
		}
	}
	return false, nil
}

// run runs one of the backend's binaries with input on stdin, bounded in
// time. The child inherits the calling thread's netns.
func (b backend) run(bin string, input string, args ...string) (string, error) {
	if _, err := exec.LookPath(bin); err != nil {
		return "", fmt.Errorf("%s has tables in this network namespace but %s is not installed (Debian package iptables): %w", b.name, bin, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if input != "" {
		cmd.Stdin = strings.NewReader(input)
	}
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s: %w: %s", bin, err, strings.TrimSpace(stderr.String()))
	}
	return out.String(), nil
}

// tables reads the backend's tables; nil when it holds none.
func (b backend) tables() (map[string]*ipTable, error) {
	used, err := b.inUse()
	if err != nil || !used {
		return nil, err
	}
	out, err := b.run(b.save, "")
	if err != nil {
		return nil, err
	}
	return parseSave(out), nil
}

// eachBackend calls fn with the tables of every backend in use, and
// joins the errors of those it could not read.
func eachBackend(fn func(b backend, tables map[string]*ipTable) error) error {
	var errs []error
	for _, b := range backends {
		tables, err := b.tables()
		if err == nil && tables != nil {
			err = fn(b, tables)
		}
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// ipTable is one table of iptables-save output.
type ipTable struct {
	chains []string
	rules  []ipRule
}

type ipRule struct {
	chain  string
	spec   string // after "-A CHAIN ", as iptables-save quotes it
	target string // of -j or -g
}

func (t *ipTable) has(chain string) bool { return slices.Contains(t.chains, chain) }

// parseSave reads iptables-save output into its tables.
func parseSave(out string) map[string]*ipTable {
	tables := map[string]*ipTable{}
	var cur *ipTable
	for _, line := range strings.Split(out, "\n") {
		switch {
		case strings.HasPrefix(line, "*"):
			cur = &ipTable{}
			tables[strings.TrimSpace(line[1:])] = cur
		case cur == nil:
		case strings.HasPrefix(line, ":"):
			if f := strings.Fields(line[1:]); len(f) > 0 {
				cur.chains = append(cur.chains, f[0])
			}
		case strings.HasPrefix(line, "-A "):
			chain, spec, _ := strings.Cut(line[3:], " ")
			cur.rules = append(cur.rules, ipRule{chain: chain, spec: spec, target: ruleTarget(spec)})
		}
	}
	return tables
}

// ruleTarget is the chain or target after -j/-g, skipping quoted text
// (comments) so a comment mentioning "-j" is not mistaken for one.
func ruleTarget(spec string) string {
	var words []string
	var w strings.Builder
	quoted, any := false, false
	for i := 0; i < len(spec); i++ {
		c := spec[i]
		switch {
		case c == '\\' && quoted && i+1 < len(spec):
			i++
			w.WriteByte(spec[i])
		case c == '"':
			quoted, any = !quoted, true
		case c == ' ' && !quoted:
			if w.Len() > 0 || any {
				words = append(words, w.String())
			}
			w.Reset()
			any = false
		default:
			w.WriteByte(c)
		}
	}
	words = append(words, w.String())
	for i := 0; i+1 < len(words); i++ {
		if words[i] == "-j" || words[i] == "-g" {
			return words[i+1]
		}
	}
	return ""
}

// What kube-proxy --cleanup removes (pkg/proxy/iptables CleanupLeftovers):
// fixed chains per table, plus the per-service chains in nat.
var (
	kubeProxyChains = map[string][]string{
		"nat":    {"KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", "KUBE-PROXY-CANARY"},
		"filter": {"KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL", "KUBE-PROXY-CANARY"},
		"mangle": {"KUBE-PROXY-CANARY"},
	}
	kubeProxyServiceChainPrefixes = []string{"KUBE-SVC-", "KUBE-SVL-", "KUBE-SEP-", "KUBE-FW-", "KUBE-EXT-"}
	// The chains whose presence means kube-proxy's iptables mode ran.
	kubeProxyMarkers = []string{"KUBE-SERVICES", "KUBE-NODEPORTS"}
)

func isKubeProxyChain(table, chain string) bool {
	if slices.Contains(kubeProxyChains[table], chain) {
		return true
	}
	if table != "nat" {
		return false
	}
	for _, p := range kubeProxyServiceChainPrefixes {
		if strings.HasPrefix(chain, p) {
			return true
		}
	}
	return false
}

// findIPTables reports each backend whose nat table has kube-proxy's
// top-level chains.
func findIPTables() ([]Finding, error) {
	var found []Finding
	err := eachBackend(func(b backend, tables map[string]*ipTable) error {
		nat := tables["nat"]
		if nat == nil {
			return nil
		}
		var marks []string
		for _, c := range kubeProxyMarkers {
			if nat.has(c) {
				marks = append(marks, c)
			}
		}
		if len(marks) > 0 {
			found = append(found, Finding{What: "kube-proxy iptables rules",
				Where: fmt.Sprintf("%s (%s) table nat has chains %s", b.name, b.family, strings.Join(marks, ", "))})
		}
		return nil
	})
	return found, err
}

// cleanupScript is the iptables-restore --noflush input that removes
// kube-proxy's chains from one table: flush them, delete the rules of
// other chains that jump to them (kube-proxy's jump rules from the
// built-in chains), delete them. Empty when the table has none. It also
// returns what it removes, for the report.
func cleanupScript(name string, t *ipTable) (script string, chains, jumps []string) {
	for _, c := range t.chains {
		if isKubeProxyChain(name, c) {
			chains = append(chains, c)
		}
	}
	if len(chains) == 0 {
		return "", nil, nil
	}
	var b strings.Builder
	fmt.Fprintf(&b, "*%s\n", name)
	for _, c := range chains {
		fmt.Fprintf(&b, ":%s - [0:0]\n", c)
	}
	for _, r := range t.rules {
		if !isKubeProxyChain(name, r.chain) && slices.Contains(chains, r.target) {
			fmt.Fprintf(&b, "-D %s %s\n", r.chain, r.spec)
			jumps = append(jumps, r.chain+" -> "+r.target)
		}
	}
	for _, c := range chains {
		fmt.Fprintf(&b, "-X %s\n", c)
	}
	b.WriteString("COMMIT\n")
	return b.String(), chains, jumps
}

// removeIPTables removes kube-proxy's chains and jump rules from every
// table of every backend in use, and reports one line per table changed.
func removeIPTables() ([]string, error) {
	var done []string
	err := eachBackend(func(b backend, tables map[string]*ipTable) error {
		var errs []error
		for _, name := range []string{"nat", "filter", "mangle"} {
			t := tables[name]
			if t == nil {
				continue
			}
			script, chains, jumps := cleanupScript(name, t)
			if script == "" {
				continue
			}
			if _, err := b.run(b.restore, script, "-w", "5", "--noflush"); err != nil {
				errs = append(errs, fmt.Errorf("%s (%s) table %s: %w", b.name, b.family, name, err))
				continue
			}
			line := fmt.Sprintf("%s (%s) table %s: deleted chains %s", b.name, b.family, name, summarize(chains))
			if len(jumps) > 0 {
				line += "; jump rules " + strings.Join(jumps, ", ")
			}
			done = append(done, line)
		}
		return errors.Join(errs...)
	})
	return done, err
}

// summarize names fixed chains and counts the per-service ones, which
// run to thousands in a large cluster.
func summarize(chains []string) string {
	var named []string
	services := 0
	for _, c := range chains {
		if slices.ContainsFunc(kubeProxyServiceChainPrefixes, func(p string) bool { return strings.HasPrefix(c, p) }) {
			services++
		} else {
			named = append(named, c)
		}
	}
	if services > 0 {
		named = append(named, fmt.Sprintf("%d service and endpoint chains", services))
	}
	return strings.Join(named, ", ")
}
