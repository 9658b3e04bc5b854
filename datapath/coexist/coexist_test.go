package coexist

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/harness/kubeproxy"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
)

// listenEnv and lockEnv make the test binary a stand-in for another
// process: it listens on the address, or locks the pin directory, says
// so, and exits when stdin closes.
const (
	listenEnv = "COEXIST_TEST_LISTEN"
	lockEnv   = "COEXIST_TEST_LOCK"
)

func TestMain(m *testing.M) {
	if addr, dir := os.Getenv(listenEnv), os.Getenv(lockEnv); addr != "" || dir != "" {
		var err error
		if addr != "" {
			_, err = net.Listen("tcp4", addr)
		} else {
			_, err = Acquire(dir)
		}
		if err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		fmt.Println("ready")
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// helper starts the test binary as another process with env set, from
// the calling thread (so in its netns), once it is ready.
func helper(t *testing.T, env string) *exec.Cmd {
	t.Helper()
	child := exec.Command(os.Args[0])
	child.Env = append(os.Environ(), env)
	stdin, err := child.StdinPipe()
	require.NoError(t, err, "helper stdin")
	out, err := child.StdoutPipe()
	require.NoError(t, err, "helper stdout")
	require.NoError(t, child.Start(), "start helper")
	t.Cleanup(func() { stdin.Close(); child.Wait() })
	line, _ := bufio.NewReader(out).ReadString('\n')
	require.Equal(t, "ready\n", line, "helper with %s is ready", env)
	return child
}

// newNode is a fresh node netns; every iptables and nft call of a test
// runs inside it.
func newNode(t *testing.T) *topology.Topology {
	t.Helper()
	// iptables' lock is private to the test, as harness/kubeproxy's is.
	t.Setenv("XTABLES_LOCKFILE", filepath.Join(t.TempDir(), "xtables.lock"))
	return topology.NewForTest(t, topology.Spec{Name: "cx"})
}

// kubeProxyRules loads kube-proxy's rules for tool into the node, as
// kube-proxy's first sync (with its jumps from the built-in chains) writes
// them, plus the same top-level chain for IPv6 and a kubelet chain that
// cleanup must leave alone.
func kubeProxyRules(t *testing.T, topo *topology.Topology, tool kubeproxy.Tool) *kubeproxy.Runner {
	t.Helper()
	if err := tool.Available(); err != nil {
		t.Skip(err)
	}
	r := &kubeproxy.Runner{NS: topo.Node, LockFile: os.Getenv("XTABLES_LOCKFILE")}
	eps := []netip.AddrPort{netip.MustParseAddrPort("10.244.0.10:8080")}
	svcs := kubeproxy.Synthetic(3, netip.MustParseAddr("10.96.0.10"), 80, eps)
	cfg := kubeproxy.DefaultConfig(netip.MustParsePrefix("10.244.0.0/16"))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if tool == kubeproxy.NFT {
		text, err := kubeproxy.NewNFTables(cfg).FullSync(svcs)
		require.NoError(t, err, "generate nftables rules")
		_, err = r.Apply(ctx, tool, text+"add table ip6 kube-proxy\n")
		require.NoError(t, err, "load nftables rules")
		return r
	}
	text, err := kubeproxy.NewIPTables(cfg).FullSync(svcs, true)
	require.NoError(t, err, "generate iptables rules")
	_, err = r.Apply(ctx, tool, text+"*nat\n:KUBE-MARK-DROP - [0:0]\n-A KUBE-MARK-DROP -j MARK --set-xmark 0x8000/0x8000\nCOMMIT\n")
	require.NoError(t, err, "load iptables rules")
	v6 := kubeproxy.Tool(strings.Replace(string(tool), "iptables", "ip6tables", 1))
	_, err = r.Apply(ctx, v6, "*nat\n:KUBE-NODEPORTS - [0:0]\n:KUBE-SERVICES - [0:0]\n"+
		"-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"+
		"-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n")
	require.NoError(t, err, "load ip6tables rules")
	return r
}

// listing is what the node's tables hold after cleanup, per tool.
func listing(t *testing.T, r *kubeproxy.Runner, tool kubeproxy.Tool) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if tool == kubeproxy.NFT {
		out, err := r.Output(ctx, "nft", "list", "ruleset")
		require.NoError(t, err, "nft list ruleset")
		return out
	}
	var all string
	for _, save := range []string{strings.TrimSuffix(string(tool), "-restore") + "-save",
		strings.Replace(strings.TrimSuffix(string(tool), "-restore"), "iptables", "ip6tables", 1) + "-save"} {
		out, err := r.Output(ctx, save)
		require.NoError(t, err, save)
		all += out
	}
	return all
}

func TestFindAndRemoveKubeProxy(t *testing.T) {
	testenv.RequireRoot(t)
	for _, tc := range []struct {
		tool  kubeproxy.Tool
		where []string
		lines int // tables changed
	}{
		{kubeproxy.IPTablesLegacy, []string{"iptables-legacy (IPv4) table nat has chains KUBE-SERVICES, KUBE-NODEPORTS",
			"ip6tables-legacy (IPv6) table nat has chains KUBE-SERVICES, KUBE-NODEPORTS"}, 3},
		{kubeproxy.IPTablesNFT, []string{"iptables-nft (IPv4) table nat has chains KUBE-SERVICES, KUBE-NODEPORTS",
			"ip6tables-nft (IPv6) table nat has chains KUBE-SERVICES, KUBE-NODEPORTS"}, 3},
		{kubeproxy.NFT, []string{"nftables table ip kube-proxy", "nftables table ip6 kube-proxy"}, 2},
	} {
		t.Run(string(tc.tool), func(t *testing.T) {
			topo := newNode(t)
			r := kubeProxyRules(t, topo, tc.tool)
			require.NoError(t, topo.Node.Do(func() error {
				found, err := FindKubeProxy()
				require.NoError(t, err, "look for kube-proxy")
				var where []string
				for _, f := range found {
					where = append(where, f.Where)
				}
				assert.ElementsMatch(t, tc.where, where, "each backend and family with kube-proxy's rules is named")

				_, err = Preflight(filepath.Join(testenv.BPFFS(t), "sp"), false, io.Discard)
				var kp *KubeProxyError
				require.ErrorAs(t, err, &kp, "preflight refuses next to kube-proxy")
				assert.Contains(t, err.Error(), tc.where[0], "the refusal names what was found")
				assert.Contains(t, err.Error(), "--allow-kube-proxy", "and how to go on anyway")

				done, err := RemoveKubeProxy()
				require.NoError(t, err, "remove kube-proxy's rules")
				assert.Len(t, done, tc.lines, "one line per table changed: %v", done)

				found, err = FindKubeProxy()
				require.NoError(t, err, "look again")
				assert.Empty(t, found, "kube-proxy's rules are gone")
				done, err = RemoveKubeProxy()
				require.NoError(t, err, "a second removal succeeds")
				assert.Empty(t, done, "and finds nothing")
				return nil
			}), "in the node netns")

			left := listing(t, r, tc.tool)
			for _, c := range []string{"KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-SVC-", "KUBE-SEP-", "KUBE-MARK-MASQ",
				"KUBE-POSTROUTING", "KUBE-FORWARD", "KUBE-PROXY-FIREWALL", "KUBE-EXTERNAL-SERVICES", "kube-proxy"} {
				assert.NotContains(t, left, c, "%s removed", c)
			}
			if tc.tool != kubeproxy.NFT {
				assert.Contains(t, left, ":KUBE-MARK-DROP", "kubelet's chain stays, as kube-proxy --cleanup leaves it")
			}
		})
	}
}

// A port of kube-proxy's held by another process is found, with the
// process; one held by this process is not.
func TestFindListeners(t *testing.T) {
	testenv.RequireRoot(t)
	topo := newNode(t)
	var child *exec.Cmd
	require.NoError(t, topo.Node.Do(func() error {
		child = helper(t, listenEnv+"=0.0.0.0:10256")
		return nil
	}), "start a listener on 10256 in the node")

	require.NoError(t, topo.Node.Do(func() error {
		ours, err := net.Listen("tcp", "127.0.0.1:10249")
		require.NoError(t, err, "listen on 10249 ourselves")
		defer ours.Close()
		found, err := FindKubeProxy()
		require.NoError(t, err, "look for kube-proxy")
		require.Len(t, found, 1, "the other process' listener alone: %v", found)
		assert.Equal(t, fmt.Sprintf("TCP 0.0.0.0:10256 is listened on by pid %d, %s", child.Process.Pid, ownComm(t)), found[0].Where,
			"names the address and the process")
		return nil
	}), "in the node netns")
}

// ownComm is this test binary's command name, as the kernel truncates it
// (the matrix's binaries are named after their package path).
func ownComm(t *testing.T) string {
	t.Helper()
	comm, err := os.ReadFile("/proc/self/comm")
	require.NoError(t, err, "read own command name")
	return strings.TrimSpace(string(comm))
}

func TestLock(t *testing.T) {
	testenv.RequireRoot(t)
	dir := filepath.Join(testenv.BPFFS(t), "sp")
	l, err := AcquireExisting(dir)
	require.NoError(t, err, "no directory: nothing to lock")
	assert.Nil(t, l, "and no lock")

	l, err = Acquire(dir)
	require.NoError(t, err, "first holder")
	_, err = Acquire(dir)
	var inUse *InUseError
	require.ErrorAs(t, err, &inUse, "a second holder is refused")
	assert.Equal(t, os.Getpid(), inUse.PID, "the holder is named")
	assert.Contains(t, err.Error(), fmt.Sprintf("pid %d, %s", os.Getpid(), ownComm(t)), "by pid and command")
	_, err = AcquireExisting(dir)
	assert.ErrorAs(t, err, &inUse, "cleanup is refused too")

	require.NoError(t, l.Release(), "release")
	// The directory stays behind, as after a crash: without a holder it is free.
	l, err = Acquire(dir)
	require.NoError(t, err, "a directory without a holder is free")
	require.NoError(t, l.Release(), "release again")
	assert.NoError(t, (*Lock)(nil).Release(), "nil is released")

	// Another process holds it, then dies without releasing it.
	other := helper(t, lockEnv+"="+dir)
	_, err = Acquire(dir)
	require.ErrorAs(t, err, &inUse, "held by another process")
	assert.Equal(t, other.Process.Pid, inUse.PID, "which is named")
	require.NoError(t, other.Process.Kill(), "the holder crashes")
	_, _ = other.Process.Wait()
	l, err = Acquire(dir)
	require.NoError(t, err, "the pin directory of a crashed holder is free")
	require.NoError(t, l.Release(), "release")
}
