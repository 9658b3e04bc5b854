package agent

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
	appsv1 "k8s.io/api/apps/v1"
	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
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
// Services, EndpointSlices, its Node and Pods and to record Events, and
// allow nothing else.
func TestDeployManifests(t *testing.T) {
	k := newKube(t)
	ctx := context.Background()
	strict := metav1.CreateOptions{FieldValidation: "Strict"}
	objs := readDeploy(t, "../deploy/config.yaml", "../deploy/rbac.yaml", "../deploy/daemonset.yaml")
	kinds := map[string]bool{}
	var config *corev1.ConfigMap
	for _, obj := range objs {
		var err error
		switch o := obj.(type) {
		case *corev1.ConfigMap:
			config = o
			_, err = k.client.CoreV1().ConfigMaps(o.Namespace).Create(ctx, o, strict)
			t.Cleanup(func() { k.client.CoreV1().ConfigMaps(o.Namespace).Delete(ctx, o.Name, metav1.DeleteOptions{}) })
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
			require.NotNil(t, config, "config.yaml, read first, holds the ConfigMap")
			checkDaemonSet(t, o, config)
			_, err = k.client.AppsV1().DaemonSets(o.Namespace).Create(ctx, o, strict)
			t.Cleanup(func() { k.client.AppsV1().DaemonSets(o.Namespace).Delete(ctx, o.Name, metav1.DeleteOptions{}) })
		default:
			t.Errorf("unexpected %T in deploy/", obj)
			continue
		}
		kinds[fmt.Sprintf("%T", obj)] = true
		require.NoError(t, err, "create %T from deploy/", obj)
	}
	assert.Len(t, kinds, 5, "deploy/ holds a ConfigMap, ServiceAccount, ClusterRole, ClusterRoleBinding and DaemonSet: %v", kinds)
	checkRBAC(t, k)

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
	a := startAgent(t, sa, dp.Maps, Config{NodeName: "rbac-node"})
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

// checkRBAC asks the API server what the ServiceAccount may do.
func checkRBAC(t *testing.T, k *kube) {
	t.Helper()
	sa := authorizationv1.SubjectAccessReviewSpec{User: "system:serviceaccount:kube-system:servicepath",
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"}}
	may := func(group, resource, verb string) bool {
		r := &authorizationv1.SubjectAccessReview{Spec: sa}
		r.Spec.ResourceAttributes = &authorizationv1.ResourceAttributes{Group: group, Resource: resource, Verb: verb}
		out, err := k.client.AuthorizationV1().SubjectAccessReviews().Create(context.Background(), r, metav1.CreateOptions{})
		require.NoError(t, err, "review %s %s", verb, resource)
		return out.Status.Allowed
	}
	for _, r := range []struct{ group, resource string }{{"", "services"}, {"", "nodes"}, {"", "pods"},
		{"discovery.k8s.io", "endpointslices"}} {
		for _, verb := range []string{"get", "list", "watch"} {
			assert.True(t, may(r.group, r.resource, verb), "the agent may %s %s", verb, r.resource)
		}
		for _, verb := range []string{"create", "update", "delete"} {
			assert.False(t, may(r.group, r.resource, verb), "the agent may not %s %s", verb, r.resource)
		}
	}
	for _, verb := range []string{"create", "patch"} {
		assert.True(t, may("", "events", verb), "the agent may %s Events", verb)
	}
	for _, r := range []string{"secrets", "configmaps", "serviceaccounts"} {
		assert.False(t, may("", r, "list"), "the agent may not list %s", r)
	}
}

// checkDaemonSet holds the DaemonSet to what the agent needs and no more.
func checkDaemonSet(t *testing.T, ds *appsv1.DaemonSet, config *corev1.ConfigMap) {
	spec := ds.Spec.Template.Spec
	assert.True(t, spec.HostNetwork, "the agent runs in the node's network namespace")
	assert.Equal(t, "servicepath", spec.ServiceAccountName, "the DaemonSet runs as the bound ServiceAccount")
	require.Len(t, spec.Containers, 1, "one container")
	c := spec.Containers[0]
	assert.Equal(t, "localhost/servicepath/servicepath:v0.0.0-dev", c.Image, "the image `make image` builds")
	assert.Equal(t, corev1.PullNever, c.ImagePullPolicy, "the image is imported, never pulled")
	var apiServer *corev1.EnvVar
	for i := range c.Env {
		if c.Env[i].Name == "SERVICEPATH_K8S_API_SERVER" {
			apiServer = &c.Env[i]
		}
	}
	if assert.NotNil(t, apiServer, "the API server's address is passed") &&
		assert.NotNil(t, apiServer.ValueFrom, "from the ConfigMap") && assert.NotNil(t, apiServer.ValueFrom.ConfigMapKeyRef, "from the ConfigMap") {
		ref := apiServer.ValueFrom.ConfigMapKeyRef
		assert.Equal(t, config.Name, ref.Name, "the ConfigMap in config.yaml")
		assert.Contains(t, config.Data, ref.Key, "the ConfigMap has the key")
		assert.False(t, ref.Optional != nil && *ref.Optional, "the address is required")
	}
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
	assert.Equal(t, map[string]string{"bpffs": "/sys/fs/bpf", "cgroup2": "/sys/fs/cgroup", "xtables-lock": "/run/xtables.lock"},
		mounts, "host mounts: bpffs, cgroup2 and iptables' lock only")
}

// Per-element overheads of the kernel's hash maps (kernel/bpf/hashtab.c,
// x86-64): struct htab_elem before the key, with the LRU node in it for
// LRU maps; a bucket is a list head and a lock.
const (
	htabElem    = 48
	htabLRUElem = 56
	htabBucket  = 16
)

func roundUp8(n uint32) uint64 { return (uint64(n) + 7) &^ 7 }

// preallocatedBytes is what creating a map allocates before any entry is
// written, for the maps the kernel preallocates: arrays, and hashes
// without BPF_F_NO_PREALLOC (LRU hashes always). Others grow with use
// (LPM tries, socket storage, and servicepath's NO_PREALLOC hashes).
func preallocatedBytes(typ ebpf.MapType, flags, keySize, valueSize, maxEntries uint32, cpus int) uint64 {
	entries := uint64(maxEntries)
	buckets := uint64(1)
	for buckets < entries {
		buckets <<= 1
	}
	switch {
	case typ == ebpf.Array:
		return entries * roundUp8(valueSize)
	case typ == ebpf.PerCPUArray:
		return entries * roundUp8(valueSize) * uint64(cpus)
	case typ == ebpf.LRUHash:
		return entries*(htabLRUElem+roundUp8(keySize)+roundUp8(valueSize)) + buckets*htabBucket
	case typ == ebpf.LRUCPUHash:
		return entries*(htabLRUElem+roundUp8(keySize)+8+roundUp8(valueSize)*uint64(cpus)) + buckets*htabBucket
	case flags&unix.BPF_F_NO_PREALLOC != 0:
		return 0
	case typ == ebpf.Hash:
		// Preallocated hashes keep one spare element per CPU.
		return (entries+uint64(cpus))*(htabElem+roundUp8(keySize)+roundUp8(valueSize)) + buckets*htabBucket
	case typ == ebpf.PerCPUHash:
		return (entries+uint64(cpus))*(htabElem+roundUp8(keySize)+8+roundUp8(valueSize)*uint64(cpus)) + buckets*htabBucket
	}
	return 0
}

// TestMemoryRequestCoversMaps loads the datapath with the settings the
// DaemonSet runs with (the defaults) and adds up what its maps preallocate,
// from their specs as the loader sized them (read back from the pins) and
// the objects' own unpinned maps. The pod's memory cgroup is charged for
// them, so its request must cover them and the agent itself, and should
// follow them when they change.
func TestMemoryRequestCoversMaps(t *testing.T) {
	_, pin := loadDatapath(t, loader.DefaultConfig())
	cpus, err := ebpf.PossibleCPU()
	require.NoError(t, err, "possible CPUs")
	specs := map[string]*ebpf.MapSpec{}
	for obj, load := range map[string]func() (*ebpf.CollectionSpec, error){
		"lxc": loader.LoadLxc, "sock": loader.LoadSock, "host": loader.LoadHost} {
		cs, err := load()
		require.NoError(t, err, "%s object's spec", obj)
		for name, m := range cs.Maps {
			if m.Pinning == ebpf.PinNone {
				specs[obj+"/"+name] = m
			}
		}
	}
	pins, err := os.ReadDir(pin)
	require.NoError(t, err, "read pins")
	for _, e := range pins {
		m, err := ebpf.LoadPinnedMap(filepath.Join(pin, e.Name()), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			continue // not a map
		}
		info, err := m.Info()
		m.Close()
		require.NoError(t, err, "info of %s", e.Name())
		specs[e.Name()] = &ebpf.MapSpec{Type: info.Type, Flags: info.Flags,
			KeySize: info.KeySize, ValueSize: info.ValueSize, MaxEntries: info.MaxEntries}
	}
	require.Contains(t, specs, "sp_ct", "the pinned maps were read")
	var maps uint64
	for name, m := range specs {
		b := preallocatedBytes(m.Type, m.Flags, m.KeySize, m.ValueSize, m.MaxEntries, cpus)
		if b > 1<<20 {
			t.Logf("%-16s %-8v %7d x (%d+%d) bytes: %5.1f MiB", name, m.Type, m.MaxEntries, m.KeySize, m.ValueSize, float64(b)/(1<<20))
		}
		maps += b
	}
	// The Go process: informer caches, HTTP servers, the runtime.
	const agent = 64 << 20
	need := maps + maps/10 + agent
	var ds *appsv1.DaemonSet
	for _, o := range readDeploy(t, "../deploy/daemonset.yaml") {
		if d, ok := o.(*appsv1.DaemonSet); ok {
			ds = d
		}
	}
	require.NotNil(t, ds, "the DaemonSet")
	for _, arg := range ds.Spec.Template.Spec.Containers[0].Args {
		assert.NotRegexp(t, `^--?[a-z-]*size=`, arg, "the DaemonSet runs with the default map sizes this test loads")
	}
	req := ds.Spec.Template.Spec.Containers[0].Resources.Requests.Memory()
	t.Logf("maps preallocate %.1f MiB on %d possible CPUs; with 10%% and %d MiB for the agent: %.1f MiB; requested %s",
		float64(maps)/(1<<20), cpus, agent>>20, float64(need)/(1<<20), req)
	assert.GreaterOrEqual(t, req.Value(), int64(need), "the memory request covers the preallocated maps with headroom")
	assert.LessOrEqual(t, req.Value(), int64(2*need), "the memory request follows the maps: not more than twice what they need")
}
