package mounts

import (
	"strings"
	"testing"
)

const sampleMountInfo = `22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
25 22 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
`

func TestParseCgroup2(t *testing.T) {
	got, err := cgroup2Root(strings.NewReader(sampleMountInfo))
	if err != nil || got != "/sys/fs/cgroup/unified" {
		t.Fatalf("cgroup2Root = %q, %v", got, err)
	}
}

func TestMountPointsV1(t *testing.T) {
	in := sampleMountInfo + "33 30 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
	got, err := mountPoints(strings.NewReader(in), "cgroup")
	if err != nil || strings.Join(got, " ") != "/sys/fs/cgroup/systemd /sys/fs/cgroup/memory" {
		t.Fatalf("mountPoints(cgroup) = %q, %v", got, err)
	}
}

func TestParseCgroup2Escaped(t *testing.T) {
	// No optional fields, and a mount point with an escaped space.
	in := `40 22 0:40 / /mnt/my\040cgroup rw - cgroup2 none rw` + "\n"
	got, err := cgroup2Root(strings.NewReader(in))
	if err != nil || got != "/mnt/my cgroup" {
		t.Fatalf("cgroup2Root = %q, %v", got, err)
	}
}

func TestParseCgroup2Missing(t *testing.T) {
	in := strings.ReplaceAll(sampleMountInfo, "cgroup2", "cgroup")
	if got, err := cgroup2Root(strings.NewReader(in)); err == nil || !strings.Contains(err.Error(), "no cgroup2") {
		t.Fatalf("cgroup2Root = %q, %v; want a no-cgroup2 error", got, err)
	}
}

func TestParseMalformed(t *testing.T) {
	for _, line := range []string{"1 2 3", `1 2 0:1 / /a\04 rw - cgroup2 x rw`} {
		if _, err := mountPoints(strings.NewReader(line+"\n"), "cgroup2"); err == nil {
			t.Errorf("mountinfo line %q accepted", line)
		}
	}
}
