// Package mounts finds and prepares the filesystems the datapath depends on:
// the cgroup2 hierarchy (for cgroup-attached programs) and bpffs (for pins).
package mounts

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

const mountInfoPath = "/proc/self/mountinfo"

// Cgroup2Root returns the mount point of the cgroup2 hierarchy as this
// process sees it. Hybrid hosts mount it in different places, so it is read
// from mountinfo rather than assumed.
func Cgroup2Root() (string, error) {
	f, err := os.Open(mountInfoPath)
	if err != nil {
		return "", err
	}
	defer f.Close()
	return cgroup2Root(f)
}

func cgroup2Root(r io.Reader) (string, error) {
	points, err := mountPoints(r, "cgroup2")
	if err != nil {
		return "", err
	}
	if len(points) == 0 {
		return "", errors.New("no cgroup2 filesystem mounted (none in " + mountInfoPath + ")")
	}
	return points[0], nil
}

// MountPoints returns where filesystems of type fsType are mounted, in
// mountinfo order: e.g. "cgroup" for each cgroup v1 hierarchy.
func MountPoints(fsType string) ([]string, error) {
	f, err := os.Open(mountInfoPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return mountPoints(f, fsType)
}

func mountPoints(r io.Reader, fsType string) ([]string, error) {
	infos, err := mountinfo.GetMountsFromReader(r, mountinfo.FSTypeFilter(fsType))
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", mountInfoPath, err)
	}
	points := make([]string, len(infos))
	for i, m := range infos {
		points[i] = m.Mountpoint
	}
	return points, nil
}

// IsBPFFS reports whether path is the root of, or inside, a bpf filesystem.
func IsBPFFS(path string) (bool, error) {
	magic, err := fsMagic(path)
	return magic == unix.BPF_FS_MAGIC, err
}

// FSType names the filesystem path is on, for messages: "bpf", "tmpfs",
// "ext4", ..., or its statfs magic in hex when it is none of those.
func FSType(path string) (string, error) {
	magic, err := fsMagic(path)
	if err != nil {
		return "", err
	}
	if name, ok := fsNames[magic]; ok {
		return name, nil
	}
	return fmt.Sprintf("%#x", magic), nil
}

// fsNames are the filesystems a mistyped --bpffs is likely to land on.
var fsNames = map[int64]string{
	unix.BPF_FS_MAGIC:          "bpf",
	unix.TMPFS_MAGIC:           "tmpfs",
	unix.EXT4_SUPER_MAGIC:      "ext2/ext3/ext4", // one magic for the three
	unix.XFS_SUPER_MAGIC:       "xfs",
	unix.BTRFS_SUPER_MAGIC:     "btrfs",
	unix.OVERLAYFS_SUPER_MAGIC: "overlay",
	unix.NFS_SUPER_MAGIC:       "nfs",
	unix.SYSFS_MAGIC:           "sysfs",
	unix.PROC_SUPER_MAGIC:      "proc",
	unix.CGROUP2_SUPER_MAGIC:   "cgroup2",
	unix.TRACEFS_MAGIC:         "tracefs",
	unix.DEBUGFS_MAGIC:         "debugfs",
}

func fsMagic(path string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return 0, &os.PathError{Op: "statfs", Path: path, Err: err}
	}
	return int64(st.Type), nil
}

// EnsureBPFFS creates path and mounts a bpf filesystem on it unless one is
// already there, so repeated calls do not stack mounts.
func EnsureBPFFS(path string) error {
	if err := os.MkdirAll(path, 0o755); err != nil {
		return err
	}
	ok, err := IsBPFFS(path)
	if err != nil || ok {
		return err
	}
	if err := unix.Mount("bpf", path, "bpf", 0, ""); err != nil {
		return fmt.Errorf("mount bpffs on %s: %w", path, err)
	}
	return nil
}

// OwnCgroup is the calling process' cgroup2 directory.
func OwnCgroup() (string, error) {
	root, err := Cgroup2Root()
	if err != nil {
		return "", err
	}
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			return filepath.Join(root, rest), nil
		}
	}
	return "", errors.New("no cgroup2 entry in /proc/self/cgroup")
}

// JoinCgroup moves the whole calling process into the cgroup at dir.
func JoinCgroup(dir string) error {
	return os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0o644)
}
