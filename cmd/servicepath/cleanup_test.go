package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/servicepath/servicepath/datapath/coexist"
	"github.com/servicepath/servicepath/harness/kubeproxy"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
)

// coexistNode is a node netns for the coexistence tests, with iptables'
// lock private to the test; every iptables and nft call runs inside it.
func coexistNode(t *testing.T, name string, spec topology.Spec) (*topology.Topology, *kubeproxy.Runner, func(args ...string) (int, string, string)) {
	t.Helper()
	lock := filepath.Join(t.TempDir(), "xtables.lock")
	t.Setenv("XTABLES_LOCKFILE", lock)
	spec.Name = name
	topo := topology.NewForTest(t, spec)
	inNode := func(args ...string) (int, string, string) { return runCLIIn(t, topo.Node, args...) }
	return topo, &kubeproxy.Runner{NS: topo.Node, LockFile: lock}, inNode
}

// applyRules loads text with tool into the node, skipping without it.
func applyRules(t *testing.T, r *kubeproxy.Runner, tool kubeproxy.Tool, text string) {
	t.Helper()
	if err := tool.Available(); err != nil {
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := r.Apply(ctx, tool, text)
	require.NoError(t, err, "load kube-proxy's rules with %s", tool)
}

// The migration from kube-proxy: load is refused next to its rules,
// loads with --allow-kube-proxy, is refused while another servicepath
// holds the pin directory, and cleanup --kube-proxy leaves neither
// translating; a second cleanup finds nothing.
func TestMigrationFromKubeProxy(t *testing.T) {
	testenv.RequireRoot(t)
	topo, r, inNode := coexistNode(t, "cxm", topology.Spec{Pods: []topology.PodSpec{{Name: "pod"}}})
	text, err := kubeproxy.NewIPTables(kubeproxy.DefaultConfig(topology.PodCIDRv4)).FullSync(
		kubeproxy.Synthetic(3, netip.MustParseAddr("10.96.0.10"), 80, []netip.AddrPort{netip.AddrPortFrom(topo.Pod("pod").IPv4, 8080)}), true)
	require.NoError(t, err, "generate kube-proxy's rules")
	applyRules(t, r, kubeproxy.IPTablesNFT, text)

	bpffs := filepath.Join(testenv.BPFFS(t), "sp")
	dev := topo.Pod("pod").HostIf
	cg := testenv.ChildCgroup(t)
	load := []string{"load", "--bpffs", bpffs, "--device", dev, "--cgroup", cg}

	code, _, errOut := inNode(load...)
	assert.Equal(t, 1, code, "load is refused next to kube-proxy")
	for _, want := range []string{"kube-proxy is running on this node", "iptables-nft (IPv4) table nat has chains KUBE-SERVICES, KUBE-NODEPORTS",
		"servicepath cleanup --kube-proxy", "--allow-kube-proxy"} {
		assert.Contains(t, errOut, want, "the refusal says what was found and how to go on")
	}
	_, err = os.Stat(bpffs)
	assert.ErrorIs(t, err, os.ErrNotExist, "nothing was loaded or pinned")

	code, out, errOut := inNode(append(load, "--allow-kube-proxy")...)
	require.Zero(t, code, "--allow-kube-proxy loads: %s", errOut)
	assert.Contains(t, out, "attached from-pod to "+dev, "attached")
	assert.Contains(t, errOut, "warning: --allow-kube-proxy: loading next to kube-proxy iptables rules", "with a warning")
	assert.NotEmpty(t, tcxPrograms(t, topo, dev, ebpf.AttachTCXIngress), "a program on the pod device")
	assert.NotEmpty(t, cgroupPrograms(t, cg), "socket hooks on the cgroup")

	held, err := coexist.Acquire(bpffs)
	require.NoError(t, err, "stand in for a running agent")
	code, _, errOut = inNode(append(load, "--allow-kube-proxy")...)
	assert.Equal(t, 1, code, "a second servicepath on the pin directory is refused")
	assert.Contains(t, errOut, fmt.Sprintf("another servicepath process (pid %d", os.Getpid()), "naming the holder")
	code, _, errOut = inNode("cleanup", "--bpffs", bpffs)
	assert.Equal(t, 1, code, "cleanup under a running instance is refused")
	assert.Contains(t, errOut, "stop it first", "and says what to do")
	require.NoError(t, held.Release(), "the other instance exits")

	code, out, errOut = inNode("cleanup", "--kube-proxy", "--bpffs", bpffs)
	require.Zero(t, code, "cleanup: %s", errOut)
	for _, want := range []string{"detached and unpinned link " + filepath.Join(bpffs, "links", dev+"-ingress"),
		"unpinned map " + filepath.Join(bpffs, "sp_services"), "removed " + bpffs,
		"iptables-nft (IPv4) table nat: deleted chains KUBE-MARK-MASQ, KUBE-NODEPORTS, KUBE-POSTROUTING, KUBE-SERVICES, 6 service and endpoint chains",
		"iptables-nft (IPv4) table filter: deleted chains"} {
		assert.Contains(t, out, want, "cleanup reports what it removed")
	}
	assert.Empty(t, tcxPrograms(t, topo, dev, ebpf.AttachTCXIngress), "no program on the pod device's ingress")
	assert.Empty(t, tcxPrograms(t, topo, dev, ebpf.AttachTCXEgress), "nor its egress")
	assert.Empty(t, cgroupPrograms(t, cg), "no socket hook on the cgroup")
	_, err = os.Stat(bpffs)
	assert.ErrorIs(t, err, os.ErrNotExist, "the pin directory is gone")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	saved, err := r.Output(ctx, "iptables-nft-save")
	require.NoError(t, err, "list iptables-nft rules")
	assert.NotContains(t, saved, "KUBE-", "no kube-proxy chain or rule is left")

	code, out, errOut = inNode("cleanup", "--kube-proxy", "--bpffs", bpffs)
	require.Zero(t, code, "a second cleanup succeeds: %s", errOut)
	assert.Contains(t, out, "nothing to remove under "+bpffs, "and finds nothing")

	code, _, errOut = inNode(load...)
	require.Zero(t, code, "with kube-proxy gone, load needs no override: %s", errOut)
	code, _, errOut = inNode("cleanup", "--bpffs", bpffs)
	require.Zero(t, code, "cleanup: %s", errOut)
}

// The agent checks before it loads, as load does.
func TestAgentRefusedNextToKubeProxy(t *testing.T) {
	testenv.RequireRoot(t)
	_, r, inNode := coexistNode(t, "cxa", topology.Spec{})
	applyRules(t, r, kubeproxy.NFT, "add table ip kube-proxy\n")
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	require.NoError(t, os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
users: [{name: u, user: {}}]
current-context: c
`), 0o600), "write kubeconfig")
	bpffs := filepath.Join(testenv.BPFFS(t), "sp")
	code, _, errOut := inNode("agent", "--kubeconfig", kubeconfig, "--node-name", "n", "--bpffs", bpffs)
	assert.Equal(t, 1, code, "the agent is refused next to kube-proxy")
	assert.Contains(t, errOut, "nftables table ip kube-proxy", "naming kube-proxy's table")
	_, err := os.Stat(bpffs)
	assert.ErrorIs(t, err, os.ErrNotExist, "before loading anything")
}

func tcxPrograms(t *testing.T, topo *topology.Topology, dev string, at ebpf.AttachType) []link.AttachedProgram {
	t.Helper()
	var progs []link.AttachedProgram
	require.NoError(t, topo.Node.Do(func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: at})
		if err != nil {
			return err
		}
		progs = res.Programs
		return nil
	}), "query %s programs on %s", at, dev)
	return progs
}

func cgroupPrograms(t *testing.T, cg string) []link.AttachedProgram {
	t.Helper()
	f, err := os.Open(cg)
	require.NoError(t, err, "open cgroup")
	defer f.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: ebpf.AttachCGroupInet4Connect})
	require.NoError(t, err, "query cgroup programs")
	return res.Programs
}
