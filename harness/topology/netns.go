package topology

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/vishvananda/netns"

	"github.com/servicepath/servicepath/datapath/nsexec"
	"golang.org/x/sys/unix"
)

// netnsDir is where netns.NewNamed and iproute2 keep named namespaces.
const netnsDir = "/run/netns"

// newNamedNS creates a netns bound at /run/netns/name, so iproute2 can use
// it, without moving the caller's thread into it.
func newNamedNS(name string) (netns.NsHandle, error) {
	h := netns.None()
	err := nsexec.OnThread(func() error {
		var err error
		h, err = netns.NewNamed(name)
		return err
	})
	if err != nil {
		h.Close()
		// EEXIST means the name belongs to someone else; otherwise NewNamed
		// may have left its placeholder file or mount, which are ours.
		if !errors.Is(err, fs.ErrExist) {
			_ = deleteNamedNS(name)
		}
		return netns.None(), fmt.Errorf("create netns %s: %w", name, err)
	}
	return h, nil
}

// deleteNamedNS drops the bind mount that keeps a named netns alive and its
// file. The namespace itself goes once no handle or socket refers to it.
func deleteNamedNS(name string) error {
	p := filepath.Join(netnsDir, name)
	err := unix.Unmount(p, unix.MNT_DETACH)
	if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount %s: %w", p, err)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
