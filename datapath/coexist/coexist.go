// Package coexist keeps servicepath from translating Service traffic
// next to another translator: before anything is loaded it looks for
// kube-proxy (its iptables chains in either backend, its nftables tables,
// its ports) and for another servicepath on the same pin directory; for
// the migration it removes what either of them left. Everything happens
// in the calling thread's network namespace.
package coexist

import (
	"errors"
	"fmt"
	"io"
	"strings"
)

// Finding is one sign of kube-proxy.
type Finding struct {
	What  string // "kube-proxy iptables rules"
	Where string // "iptables-nft (IPv4) table nat has chains KUBE-SERVICES"
}

// KubeProxyError refuses to load next to kube-proxy, naming what was found.
type KubeProxyError struct{ Found []Finding }

func (e *KubeProxyError) Error() string {
	var b strings.Builder
	b.WriteString("kube-proxy is running on this node, or left its rules behind; two translators would fight over the same traffic:\n")
	for _, f := range e.Found {
		fmt.Fprintf(&b, "  %s: %s\n", f.What, f.Where)
	}
	b.WriteString("Stop kube-proxy (delete its DaemonSet), then run `servicepath cleanup --kube-proxy` to remove its rules; " +
		"or pass --allow-kube-proxy to load anyway during a migration")
	return b.String()
}

// FindKubeProxy looks for kube-proxy's iptables chains (KUBE-SERVICES,
// KUBE-NODEPORTS in nat; legacy and nft backends, IPv4 and IPv6), its
// nftables tables (ip and ip6 kube-proxy) and listeners of other
// processes on its ports. It reports what it could check even when a
// check fails.
func FindKubeProxy() ([]Finding, error) {
	var found []Finding
	var errs []error
	for _, find := range []func() ([]Finding, error){
		findIPTables,
		findNFTables,
		func() ([]Finding, error) { return findListeners(KubeProxyPorts) },
	} {
		f, err := find()
		found = append(found, f...)
		if err != nil {
			errs = append(errs, err)
		}
	}
	return found, errors.Join(errs...)
}

// Preflight runs before servicepath loads anything into pinDir: it
// refuses next to kube-proxy unless allowKubeProxy (then what it found is
// written to warn), and takes pinDir's lock, refusing when another
// servicepath holds it. The caller releases the lock when it exits.
func Preflight(pinDir string, allowKubeProxy bool, warn io.Writer) (*Lock, error) {
	found, err := FindKubeProxy()
	switch {
	case allowKubeProxy:
		for _, f := range found {
			fmt.Fprintf(warn, "warning: --allow-kube-proxy: loading next to %s (%s); both will translate Service traffic until kube-proxy is gone\n", f.What, f.Where)
		}
		if err != nil {
			fmt.Fprintf(warn, "warning: --allow-kube-proxy: could not check for kube-proxy: %v\n", err)
		}
	case len(found) > 0:
		return nil, &KubeProxyError{Found: found}
	case err != nil:
		return nil, fmt.Errorf("check for kube-proxy (pass --allow-kube-proxy to skip): %w", err)
	}
	return Acquire(pinDir)
}
