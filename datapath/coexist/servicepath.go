package coexist

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/attach"
)

// RemoveServicepath leaves nothing of servicepath translating in this
// netns: it detaches every program servicepath attached (tc filters on
// every device, and the tcx, netkit, XDP and cgroup links pinned under
// linkDir), unpins its maps (sp_*) from pinDir and removes pinDir once
// empty. Pins that are not servicepath's stay, and so does pinDir with
// them. Absent state is not an error. It returns what it removed.
func RemoveServicepath(pinDir, linkDir string) ([]string, error) {
	var done []string
	links, _ := os.ReadDir(linkDir)
	for _, l := range links {
		done = append(done, "detached and unpinned link "+filepath.Join(linkDir, l.Name()))
	}
	var errs []error
	if err := (&attach.Attacher{LinkDir: linkDir}).DetachAll(); err != nil {
		errs = append(errs, err)
	}
	entries, err := os.ReadDir(pinDir)
	exists := err == nil
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	// Every map the objects pin is named sp_*: removing by prefix cannot
	// miss one a newer object added.
	for _, e := range entries {
		if e.IsDir() || !strings.HasPrefix(e.Name(), "sp_") {
			continue
		}
		p := filepath.Join(pinDir, e.Name())
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
			continue
		}
		done = append(done, "unpinned map "+p)
	}
	if exists {
		switch err := unix.Rmdir(pinDir); {
		case err == nil:
			done = append(done, "removed "+pinDir)
		case errors.Is(err, unix.ENOTEMPTY), errors.Is(err, unix.EBUSY):
			// Someone else's pins, or a mount point: not ours to remove.
		case !errors.Is(err, unix.ENOENT):
			errs = append(errs, fmt.Errorf("remove %s: %w", pinDir, err))
		}
	}
	return done, errors.Join(errs...)
}

// RemoveKubeProxy does what `kube-proxy --cleanup` does, in both iptables
// backends and nftables: it removes kube-proxy's chains (KUBE-SERVICES,
// KUBE-SVC-*, ...) and the rules that jump to them from the nat, filter
// and mangle tables, and deletes its ip and ip6 kube-proxy tables. A
// second run finds nothing. It returns what it removed.
func RemoveKubeProxy() ([]string, error) {
	ipt, err1 := removeIPTables()
	nft, err2 := removeNFTables()
	return append(ipt, nft...), errors.Join(err1, err2)
}
