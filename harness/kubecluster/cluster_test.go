package kubecluster_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/servicepath/servicepath/harness/kubecluster"
	"github.com/servicepath/servicepath/tools/image"
)

// The cluster starts, schedules a pod on each node that answers HTTP from
// the control plane, and Stop leaves nothing on the machine.
func TestClusterStartsServesAndLeavesNothing(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network and mount namespaces, cgroups")
	}
	if err := kubecluster.CheckAssets(); errors.Is(err, kubecluster.ErrNoAssets) {
		t.Skipf("needs the cluster binaries: %v", err)
	}
	images, err := kubecluster.BuildImages(t.TempDir(), "../..")
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c, err := kubecluster.Start(ctx, kubecluster.Options{
		Name: "kct", Dir: t.TempDir(), Images: images, SandboxImage: image.PauseTag, Progress: testWriter{t},
	})
	require.NoError(t, err)
	state := c.State()
	t.Cleanup(func() { c.Stop() })

	// The last node's pod is on the host network: it answers from the
	// node's address with the node's own hostname.
	hostNetwork := func(i int) bool { return i == len(c.Nodes)-1 }
	for i, n := range c.Nodes {
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("web-%d", i)},
			Spec: corev1.PodSpec{
				NodeName:    n.Name,
				HostNetwork: hostNetwork(i),
				Containers: []corev1.Container{{
					Name: "web", Image: image.AgnhostTag, ImagePullPolicy: corev1.PullNever,
					Args: []string{"netexec", "--http-port=8080"},
					// Ready once it listens, not once it started.
					ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{
						HTTPGet: &corev1.HTTPGetAction{Path: "/hostname", Port: intstr.FromInt32(8080)},
					}, PeriodSeconds: 1},
				}},
			},
		}
		_, err := c.Client.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{})
		require.NoError(t, err)
	}
	for i, n := range c.Nodes {
		ip := waitPodIP(t, ctx, c, fmt.Sprintf("web-%d", i))
		want := fmt.Sprintf("web-%d", i)
		if hostNetwork(i) {
			require.Equal(t, n.IP, ip, "hostNetwork pod on %s has the node's address", n.Name)
			want = n.Name
		} else {
			require.True(t, n.PodCIDR.Contains(ip), "pod on %s got %s, outside its pod CIDR %s", n.Name, ip, n.PodCIDR)
		}
		var body []byte
		client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: c.Dial}}
		resp, err := client.Get("http://" + ip.String() + ":8080/hostname")
		require.NoError(t, err)
		body, err = io.ReadAll(resp.Body)
		resp.Body.Close()
		require.NoError(t, err)
		require.Equal(t, want, string(body), "hostname of the pod on %s", n.Name)
	}

	require.NoError(t, c.Stop())
	for _, ns := range state.Netns {
		require.NoFileExists(t, filepath.Join("/run/netns", ns))
	}
	for _, cg := range state.Cgroups {
		matches, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", cg))
		require.Empty(t, matches, "cgroups left behind")
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		ns, _ := os.Readlink(filepath.Join("/proc", e.Name(), "ns", "mnt"))
		require.NotContains(t, state.MountNS, ns, "process %s left in a node's mount namespace", e.Name())
	}
	// Sweeping what is already gone is fine.
	require.NoError(t, kubecluster.Sweep(state))
}

func waitPodIP(t *testing.T, ctx context.Context, c *kubecluster.Cluster, name string) netip.Addr {
	t.Helper()
	for {
		p, err := c.Client.CoreV1().Pods("default").Get(ctx, name, metav1.GetOptions{})
		require.NoError(t, err)
		if p.Status.Phase == corev1.PodRunning && p.Status.PodIP != "" {
			for _, cond := range p.Status.Conditions {
				if cond.Type == corev1.PodReady && cond.Status == corev1.ConditionTrue {
					return netip.MustParseAddr(p.Status.PodIP)
				}
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("pod %s not ready: %s %v", name, p.Status.Phase, p.Status.Conditions)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Logf("%s", b)
	return len(b), nil
}
