package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/traffic"
)

// The node apply is told about, end to end on the per-packet path: a
// client pod on node-a in zone-a reaches only the backends hinted for its
// zone, or with node hints its node's backend alone; an
// internalTrafficPolicy Local Service whose only endpoint is on node-c
// drops its connects, while one without endpoints anywhere refuses them,
// as kube-proxy. Applied without a node, the same manifest reaches every
// backend.
func TestApplyForNode(t *testing.T) {
	topo, devices := servedPods(t, "clitopo")
	ip := func(pod string) string { return topo.Pod(pod).IPv4.String() }
	manifest := filepath.Join(t.TempDir(), "topology.yaml")
	require.NoError(t, os.WriteFile(manifest, fmt.Appendf(nil, `apiVersion: v1
kind: Service
metadata: {name: zoned, namespace: default}
spec:
  clusterIP: 198.19.0.60
  trafficDistribution: PreferClose
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: zoned-1, namespace: default, labels: {kubernetes.io/service-name: zoned}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [%[1]s], nodeName: node-a, zone: zone-a, hints: {forZones: [{name: zone-a}]}}
- {addresses: [%[2]s], nodeName: node-b, zone: zone-a, hints: {forZones: [{name: zone-a}]}}
- {addresses: [%[3]s], nodeName: node-c, zone: zone-b, hints: {forZones: [{name: zone-b}]}}
---
apiVersion: v1
kind: Service
metadata: {name: local-only, namespace: default}
spec:
  clusterIP: 198.19.0.61
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-only-1, namespace: default, labels: {kubernetes.io/service-name: local-only}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [%[3]s], nodeName: node-c, zone: zone-b}
---
apiVersion: v1
kind: Service
metadata: {name: same-node, namespace: default}
spec:
  clusterIP: 198.19.0.63
  trafficDistribution: PreferSameNode
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: same-node-1, namespace: default, labels: {kubernetes.io/service-name: same-node}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [%[1]s], nodeName: node-a, zone: zone-a, hints: {forZones: [{name: zone-a}], forNodes: [{name: node-a}]}}
- {addresses: [%[2]s], nodeName: node-b, zone: zone-a, hints: {forZones: [{name: zone-a}], forNodes: [{name: node-b}]}}
- {addresses: [%[3]s], nodeName: node-c, zone: zone-b, hints: {forZones: [{name: zone-b}], forNodes: [{name: node-c}]}}
---
apiVersion: v1
kind: Service
metadata: {name: nowhere, namespace: default}
spec:
  clusterIP: 198.19.0.62
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80, targetPort: 8080}]
`, ip("backend-1"), ip("backend-2"), ip("backend-3")), 0o644), "write manifest")

	bpffs := filepath.Join(testenv.BPFFS(t), "sp")
	mustRun := func(args ...string) string {
		code, out, errOut := runCLIIn(t, topo.Node, args...)
		require.Zero(t, code, "servicepath %s: %s", strings.Join(args, " "), errOut)
		return out
	}
	mustRun("load", "--bpffs", bpffs, "--device", strings.Join(devices, ","))
	t.Cleanup(func() { runCLIIn(t, topo.Node, "unload", "--bpffs", bpffs) })
	client := topo.Pod("client")
	zoned, local := netip.MustParseAddrPort("198.19.0.60:80"), netip.MustParseAddrPort("198.19.0.61:80")
	sameNode := netip.MustParseAddrPort("198.19.0.63:80")
	spread := func(dst netip.AddrPort) traffic.Tally {
		t.Helper()
		tally, err := traffic.Run(40, func(i int) (traffic.Reply, error) {
			return traffic.TCPExchange(client, dst, fmt.Appendf(nil, "hello %d", i), 3*time.Second)
		})
		require.NoError(t, err, "TCP through %s (answered so far: %v)", dst, tally)
		return tally
	}
	drops := func() uint64 {
		var st statsJSON
		require.NoError(t, json.Unmarshal([]byte(mustRun("stats", "--bpffs", bpffs, "-o", "json")), &st), "stats json")
		return st.Counters["itp_local_drop"]
	}

	mustRun("apply", "--bpffs", bpffs, "-f", manifest)
	assert.Len(t, spread(zoned), 3, "no node given: every backend answers")
	assert.Len(t, spread(sameNode), 3, "no node given: node hints ignored")
	assert.Equal(t, traffic.Tally{"backend-3": 40}, spread(local), "no node given: internalTrafficPolicy acts as Cluster")

	out := mustRun("apply", "--bpffs", bpffs, "-f", manifest, "--node-name", "node-a", "--zone", "zone-a")
	assert.Contains(t, out, "default/local-only 198.19.0.61:80/TCP: 0 backends", "apply says the cluster IP has none: %s", out)
	tally := spread(zoned)
	assert.Zero(t, tally["backend-3"], "zone-b's backend never answers zone-a: %v", tally)
	assert.Positive(t, tally["backend-1"], "zone-a's backend on this node answers: %v", tally)
	assert.Positive(t, tally["backend-2"], "zone-a's backend on another node answers: %v", tally)

	assert.Equal(t, traffic.Tally{"backend-1": 40}, spread(sameNode), "node hints: only this node's backend answers")

	before := drops()
	_, err := traffic.TCPExchange(client, local, []byte("itp"), time.Second)
	var netErr net.Error
	assert.True(t, errors.As(err, &netErr) && netErr.Timeout(), "the connect times out, dropped rather than refused: %v", err)
	assert.Positive(t, drops()-before, "the SYNs were counted as itp_local_drop")
	_, err = traffic.TCPExchange(client, netip.MustParseAddrPort("198.19.0.62:80"), []byte("none"), time.Second)
	assert.ErrorIs(t, err, syscall.ECONNREFUSED, "without endpoints anywhere the connect is refused")
}
