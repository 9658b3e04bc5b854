package attach

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// CheckCgroup returns the inode of the cgroup2 directory at path, or why
// socket hooks cannot attach there.
func CheckCgroup(path string) (uint64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", path, err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	var fs unix.Statfs_t
	if !ok || !fi.IsDir() || unix.Statfs(path, &fs) != nil || fs.Type != unix.CGROUP2_SUPER_MAGIC {
		// Under `ip netns exec`, /sys is remounted and /sys/fs/cgroup is a
		// plain directory: say so rather than fail inside the kernel.
		return 0, fmt.Errorf("%s is not a cgroup2 directory (find the mount with: awk '$3 == \"cgroup2\" {print $2}' /proc/self/mounts)", path)
	}
	return st.Ino, nil
}

// cgroupPin names a hook's pinned link by the cgroup's inode, so several
// cgroups can be attached at once and a reload finds its own link.
func (a *Attacher) cgroupPin(path, hook string) (string, uint64, error) {
	ino, err := CheckCgroup(path)
	if err != nil {
		return "", 0, err
	}
	return filepath.Join(a.LinkDir, fmt.Sprintf("cgroup-%d-%s", ino, hook)), ino, nil
}

// AttachCgroup attaches prog as the named socket hook of the cgroup at
// path (cgroup2), replacing an earlier servicepath program there in place.
// Every socket of every process in that cgroup and below is affected.
func (a *Attacher) AttachCgroup(prog *ebpf.Program, path, hook string, at ebpf.AttachType) error {
	pin, ino, err := a.cgroupPin(path, hook)
	if err != nil {
		return err
	}
	if old, err := link.LoadPinnedLink(pin, nil); err == nil {
		info, ierr := old.Info()
		if ierr == nil && info.Cgroup() != nil && info.Cgroup().CgroupId == ino {
			err := old.Update(prog)
			old.Close()
			if err != nil {
				return fmt.Errorf("replace %s on %s: %w", hook, path, err)
			}
			return nil
		}
		// A stale link of a removed cgroup whose inode number was reused.
		old.Close()
		if err := detachPinned(pin); err != nil {
			return err
		}
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: path, Attach: at, Program: prog})
	if err != nil {
		return fmt.Errorf("attach %s to cgroup %s: %w", hook, path, err)
	}
	defer l.Close()
	if err := os.MkdirAll(a.LinkDir, 0o755); err != nil {
		return err
	}
	if err := l.Pin(pin); err != nil {
		return fmt.Errorf("pin %s link: %w", hook, err)
	}
	return nil
}

// AttachedCgroups lists the cgroup directories that have servicepath
// socket hooks pinned under LinkDir, found by their inode under root.
func (a *Attacher) AttachedCgroups(root string) ([]string, error) {
	pins, err := os.ReadDir(a.LinkDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	want := map[uint64]bool{}
	for _, p := range pins {
		var ino uint64
		var hook string
		if n, _ := fmt.Sscanf(p.Name(), "cgroup-%d-%s", &ino, &hook); n == 2 {
			want[ino] = true
		}
	}
	var out []string
	if len(want) == 0 {
		return nil, nil
	}
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil // cgroups come and go while we walk
		}
		var st syscall.Stat_t
		if syscall.Stat(path, &st) == nil && want[st.Ino] {
			out = append(out, path)
		}
		return nil
	})
	return out, err
}
