package main

import (
	"errors"
	"fmt"

	"github.com/spf13/pflag"

	"github.com/servicepath/servicepath/datapath/coexist"
)

// cmdCleanup is the migration path and the uninstall: afterwards nothing
// of servicepath translates in this netns, and with --kube-proxy nothing
// of kube-proxy either. Running it again finds nothing and succeeds.
func cmdCleanup(fs *pflag.FlagSet, o output) func() error {
	bpffs := fs.String("bpffs", defaultBPFFS, "bpffs directory given to load")
	kubeProxy := fs.Bool("kube-proxy", false, "also remove kube-proxy's KUBE-* chains and rules (iptables legacy and nft, IPv4 and IPv6) and its nftables tables, as kube-proxy --cleanup does")
	return func() error {
		// A running agent would keep translating with programs it holds open.
		lock, err := coexist.AcquireExisting(*bpffs)
		if err != nil {
			return err
		}
		defer lock.Release()

		done, err := coexist.RemoveServicepath(*bpffs, linkDir(*bpffs))
		// A mistyped --bpffs stops everything, kube-proxy's rules included.
		if notOurs := (*coexist.NotPinDirError)(nil); errors.As(err, &notOurs) {
			return err
		}
		if *kubeProxy {
			kp, kerr := coexist.RemoveKubeProxy()
			done, err = append(done, kp...), errors.Join(err, kerr)
		}
		if err := report(o, *bpffs, done, err); err != nil {
			return err
		}
		fmt.Fprintln(o.out, "servicepath is detached from every device of this network namespace and every cgroup it attached to")
		if *kubeProxy {
			// kube-proxy still running writes its rules again within seconds.
			found, _ := coexist.FindKubeProxy()
			for _, f := range found {
				fmt.Fprintf(o.errOut, "warning: kube-proxy still seems to run: %s: %s\n", f.What, f.Where)
			}
		}
		return nil
	}
}

// report prints what was removed, also before an error, so that a partial
// failure shows what it did.
func report(o output, bpffs string, done []string, err error) error {
	for _, d := range done {
		fmt.Fprintln(o.out, d)
	}
	if err == nil && len(done) == 0 {
		fmt.Fprintf(o.out, "nothing to remove under %s\n", bpffs)
	}
	return err
}
