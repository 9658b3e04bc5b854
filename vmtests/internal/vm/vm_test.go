package vm

import (
	"bytes"
	"os"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestConsole(t *testing.T) {
	data, err := os.ReadFile("testdata/console.txt")
	if err != nil {
		t.Fatal(err)
	}
	var c Console
	for _, line := range strings.Split(strings.TrimSuffix(string(data), "\n"), "\n") {
		c.Feed(line)
	}
	if !c.Booted() || c.Release != "6.12.117+deb13-cloud-amd64" {
		t.Errorf("release from the boot marker: %q", c.Release)
	}
	if c.Done {
		t.Error("done without the done marker")
	}
	if !c.InitramfsFailed {
		t.Error("the kernel's initramfs unpacking failure not seen")
	}
	if !reflect.DeepEqual(c.ModuleFailures, []string{"netkit"}) {
		t.Errorf("module failures: %v", c.ModuleFailures)
	}
	want := []Run{
		{Package: "example.com/a", Output: []string{"=== RUN   TestA", "--- PASS: TestA (0.00s)", "PASS"}, Exit: 0, Ended: true},
		// The end marker follows output that did not end its line.
		{Package: "example.com/b", Output: []string{"=== RUN   TestB", "panic: boom"}, Exit: 2, Ended: true},
		// The guest died mid-binary.
		{Package: "example.com/c", Output: []string{"=== RUN   TestC", "[   12.345678] reboot: Power down"}},
	}
	if len(c.Runs) != len(want) {
		t.Fatalf("%d runs, want %d", len(c.Runs), len(want))
	}
	for i, r := range c.Runs {
		if !reflect.DeepEqual(*r, want[i]) {
			t.Errorf("run %d:\n got %+v\nwant %+v", i, *r, want[i])
		}
	}
}

func TestParseShowDepends(t *testing.T) {
	out := "builtin bridge\ninsmod /k/lib/modules/6.1.0/kernel/net/ipv4/udp_tunnel.ko \n" +
		"insmod /k/lib/modules/6.1.0/kernel/drivers/net/vxlan/vxlan.ko.xz opt=1\n"
	got := parseShowDepends(out)
	want := []Module{
		{Name: "udp_tunnel", Path: "/k/lib/modules/6.1.0/kernel/net/ipv4/udp_tunnel.ko"},
		{Name: "vxlan", Path: "/k/lib/modules/6.1.0/kernel/drivers/net/vxlan/vxlan.ko.xz"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("modules in load order:\n got %+v\nwant %+v", got, want)
	}
}

func TestParseLdd(t *testing.T) {
	out := "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibmnl.so.0 => /lib/x86_64-linux-gnu/libmnl.so.0 (0x00007f5e)\n" +
		"\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f5e)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f5e)\n"
	want := []string{"/lib/x86_64-linux-gnu/libmnl.so.0", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"}
	if got := parseLdd(out); !reflect.DeepEqual(got, want) {
		t.Errorf("libraries and loader: got %v, want %v", got, want)
	}
}

func TestInitScript(t *testing.T) {
	s := InitScript(Spec{
		Release:     "6.1.0-56-cloud-amd64",
		Modules:     []Module{{Name: "veth"}},
		Binaries:    []Binary{{Package: "example.com/x/y", Dir: "x/y"}},
		Env:         []string{"VMTEST_KERNEL_RELEASE=6.1.0-56-cloud-amd64"},
		TestArgs:    []string{"-test.short"},
		TestTimeout: 2 * time.Minute,
	})
	for _, want := range []string{
		"export 'VMTEST_KERNEL_RELEASE=6.1.0-56-cloud-amd64'",
		"mount -t bpf bpf /sys/fs/bpf",
		"insmod /lib/modules/6.1.0-56-cloud-amd64/veth.ko || echo '@@vmtest modfail veth'",
		"echo '@@vmtest begin example.com/x/y'",
		"cd /src/x/y",
		"timeout -s KILL 150 /tests/example.com_x_y.test '-test.v' '-test.count=1' '-test.timeout=120s' '-test.short' 2>&1 </dev/null",
		`echo "@@vmtest end example.com/x/y exit=$?"`,
		"poweroff -f",
	} {
		if !strings.Contains(s, want+"\n") {
			t.Errorf("init script lacks line %q:\n%s", want, s)
		}
	}
}

func TestCPIO(t *testing.T) {
	var buf bytes.Buffer
	c := newCPIO(&buf)
	if err := c.File("a/b/file", 0o644, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := c.CharDev("dev/console", 5, 1); err != nil {
		t.Fatal(err)
	}
	if err := c.Symlink("a/link", "b/file"); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	type entry struct {
		name string
		mode uint32
		data string
		rdev [2]uint32
	}
	var got []entry
	b := buf.Bytes()
	for len(b) > 0 {
		if at := buf.Len() - len(b); at%4 != 0 || string(b[:6]) != "070701" {
			t.Fatalf("bad header at %d: %q", at, b[:min(len(b), 6)])
		}
		field := func(i int) uint32 {
			v, err := strconv.ParseUint(string(b[6+8*i:14+8*i]), 16, 32)
			if err != nil {
				t.Fatal(err)
			}
			return uint32(v)
		}
		mode, size, rmaj, rmin, namesize := field(1), int(field(6)), field(9), field(10), int(field(11))
		name := string(b[110 : 110+namesize-1])
		off := (110 + namesize + 3) &^ 3
		got = append(got, entry{name, mode, string(b[off : off+size]), [2]uint32{rmaj, rmin}})
		b = b[(off+size+3)&^3:]
	}
	want := []entry{
		{"a", syscall.S_IFDIR | 0o755, "", [2]uint32{}},
		{"a/b", syscall.S_IFDIR | 0o755, "", [2]uint32{}},
		{"a/b/file", syscall.S_IFREG | 0o644, "hello", [2]uint32{}},
		{"dev", syscall.S_IFDIR | 0o755, "", [2]uint32{}},
		{"dev/console", syscall.S_IFCHR | 0o600, "", [2]uint32{5, 1}},
		{"a/link", syscall.S_IFLNK | 0o777, "b/file", [2]uint32{}},
		{"TRAILER!!!", 0, "", [2]uint32{}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("archive entries:\n got %+v\nwant %+v", got, want)
	}
}
