package agent

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/bandwidth"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
)

func TestPodEgressBandwidth(t *testing.T) {
	pod := func(ann map[string]string) *corev1.Pod {
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "p", Annotations: ann}}
	}
	for _, tc := range []struct {
		value string
		want  uint64
		bad   bool
	}{
		{"10M", 10_000_000, false},
		{"1G", 1_000_000_000, false},
		{"500k", 500_000, false},
		{"1Mi", 1 << 20, false},
		{"abc", 0, true},
		{"-1M", 0, true},
		{"0", 0, true},
		{"10", 0, true},
		{"2P", 0, true},
	} {
		got, err := podEgressBandwidth(pod(map[string]string{EgressBandwidthAnnotation: tc.value}))
		if tc.bad {
			require.Error(t, err, "value %q is rejected", tc.value)
			require.Contains(t, err.Error(), "ns/p", "error names the pod")
			require.Contains(t, err.Error(), EgressBandwidthAnnotation, "error names the annotation")
			continue
		}
		require.NoError(t, err, "value %q parses", tc.value)
		require.Equal(t, tc.want, got, "rate of %q in bit/s", tc.value)
	}
	got, err := podEgressBandwidth(pod(nil))
	require.NoError(t, err, "unannotated pod")
	require.Zero(t, got, "unannotated pod has no rate")
}

// The agent holds sp_edt_pods and sp_edt_rates to the Pods' annotations:
// a rated pod's device gets an aggregate and its rate, a new rate keeps the
// aggregate, and an invalid or removed annotation, or the Pod's end, lifts
// the limit.
func TestPodBandwidth(t *testing.T) {
	testenv.RequireRoot(t)
	topo := topology.NewForTest(t, topology.Spec{Name: "podbw", Pods: []topology.PodSpec{{Name: "web"}}})
	node, web := topo.Node, topo.Pod("web")
	dp, pin := loadDatapath(t, loader.DefaultConfig())
	mgr, err := bandwidth.NewManager(dp.Maps)
	require.NoError(t, err)
	pattern, err := ParseDevicePattern("h[0-9]*")
	require.NoError(t, err, "pattern")
	c := newFakeKube()
	a := startAgent(t, c, dp.Maps, Config{NodeName: testNode, Pods: &PodNetwork{
		Devices: pattern, NodeDevices: []string{topology.WireIfName},
		Attacher: &attach.Attacher{LinkDir: filepath.Join(pin, "links"), Mode: attach.Auto},
		FromPod:  dp.FromPod, ToPod: dp.ToPod, Endpoints: dp.Endpoints, Do: node.Do, Bandwidth: mgr,
	}})
	c.waitWatching(t)
	a.waitHealthy(t)

	rated := func(value string) corev1.Pod {
		p := pod("web", testNode, corev1.PodRunning, web.IPv4.String(), web.IPv6.String())
		if value != "" {
			p.Annotations = map[string]string{EgressBandwidthAnnotation: value}
		}
		return p
	}
	// waitRate waits for web's device to be limited to bytesPerSec (0:
	// not at all) and returns its aggregate.
	waitRate := func(bytesPerSec uint64) uint32 {
		t.Helper()
		var agg uint32
		require.EventuallyWithT(t, func(ct *assert.CollectT) {
			var p maps.EDTPod
			err := dp.Maps.EDTPods.Lookup(uint32(web.HostIfIndex), &p)
			if bytesPerSec == 0 {
				assert.ErrorIs(ct, err, ebpf.ErrKeyNotExist, "web's device is not tagged")
				n := 0
				it := dp.Maps.EDTRates.Iterate()
				var k uint32
				var v maps.EDTRate
				for it.Next(&k, &v) {
					n++
				}
				assert.Zero(ct, n, "no rate is left")
				return
			}
			if !assert.NoError(ct, err, "web's device is tagged") {
				return
			}
			var r maps.EDTRate
			if assert.NoError(ct, dp.Maps.EDTRates.Lookup(p.Aggregate, &r), "its aggregate has a rate") {
				assert.Equal(ct, bytesPerSec, r.BytesPerSec, "rate in bytes/s")
			}
			agg = p.Aggregate
		}, 10*time.Second, 20*time.Millisecond)
		return agg
	}

	c.create(t, rated("10M"))
	agg := waitRate(10_000_000 / 8)
	assert.NotZero(t, agg&maps.EDTAggregateBit, "the aggregate carries EDT_AGGREGATE_BIT")
	c.update(t, rated("20M"))
	assert.Equal(t, agg, waitRate(20_000_000/8), "a new rate keeps the pod's aggregate")
	c.update(t, rated("fast"))
	waitRate(0)
	c.update(t, rated("5M"))
	waitRate(5_000_000 / 8)
	c.update(t, rated(""))
	waitRate(0)
	c.update(t, rated("5M"))
	waitRate(5_000_000 / 8)
	c.delete(t, "web")
	waitRate(0)
}
