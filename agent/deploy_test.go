package agent

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"

	"github.com/servicepath/servicepath/datapath/loader"
)

// readDeploy decodes the files in deploy/ strictly: an unknown or
// misspelt field fails here, not on a cluster.
func readDeploy(t *testing.T, files ...string) []runtime.Object {
	t.Helper()
	decoder := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()
	var objs []runtime.Object
	for _, f := range files {
		data, err := os.ReadFile(f)
		require.NoError(t, err, "read %s", f)
		r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
		for i := 1; ; i++ {
			doc, err := r.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			require.NoError(t, err, "%s: document %d", f, i)
			obj, _, err := decoder.Decode(doc, nil, nil)
			require.NoError(t, err, "%s: document %d decodes strictly", f, i)
			objs = append(objs, obj)
		}
	}
	return objs
}

// TestDeployManifests creates deploy/'s objects on the API server (which
// runs with RBAC) with strict field validation, then runs the agent with
// the ServiceAccount's token: the ClusterRole must be enough to watch
// Services and EndpointSlices and to record Events.
func TestDeployManifests(t *testing.T) {
	k := newKube(t)
	ctx := context.Background()
	strict := metav1.CreateOptions{FieldValidation: "Strict"}
	objs := readDeploy(t, "../deploy/rbac.yaml", "../deploy/daemonset.yaml")
	kinds := map[string]bool{}
	for _, obj := range objs {
		var err error
		switch o := obj.(type) {
		case *corev1.ServiceAccount:
			_, err = k.client.CoreV1().ServiceAccounts(o.Namespace).Create(ctx, o, strict)
			t.Cleanup(func() { k.client.CoreV1().ServiceAccounts(o.Namespace).Delete(ctx, o.Name, metav1.DeleteOptions{}) })
		case *rbacv1.ClusterRole:
			_, err = k.client.RbacV1().ClusterRoles().Create(ctx, o, strict)
			t.Cleanup(func() { k.client.RbacV1().ClusterRoles().Delete(ctx, o.Name, metav1.DeleteOptions{}) })
		case *rbacv1.ClusterRoleBinding:
			_, err = k.client.RbacV1().ClusterRoleBindings().Create(ctx, o, strict)
			t.Cleanup(func() { k.client.RbacV1().ClusterRoleBindings().Delete(ctx, o.Name, metav1.DeleteOptions{}) })
		case *appsv1.DaemonSet:
			checkDaemonSet(t, o)
			_, err = k.client.AppsV1().DaemonSets(o.Namespace).Create(ctx, o, strict)
			t.Cleanup(func() { k.client.AppsV1().DaemonSets(o.Namespace).Delete(ctx, o.Name, metav1.DeleteOptions{}) })
		default:
			t.Errorf("unexpected %T in deploy/", obj)
			continue
		}
		kinds[fmt.Sprintf("%T", obj)] = true
		require.NoError(t, err, "create %T from deploy/", obj)
	}
	assert.Len(t, kinds, 4, "deploy/ holds a ServiceAccount, ClusterRole, ClusterRoleBinding and DaemonSet: %v", kinds)

	tok, err := k.client.CoreV1().ServiceAccounts("kube-system").CreateToken(ctx, "servicepath",
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: ptr[int64](3600)}},
		metav1.CreateOptions{})
	require.NoError(t, err, "token for the servicepath ServiceAccount")
	saCfg := rest.CopyConfig(k.srv.Config)
	saCfg.BearerToken = tok.Status.Token
	sa, err := kubernetes.NewForConfig(saCfg)
	require.NoError(t, err, "client as the ServiceAccount")
	_, err = sa.CoreV1().Secrets("kube-system").List(ctx, metav1.ListOptions{})
	require.Error(t, err, "the ServiceAccount cannot read Secrets: RBAC is enforced")

	dp, _ := loadDatapath(t, loader.DefaultConfig())
	a := startAgent(t, sa, dp.Maps, Config{})
	ip, _ := clusterIPs()
	k.createService(t, clusterIPService("rbac", ip, "",
		svcPort("http", corev1.ProtocolTCP, 80), svcPort("sctp", corev1.ProtocolSCTP, 9999)))
	k.createSlice(t, endpointSlice("rbac-1", "rbac", v4, []discoveryv1.EndpointPort{slicePort("http", corev1.ProtocolTCP, 8080)},
		readyEP("10.9.0.1")))
	waitProgrammed(t, dp.Maps, k.name("rbac"), map[string][]string{ip + ":80/TCP": {"10.9.0.1:8080"}})
	a.waitHealthy(t)
	waitFor(t, "the ServiceAccount's Event on Service rbac", func() (bool, string) {
		evs, err := k.client.CoreV1().Events(k.ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=rbac"})
		if err != nil {
			return false, err.Error()
		}
		return len(evs.Items) > 0, fmt.Sprintf("%d events", len(evs.Items))
	})
}

// checkDaemonSet holds the DaemonSet to what the agent needs and no more.
func checkDaemonSet(t *testing.T, ds *appsv1.DaemonSet) {
	spec := ds.Spec.Template.Spec
	assert.True(t, spec.HostNetwork, "the agent runs in the node's network namespace")
	assert.Equal(t, "servicepath", spec.ServiceAccountName, "the DaemonSet runs as the bound ServiceAccount")
	require.Len(t, spec.Containers, 1, "one container")
	c := spec.Containers[0]
	require.NotNil(t, c.LivenessProbe, "a liveness probe")
	require.NotNil(t, c.ReadinessProbe, "a readiness probe")
	assert.Equal(t, "/livez", c.LivenessProbe.HTTPGet.Path, "liveness on /livez: a failing sync is no reason to restart")
	assert.Equal(t, "/readyz", c.ReadinessProbe.HTTPGet.Path, "readiness on /readyz")
	sc := c.SecurityContext
	require.NotNil(t, sc, "a security context")
	assert.False(t, sc.Privileged != nil && *sc.Privileged, "not privileged")
	assert.Equal(t, []corev1.Capability{"ALL"}, sc.Capabilities.Drop, "every capability dropped first")
	assert.NotContains(t, sc.Capabilities.Add, corev1.Capability("SYS_MODULE"), "no module loading")
	mounts := map[string]string{}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			mounts[v.Name] = v.HostPath.Path
		}
	}
	assert.Equal(t, map[string]string{"bpffs": "/sys/fs/bpf", "cgroup2": "/sys/fs/cgroup"}, mounts, "host mounts: bpffs and cgroup2 only")
}
