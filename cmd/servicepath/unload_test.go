package main

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/harness/kubeproxy"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
)

// pinMap pins a new array map named name at path, as the loader pins its
// maps (by name) when name is the path's last element.
func pinMap(t *testing.T, path, name string) {
	t.Helper()
	m, err := ebpf.NewMap(&ebpf.MapSpec{Name: name, Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	require.NoError(t, err, "create map %s", name)
	defer m.Close()
	require.NoError(t, m.Pin(path), "pin map at %s", path)
}

func pinProgram(t *testing.T, path string) {
	t.Helper()
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SocketFilter, License: "MIT",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()}})
	require.NoError(t, err, "create program")
	defer p.Close()
	require.NoError(t, p.Pin(path), "pin program at %s", path)
}

// Both commands run in a node netns of their own: without the refusal
// they would detach from every device of the netns they run in.
var removeCommands = []string{"unload", "cleanup"}

// A directory that is not on bpffs holds no pins: unload and cleanup
// refuse it, naming it and its filesystem, and every file there stays,
// even those named like servicepath's maps.
func TestUnloadRefusesDirectoryNotOnBPFFS(t *testing.T) {
	topo := topology.NewForTest(t, topology.Spec{Name: "unp"})
	dir := t.TempDir()
	files := map[string]string{
		"sp_services":   "my services\n",
		"sp_ct":         "my conntrack notes\n",
		"sp_backends":   "my backends\n",
		"links/sp_list": "my links\n",
		"notes.txt":     "unrelated\n",
	}
	require.NoError(t, os.Mkdir(filepath.Join(dir, "links"), 0o755), "mkdir links")
	for name, content := range files {
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644), "write %s", name)
	}
	for _, cmd := range removeCommands {
		code, out, errOut := runCLIIn(t, topo.Node, cmd, "--bpffs", dir)
		assert.Equal(t, 1, code, "%s refuses a directory not on bpffs", cmd)
		assert.Contains(t, errOut, dir+" is not on a bpffs (filesystem type ", "%s names the directory and why", cmd)
		assert.Contains(t, errOut, "nothing removed", "%s says it removed nothing", cmd)
		assert.NotContains(t, out, "removed", "%s claims no removal", cmd)
		for name, content := range files {
			b, err := os.ReadFile(filepath.Join(dir, name))
			if assert.NoError(t, err, "%s left %s", cmd, name) {
				assert.Equal(t, content, string(b), "%s left %s as it was", cmd, name)
			}
		}
	}
}

// A refused --bpffs stops cleanup --kube-proxy before kube-proxy's rules
// too: the mistake is the user's to fix first.
func TestCleanupRefusedKeepsKubeProxyRules(t *testing.T) {
	_, r, inNode := coexistNode(t, "unc", topology.Spec{})
	applyRules(t, r, kubeproxy.NFT, "add table ip kube-proxy\n")
	dir := t.TempDir()
	code, _, errOut := inNode("cleanup", "--kube-proxy", "--bpffs", dir)
	assert.Equal(t, 1, code, "cleanup refuses a directory not on bpffs")
	assert.Contains(t, errOut, dir+" is not on a bpffs", "naming it")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tables, err := r.Output(ctx, "nft", "list", "tables")
	require.NoError(t, err, "list nftables tables")
	assert.Contains(t, tables, "table ip kube-proxy", "kube-proxy's table stays")
}

// A bpffs holding only pins that are not servicepath's, even ones named
// sp_* that are not maps the loader pinned, is refused, and every pin
// stays.
func TestUnloadRefusesBPFFSWithoutServicepathPins(t *testing.T) {
	topo := topology.NewForTest(t, topology.Spec{Name: "unf"})
	dir := testenv.BPFFS(t)
	require.NoError(t, os.Mkdir(filepath.Join(dir, "links"), 0o755), "mkdir links")
	pinMap(t, filepath.Join(dir, "fw_rules"), "fw_rules")
	pinMap(t, filepath.Join(dir, "sp_ct"), "fw_conntrack")
	pinMap(t, filepath.Join(dir, "links", "fw_link"), "fw_link")
	pinProgram(t, filepath.Join(dir, "sp_filter"))
	pins := []string{"fw_rules", "sp_ct", "sp_filter", "links/fw_link"}
	for _, cmd := range removeCommands {
		code, _, errOut := runCLIIn(t, topo.Node, cmd, "--bpffs", dir)
		assert.Equal(t, 1, code, "%s refuses a bpffs without servicepath's maps", cmd)
		assert.Contains(t, errOut, dir+" is not a servicepath pin directory: no servicepath map is pinned there", "%s names the directory and why", cmd)
		assert.Contains(t, errOut, "nothing removed", "%s says it removed nothing", cmd)
		for _, p := range pins {
			_, err := os.Lstat(filepath.Join(dir, p))
			assert.NoError(t, err, "%s left %s pinned", cmd, p)
		}
	}
}

// Next to servicepath's maps, other pins stay, and so does the directory
// with them, which unload says. An absent directory is nothing to
// remove, again and again.
func TestUnloadKeepsOtherPins(t *testing.T) {
	topo := topology.NewForTest(t, topology.Spec{Name: "unk"})
	dir := filepath.Join(testenv.BPFFS(t), "sp")
	require.NoError(t, os.Mkdir(dir, 0o755), "mkdir pin directory")
	pinMap(t, filepath.Join(dir, "sp_services"), "sp_services")
	pinMap(t, filepath.Join(dir, "sp_frontend_addrs"), "sp_frontend_addrs")
	pinMap(t, filepath.Join(dir, "fw_rules"), "fw_rules")

	code, out, errOut := runCLIIn(t, topo.Node, "unload", "--bpffs", dir)
	require.Zero(t, code, "unload: %s", errOut)
	assert.Contains(t, out, "unpinned map "+filepath.Join(dir, "sp_services"), "reports each map")
	assert.Contains(t, out, "unpinned map "+filepath.Join(dir, "sp_frontend_addrs"), "even one whose kernel name is cut short")
	assert.Contains(t, out, "kept "+dir+": it holds pins that are not servicepath's: fw_rules", "says why the directory stays")
	for p, want := range map[string]bool{"sp_services": false, "sp_frontend_addrs": false, "fw_rules": true} {
		_, err := os.Lstat(filepath.Join(dir, p))
		assert.Equal(t, want, err == nil, "%s pinned after unload", p)
	}

	require.NoError(t, os.Remove(filepath.Join(dir, "fw_rules")), "its owner unpins it")
	require.NoError(t, os.Remove(dir), "and removes the directory")
	for range 2 {
		code, out, errOut = runCLIIn(t, topo.Node, "unload", "--bpffs", dir)
		require.Zero(t, code, "unload of an absent directory: %s", errOut)
		assert.Contains(t, out, "nothing to remove under "+dir, "finds nothing")
	}
}

// A link that cannot be detached stops unload before it unpins a map:
// the error names it, and the maps stay so that unload can run again.
func TestUnloadReportsPartialFailure(t *testing.T) {
	topo := topology.NewForTest(t, topology.Spec{Name: "unx"})
	dir := testenv.BPFFS(t)
	require.NoError(t, os.Mkdir(filepath.Join(dir, "links"), 0o755), "mkdir links")
	pinMap(t, filepath.Join(dir, "sp_services"), "sp_services")
	pinMap(t, filepath.Join(dir, "links", "broken"), "broken")

	code, _, errOut := runCLIIn(t, topo.Node, "unload", "--bpffs", dir)
	assert.Equal(t, 1, code, "unload fails")
	assert.Contains(t, errOut, filepath.Join(dir, "links", "broken"), "naming the link it could not detach")
	assert.Contains(t, errOut, "maps left pinned in "+dir+", so that another run finds them and finishes", "and saying the maps stay")
	_, err := os.Lstat(filepath.Join(dir, "sp_services"))
	assert.NoError(t, err, "the map is still pinned")
}
