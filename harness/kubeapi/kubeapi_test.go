package kubeapi

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The cache folder is keyed by the versions tools/kube builds.
func TestVersionsMatchToolsModule(t *testing.T) {
	data, err := os.ReadFile("../../tools/kube/go.mod")
	require.NoError(t, err, "read tools/kube/go.mod")
	versions := map[string]string{}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 {
			versions[f[0]] = f[1]
		}
	}
	assert.Equal(t, KubernetesVersion, versions["k8s.io/kubernetes"], "kube-apiserver version")
	assert.Equal(t, EtcdVersion, versions["go.etcd.io/etcd/server/v3"], "etcd version")
}

func TestAssetsMissing(t *testing.T) {
	t.Setenv(AssetsEnv, t.TempDir())
	_, _, err := Assets()
	assert.True(t, errors.Is(err, ErrNoAssets), "an empty assets folder is reported as missing: %v", err)
	assert.Contains(t, err.Error(), "make deps", "the error says how to get the binaries")
}

func TestStartRestartStop(t *testing.T) {
	if _, _, err := Assets(); err != nil {
		t.Skipf("needs a real API server: %v", err)
	}
	srv, err := Start(Options{Dir: t.TempDir()})
	require.NoError(t, err, "start etcd and kube-apiserver")
	t.Cleanup(func() { srv.Stop() })
	c, err := srv.Client()
	require.NoError(t, err, "client")
	v, err := c.Discovery().ServerVersion()
	require.NoError(t, err, "server version")
	assert.Equal(t, KubernetesVersion, v.GitVersion, "the version tools/kube stamped")

	ctx := context.Background()
	_, err = c.CoreV1().ConfigMaps("default").Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "kept"}}, metav1.CreateOptions{})
	require.NoError(t, err, "create a ConfigMap")
	require.NoError(t, srv.StopAPIServer(), "stop kube-apiserver")
	require.NoError(t, srv.StartAPIServer(), "start kube-apiserver again")
	_, err = c.CoreV1().ConfigMaps("default").Get(ctx, "kept", metav1.GetOptions{})
	assert.NoError(t, err, "state kept in etcd across the API server restart")
	require.NoError(t, srv.Stop(), "stop both")
}
