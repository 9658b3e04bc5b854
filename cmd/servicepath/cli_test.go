package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"sigs.k8s.io/yaml"

	"github.com/servicepath/servicepath/datapath/ct"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
	"github.com/servicepath/servicepath/harness/traffic"
)

const demoManifest = "../../deploy/examples/demo.yaml"

func runCLI(args ...string) (code int, stdout, stderr string) {
	var out, errOut bytes.Buffer
	code = run(args, &out, &errOut)
	return code, out.String(), errOut.String()
}

// runCLIIn runs the CLI in the node's netns.
func runCLIIn(t *testing.T, node *topology.Node, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	require.NoError(t, node.Do(func() error {
		code, stdout, stderr = runCLI(args...)
		return nil
	}), "run in node netns")
	return code, stdout, stderr
}

func TestUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"unknown flag", []string{"load", "--no-such-flag"}, 2, "unknown flag: --no-such-flag"},
		{"apply without -f", []string{"apply"}, 2, "-f is required"},
		{"bad output format", []string{"services", "-o", "xml"}, 2, `-o "xml": want table, json or yaml`},
		{"unknown command", []string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{"agent verbosity not a level", []string{"agent", "--v=debug"}, 2, `invalid argument "debug" for "-v, --v" flag`},
		{"bad attach mode", []string{"load", "--attach-mode", "xdp"}, 1, `attach mode "xdp"`},
		{"bad no-backend", []string{"load", "--no-backend", "ignore"}, 1, `no-backend action "ignore"`},
		{"bad sock-state", []string{"load", "--sock-state", "lru"}, 1, `socket state "lru"`},
		{"bad node-device-xdp", []string{"load", "--node-device-xdp", "driver"}, 1, `XDP mode "driver"`},
		{"zero map size", []string{"load", "--ct-size", "0"}, 2, "positive 32-bit integer"},
		{"Maglev table size not a prime", []string{"load", "--maglev-table-size", "16384"}, 1, "Maglev table size 16384: want a prime"},
		{"stray argument", []string{"gc", "extra"}, 2, `unexpected argument "extra"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errOut := runCLI(tc.args...)
			assert.Equal(t, tc.code, code, "exit code")
			assert.Contains(t, out+errOut, tc.msg, "message names what is wrong")
		})
	}
	code, out, _ := runCLI("help")
	assert.Zero(t, code, "help exits 0")
	assert.Contains(t, out, "apply", "help lists commands")
}

// A bad manifest is refused before any map is opened: the message names
// the object and field, and nothing is applied.
func TestApplyBadManifestNamesObjectAndField(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	require.NoError(t, os.WriteFile(bad, []byte(`apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 198.19.0.300
  ports: [{port: 80}]
`), 0o644), "write manifest")
	code, _, errOut := runCLI("apply", "--bpffs", filepath.Join(dir, "nowhere"), "-f", bad)
	assert.Equal(t, 1, code, "exit code")
	assert.Contains(t, errOut, bad+`: document 1: Service default/web: spec.clusterIPs[0]: Invalid value: "198.19.0.300"`,
		"names the document, the object and the field")
	assert.Contains(t, errOut, "nothing applied", "says nothing was applied")
	_, err := os.Stat(filepath.Join(dir, "nowhere"))
	assert.ErrorIs(t, err, os.ErrNotExist, "no state was created")
}

// The whole life cycle through the CLI, in a node netns: load, apply,
// traffic, inspect, reload keeping flows, delete, unload.
// servedPods is a node with a client pod and three backends serving their
// names on 8080, and the host side of every pod's device.
func servedPods(t *testing.T, name string) (*topology.Topology, []string) {
	t.Helper()
	testenv.RequireRoot(t)
	topo := topology.NewForTest(t, topology.Spec{Name: name, Pods: []topology.PodSpec{
		{Name: "client"}, {Name: "backend-1"}, {Name: "backend-2"}, {Name: "backend-3"},
	}})
	var devices []string
	for _, p := range topo.Pods {
		devices = append(devices, p.HostIf)
	}
	for _, p := range topo.Pods[1:] {
		srv, err := traffic.Serve(p, p.Name, 8080)
		require.NoError(t, err, "serve in %s", p.Name)
		t.Cleanup(func() { srv.Close() })
	}
	return topo, devices
}

func TestCLILifeCycle(t *testing.T) {
	topo, devices := servedPods(t, "cli")
	bpffs := filepath.Join(testenv.BPFFS(t), "sp")
	inNode := func(args ...string) (int, string, string) { return runCLIIn(t, topo.Node, args...) }
	mustRun := func(args ...string) string {
		code, out, errOut := inNode(args...)
		require.Zero(t, code, "servicepath %s: %s", strings.Join(args, " "), errOut)
		return out
	}

	cg := testenv.ChildCgroup(t)
	out := mustRun("load", "--bpffs", bpffs, "--device", strings.Join(devices, ","), "--cgroup", cg)
	assert.Equal(t, 2*len(devices), strings.Count(out, "attached from-pod")+strings.Count(out, "attached to-pod"),
		"both hooks of every device attached: %s", out)
	assert.Contains(t, out, "attached 10 socket hooks to cgroup "+cg, "socket hooks attached")
	mustRun("apply", "--bpffs", bpffs, "-f", demoManifest)

	var svcs []serviceJSON
	require.NoError(t, json.Unmarshal([]byte(mustRun("services", "--bpffs", bpffs, "-o", "json")), &svcs), "services json")
	require.Len(t, svcs, 4, "two families x two ports")
	for _, s := range svcs {
		assert.Len(t, s.Backends, 3, "%s has three backends", s.Frontend)
	}

	var yamlSvcs []serviceJSON
	require.NoError(t, yaml.Unmarshal([]byte(mustRun("services", "--bpffs", bpffs, "-o", "yaml")), &yamlSvcs), "services yaml")
	assert.Equal(t, svcs, yamlSvcs, "YAML says what JSON says")
	var st0 statusJSON
	require.NoError(t, json.Unmarshal([]byte(mustRun("status", "--bpffs", bpffs, "-o", "json")), &st0), "status json")
	assert.Equal(t, 1, st0.Services, "one Service")
	assert.Equal(t, 4, st0.Frontends, "its four frontends")
	assert.Equal(t, map[string]int{"active": 12}, st0.Backends, "three pods x two families x two ports, each counted once")
	assert.Len(t, st0.Links, 2*len(devices)+10, "device and socket hooks pinned")
	assert.Contains(t, mustRun("status", "--bpffs", bpffs), fmt.Sprintf("attached:   %d device hooks on %d devices, 10 socket hooks", 2*len(devices), len(devices)),
		"the table says the same")

	vip := netip.MustParseAddrPort("198.19.0.10:80")
	client := topo.Pod("client")
	r, err := traffic.TCPExchange(client, vip, []byte("hello"), 3*time.Second)
	require.NoError(t, err, "TCP through the VIP")
	assert.Contains(t, []string{"backend-1", "backend-2", "backend-3"}, r.Identity, "a backend answered")

	var entries []ct.Entry
	require.NoError(t, json.Unmarshal([]byte(mustRun("ct", "--bpffs", bpffs, "-o", "json")), &entries), "ct json")
	assert.Len(t, entries, 2, "one flow: service and flow entries")
	for _, e := range entries {
		assert.Equal(t, ct.ZoneEastWest, e.Zone, "a pod's flow is east-west")
	}

	var st statsJSON
	require.NoError(t, json.Unmarshal([]byte(mustRun("stats", "--bpffs", bpffs, "-o", "json")), &st), "stats json")
	assert.Equal(t, uint64(1), st.Counters["lb_new"], "one new flow counted")
	assert.Equal(t, 16, st.Maps["sp_services"].Entries, "4 masters + 12 slots")
	assert.Equal(t, mapStats{Entries: 0, MaxEntries: 128 * 1024}, st.Maps["sp_ct_ns"], "the north-south zone is listed, empty")
	assert.Equal(t, 2, st.Conntrack[ct.ZoneEastWest].Entries, "east-west pressure sees the flow")
	assert.Equal(t, "sp_ct_ns", st.Conntrack[ct.ZoneNorthSouth].Map, "a pressure block per zone")

	// A restarted load keeps the maps and so the tracked flows.
	mustRun("load", "--bpffs", bpffs, "--device", strings.Join(devices, ","))
	require.NoError(t, json.Unmarshal([]byte(mustRun("ct", "--bpffs", bpffs, "-o", "json")), &entries), "ct json")
	assert.Len(t, entries, 2, "flows survive a reload")
	gc := mustRun("gc", "--bpffs", bpffs)
	assert.Contains(t, gc, "gc ew: scanned 2, deleted 0", "nothing expired yet")
	assert.Contains(t, gc, "gc ns: scanned 0", "each zone collected")

	// Re-applying is idempotent; deleting removes every frontend.
	mustRun("apply", "--bpffs", bpffs, "-f", demoManifest)
	assert.Contains(t, mustRun("delete", "--bpffs", bpffs, "-f", demoManifest), "deleted default/demo", "delete reports")
	require.NoError(t, json.Unmarshal([]byte(mustRun("services", "--bpffs", bpffs, "-o", "json")), &svcs), "services json")
	assert.Empty(t, svcs, "no frontends after delete")

	mustRun("unload", "--bpffs", bpffs)
	_, err = os.Stat(filepath.Join(bpffs, "links"))
	assert.ErrorIs(t, err, os.ErrNotExist, "no pinned links left after unload")
	code, _, errOut := inNode("services", "--bpffs", bpffs)
	assert.Equal(t, 1, code, "services after unload fails")
	assert.Contains(t, errOut, "servicepath load", "and says to load first")
	_, err = traffic.TCPExchange(client, netip.AddrPortFrom(topo.Pod("backend-1").IPv4, 8080), []byte("direct"), 3*time.Second)
	assert.NoError(t, err, "pod traffic still flows after unload")
}

// A NodePort Service with ClientIP affinity, from a manifest to the maps.
func TestApplyNodePortWithAffinity(t *testing.T) {
	testenv.RequireRoot(t)
	topo := topology.NewForTest(t, topology.Spec{Name: "cliaff"})
	bpffs := filepath.Join(testenv.BPFFS(t), "sp")
	manifest := filepath.Join(t.TempDir(), "np.yaml")
	require.NoError(t, os.WriteFile(manifest, []byte(`apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 198.19.0.50
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  externalIPs: [203.0.113.50]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30050}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [198.18.0.11]}]
`), 0o644), "write manifest")

	code, _, errOut := runCLIIn(t, topo.Node, "load", "--bpffs", bpffs)
	require.Zero(t, code, "load: %s", errOut)
	code, _, errOut = runCLIIn(t, topo.Node, "apply", "--bpffs", bpffs, "-f", manifest)
	require.Zero(t, code, "apply: %s", errOut)
	code, out, errOut := runCLIIn(t, topo.Node, "services", "--bpffs", bpffs, "-o", "json")
	require.Zero(t, code, "services: %s", errOut)
	var svcs []serviceJSON
	require.NoError(t, json.Unmarshal([]byte(out), &svcs), "services json")
	got := map[string]string{}
	for _, s := range svcs {
		got[s.Kind] = s.Frontend
		assert.Equal(t, 600, s.AffinitySeconds, "%s carries the affinity timeout", s.Frontend)
		assert.Len(t, s.Backends, 1, "%s has the endpoint", s.Frontend)
	}
	assert.Equal(t, map[string]string{
		"ClusterIP":  "198.19.0.50:80",
		"NodePort":   "0.0.0.0:30050",
		"ExternalIP": "203.0.113.50:80",
	}, got, "one frontend of each kind")
	code, _, errOut = runCLIIn(t, topo.Node, "unload", "--bpffs", bpffs)
	require.Zero(t, code, "unload: %s", errOut)
}

// Zones off: one shared map, shown and collected as one zone; turning
// zones on over it is refused until an unload.
func TestCLIZonesOff(t *testing.T) {
	testenv.RequireRoot(t)
	topo := topology.NewForTest(t, topology.Spec{Name: "clizones"})
	bpffs := filepath.Join(testenv.BPFFS(t), "sp")
	mustRun := func(args ...string) string {
		code, out, errOut := runCLIIn(t, topo.Node, args...)
		require.Zero(t, code, "servicepath %s: %s", strings.Join(args, " "), errOut)
		return out
	}
	mustRun("load", "--bpffs", bpffs, "--ct-ns-size", "0")
	var st statsJSON
	require.NoError(t, json.Unmarshal([]byte(mustRun("stats", "--bpffs", bpffs, "-o", "json")), &st), "stats json")
	assert.Equal(t, []string{ct.ZoneShared}, slices.Collect(maps.Keys(st.Conntrack)), "one shared zone")
	assert.NotContains(t, st.Maps, "sp_ct_ns", "no north-south zone")
	assert.Contains(t, mustRun("gc", "--bpffs", bpffs), "gc shared: scanned 0", "the shared map is collected")
	assert.Contains(t, mustRun("ct", "--bpffs", bpffs), "ZONE", "ct has a zone column")

	code, _, errOut := runCLIIn(t, topo.Node, "load", "--bpffs", bpffs)
	assert.Equal(t, 1, code, "turning zones on over pinned maps fails")
	assert.Contains(t, errOut, "unload", "and says to unload first")
	mustRun("unload", "--bpffs", bpffs)
	mustRun("load", "--bpffs", bpffs)
	mustRun("unload", "--bpffs", bpffs)
}

// runAs runs the CLI as uid:gid in a child process: a copy of the test
// binary (TestMain's asCLI), where that user can execute it.
func runAs(t *testing.T, uid, gid uint32, args ...string) (code int, output string) {
	t.Helper()
	self, err := os.Executable()
	require.NoError(t, err, "test binary")
	dir := t.TempDir()
	for d := dir; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		require.NoError(t, os.Chmod(d, 0o755), "open %s to uid %d", d, uid)
	}
	bin := filepath.Join(dir, "servicepath")
	data, err := os.ReadFile(self)
	require.NoError(t, err, "read test binary")
	require.NoError(t, os.WriteFile(bin, data, 0o755), "copy test binary")
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), asCLI+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		return exit.ExitCode(), string(out)
	}
	require.NoError(t, err, "run %v as %d", args, uid)
	return 0, string(out)
}

// Without privileges load says what it needs; with a --cgroup that is no
// cgroup2 directory it fails before anything is mounted or pinned.
func TestLoadRefusals(t *testing.T) {
	testenv.RequireRoot(t)
	topo := topology.NewForTest(t, topology.Spec{Name: "cliref"})
	bpffs := filepath.Join(testenv.BPFFS(t), "sp")
	notCgroup := t.TempDir()
	for _, tc := range []struct {
		name, cgroup, msg string
	}{
		{"missing", filepath.Join(notCgroup, "nowhere"), "--cgroup: cgroup " + filepath.Join(notCgroup, "nowhere") + ": stat "},
		{"not cgroup2", notCgroup, "--cgroup: " + notCgroup + " is not a cgroup2 directory"},
		{"a file", filepath.Join(testenv.ChildCgroup(t), "cgroup.procs"), "cgroup.procs is not a cgroup2 directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errOut := runCLIIn(t, topo.Node, "load", "--bpffs", bpffs, "--cgroup", tc.cgroup)
			assert.Equal(t, 1, code, "exit code")
			assert.Contains(t, errOut, tc.msg, "names the flag and what is wrong")
			entries, err := os.ReadDir(bpffs)
			if !errors.Is(err, os.ErrNotExist) {
				require.NoError(t, err, "read %s", bpffs)
				assert.Empty(t, entries, "nothing pinned")
			}
		})
	}

	const nobody = 65534
	code, out := runAs(t, nobody, nobody, "load", "--bpffs", filepath.Join(t.TempDir(), "sp"))
	assert.Equal(t, 1, code, "load as nobody fails")
	assert.Contains(t, out, "needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON", "and says what it needs: %s", out)
}

func TestVersionAndCompletion(t *testing.T) {
	code, out, errOut := runCLI("version")
	require.Zero(t, code, "version: %s", errOut)
	assert.Regexp(t, `^servicepath \S+.*, go1\.\d+.* linux/`, out, "version, commit and toolchain")
	code, out, _ = runCLI("version", "-o", "yaml")
	require.Zero(t, code, "version -o yaml")
	assert.Contains(t, out, "goVersion: go1.", "YAML with the JSON field names")
	code, out, _ = runCLI("completion", "bash")
	require.Zero(t, code, "completion bash")
	assert.Contains(t, out, "__start_servicepath", "a bash completion script")
}
