package image

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// privateContainerd starts a containerd of the test's own: its root,
// state, sockets and opt directory under a temp dir, and no CRI plugin, so
// nothing of the machine's containerd (if any) is read or written. It
// returns a function running ctr against it in the k8s.io namespace.
func privateContainerd(t *testing.T) func(args ...string) (string, error) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("containerd needs root")
	}
	for _, bin := range []string{"containerd", "ctr"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s is not installed (Debian package containerd): %v", bin, err)
		}
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "containerd.sock")
	config := fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.restart",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[plugins."io.containerd.internal.v1.opt"]
  path = %[5]q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), sock, sock+".ttrpc", filepath.Join(dir, "opt"))
	cfg := filepath.Join(dir, "config.toml")
	require.NoError(t, os.WriteFile(cfg, []byte(config), 0o644))
	logf, err := os.Create(filepath.Join(dir, "containerd.log"))
	require.NoError(t, err)
	defer logf.Close()
	cmd := exec.Command("containerd", "--config", cfg)
	cmd.Stdout, cmd.Stderr = logf, logf
	require.NoError(t, cmd.Start(), "start containerd")
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			log, _ := os.ReadFile(logf.Name())
			t.Logf("containerd log:\n%s", log)
		}
	})

	ctr := func(args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		out, err := exec.CommandContext(ctx, "ctr", append([]string{"-a", sock, "-n", "k8s.io"}, args...)...).CombinedOutput()
		return string(out), err
	}
	require.Eventually(t, func() bool { _, err := ctr("version"); return err == nil },
		20*time.Second, 100*time.Millisecond, "private containerd answers on %s", sock)
	return ctr
}

// TestContainerdImports imports every image into a private containerd,
// lists them by tag, and runs the cluster images' tools in containers to
// see that their libraries resolve and the shell runs the real programs,
// not busybox's applets of the same names.
func TestContainerdImports(t *testing.T) {
	ctr := privateContainerd(t)
	o, _ := clusterOptions(t)
	specs, err := ClusterSpecs(o)
	require.NoError(t, err)
	sp := servicepathSpec(t)
	built, err := Write(t.TempDir(), append(specs, sp))
	require.NoError(t, err)

	for _, b := range built {
		// The native snapshotter unpacks by copying: no mounts to leave behind.
		out, err := ctr("images", "import", "--snapshotter", "native", b.File)
		require.NoError(t, err, "import %s: %s", b.File, out)
	}
	out, err := ctr("images", "ls", "-q")
	require.NoError(t, err, "list images: %s", out)
	for _, b := range built {
		require.Contains(t, strings.Fields(out), b.Tag, "containerd lists %s", b.Tag)
	}

	if _, err := exec.LookPath("runc"); err != nil {
		t.Skipf("images imported; runc is not installed to run them: %v", err)
	}
	for i, c := range []struct {
		tag  string
		args []string
		want []string
	}{
		// The iptables datapath/coexist runs, in the container's own netns:
		// its libraries resolve, and the extensions load (their help text).
		{ServicepathTag, []string{"/usr/sbin/iptables-nft-save"}, nil},
		{ServicepathTag, []string{"/usr/sbin/iptables-legacy-save"}, nil},
		{ServicepathTag, []string{"/usr/sbin/xtables-nft-multi", "iptables", "-p", "tcp", "-m", "comment", "-j", "MARK", "--help"},
			[]string{"comment match options", "MARK target options"}},
		{AgnhostTag, sh("nc -h 2>&1; curl --version; wget -q -O - -T 1 http://127.0.0.1:9/ 2>&1; echo wget=$?; dig -v 2>&1; ip -V; ss -V; bash --version; getent hosts localhost; seq 2 3"),
			[]string{"OpenBSD netcat", "curl 7", "wget=4", "DiG 9", "iproute2", "GNU bash", "localhost", "2\n3"}},
		// A server that accepts and never answers: wget gives up after one
		// try of -T 1 (exit 4), not twenty (busybox's timeout runs its own
		// wget unless given the path).
		{AgnhostTag, sh("nc -lk 127.0.0.1 8080 >/dev/null & sleep 0.5; timeout 5 /usr/bin/wget -q -O - -T 1 http://127.0.0.1:8080/; echo wget-timeout=$?"),
			[]string{"wget-timeout=4"}},
		{JessieDnsutilTag, sh("dig -v 2>&1; getent hosts localhost; seq 2 3"),
			[]string{"DiG 9", "localhost", "2\n3"}},
		{BusyBoxTag, sh("nc 2>&1; echo via-busybox"), []string{"BusyBox", "via-busybox"}},
		{NginxTag, []string{"nginx", "-t"}, []string{"syntax is ok", "test is successful"}},
	} {
		// A cgroup of the test's own, which runc removes with the container.
		id := fmt.Sprintf("sp-image-test-%d-%d", os.Getpid(), i)
		out, err := ctr(append([]string{"run", "--rm", "--snapshotter", "native", "--cgroup", "/" + id,
			"--cap-add", "CAP_NET_ADMIN", c.tag, id}, c.args...)...)
		require.NoError(t, err, "run %s %q: %s", c.tag, c.args, out)
		for _, w := range c.want {
			require.Contains(t, out, w, "%s runs %q", c.tag, c.args)
		}
	}
}

func sh(script string) []string { return []string{"sh", "-c", script} }
