package coexist

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/mounts"
)

// RemoveServicepath leaves nothing of servicepath translating in this
// netns: it detaches every program servicepath attached (tc filters on
// every device, and the tcx, netkit, XDP and cgroup links pinned under
// linkDir), unpins its maps from pinDir and removes pinDir once empty.
// It touches nothing unless pinDir is servicepath's (see servicepathMaps).
// Pins that are not servicepath's stay, and so does pinDir with them. An
// absent or empty pinDir is one already removed, not an error. It returns
// what it removed, also when it fails part way.
func RemoveServicepath(pinDir, linkDir string) ([]string, error) {
	maps, exists, err := servicepathMaps(pinDir)
	if err != nil {
		return nil, err
	}
	var done []string
	links, _ := os.ReadDir(linkDir)
	derr := (&attach.Attacher{LinkDir: linkDir}).DetachAll()
	for _, l := range links {
		if p := filepath.Join(linkDir, l.Name()); isGone(p) {
			done = append(done, "detached and unpinned link "+p)
		}
	}
	if derr != nil {
		// The maps mark pinDir as servicepath's: kept, they let a second
		// run find it and finish.
		return done, fmt.Errorf("%w; maps left pinned in %s, so that another run finds them and finishes", derr, pinDir)
	}
	var errs []error
	for _, name := range maps {
		p := filepath.Join(pinDir, name)
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
			continue
		}
		done = append(done, "unpinned map "+p)
	}
	if exists && len(errs) == 0 {
		switch err := unix.Rmdir(pinDir); {
		case err == nil:
			done = append(done, "removed "+pinDir)
		case errors.Is(err, unix.ENOTEMPTY):
			left, _ := os.ReadDir(pinDir)
			done = append(done, fmt.Sprintf("kept %s: it holds pins that are not servicepath's: %s", pinDir, names(left)))
		case errors.Is(err, unix.EBUSY), errors.Is(err, unix.ENOENT):
			// A mount point stays, empty; one removed meanwhile is gone.
		default:
			errs = append(errs, fmt.Errorf("remove %s: %w", pinDir, err))
		}
	}
	return done, errors.Join(errs...)
}

// NotPinDirError refuses a --bpffs that is not servicepath's pin
// directory, before anything is removed.
type NotPinDirError struct{ Dir, Why string }

func (e *NotPinDirError) Error() string { return e.Dir + " " + e.Why + "; nothing removed" }

// servicepathMaps returns the maps servicepath's loader pinned in pinDir,
// and whether pinDir exists. The loader pins each map under its own name,
// every name sp_*; matching by prefix finds those of an older or newer
// object too. A pinDir that is not servicepath's is refused, so that
// nothing of anyone else's is removed: one not on bpffs (which cannot
// hold a pin), or one holding entries but no such map.
func servicepathMaps(pinDir string) (maps []string, exists bool, err error) {
	fi, err := os.Stat(pinDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	if !fi.IsDir() {
		return nil, false, &NotPinDirError{pinDir, "is not a directory, so not a servicepath pin directory"}
	}
	fsType, err := mounts.FSType(pinDir)
	if err != nil {
		return nil, false, err
	}
	if fsType != "bpf" {
		return nil, false, &NotPinDirError{pinDir, "is not on a bpffs (filesystem type " + fsType + "), so not a servicepath pin directory"}
	}
	entries, err := os.ReadDir(pinDir)
	if err != nil {
		return nil, false, err
	}
	for _, e := range entries {
		if !e.IsDir() && strings.HasPrefix(e.Name(), "sp_") && isPinnedByName(filepath.Join(pinDir, e.Name())) {
			maps = append(maps, e.Name())
		}
	}
	if len(maps) == 0 && len(entries) > 0 {
		return nil, false, &NotPinDirError{pinDir, "is not a servicepath pin directory: no servicepath map is pinned there (it holds " + names(entries) + ")"}
	}
	return maps, true, nil
}

// isPinnedByName reports whether pin is a map whose kernel name (cut to
// 15 bytes) begins its file name, as the loader pins them.
func isPinnedByName(pin string) bool {
	m, err := ebpf.LoadPinnedMap(pin, &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return false
	}
	defer m.Close()
	info, err := m.Info()
	return err == nil && strings.HasPrefix(filepath.Base(pin), info.Name)
}

func isGone(path string) bool {
	_, err := os.Lstat(path)
	return errors.Is(err, os.ErrNotExist)
}

func names(entries []os.DirEntry) string {
	var s []string
	for _, e := range entries {
		s = append(s, e.Name())
	}
	return strings.Join(s, ", ")
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
