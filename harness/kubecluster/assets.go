package kubecluster

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/servicepath/servicepath/harness/kubeapi"
)

// AssetsEnv names a folder holding the cluster binaries, overriding the
// cache folder tools/kube/build.sh fills.
const AssetsEnv = "SERVICEPATH_CLUSTER_ASSETS"

// ErrNoAssets says the cluster binaries (or kube-apiserver and etcd) were
// never built.
var ErrNoAssets = errors.New("cluster binaries not built")

// Binaries built by `tools/kube/build.sh cluster`, at kubeapi.KubernetesVersion.
var binaries = []string{"kubelet", "kube-controller-manager", "kube-scheduler", "kube-proxy", "kubectl", "agnhost", "e2e.test"}

// Host tools the nodes run, from Debian packages (`make cluster-deps`).
var hostTools = []string{"containerd", "containerd-shim-runc-v2", "runc", "ctr", "nsenter", "unshare", "mount"}

// CNI plugins the nodes chain, from containernetworking-plugins.
const cniBinDir = "/usr/lib/cni"

var cniPlugins = []string{"ptp", "host-local", "loopback", "portmap"}

// AssetsDir is where the cluster binaries are.
func AssetsDir() string {
	if d := os.Getenv(AssetsEnv); d != "" {
		return d
	}
	return filepath.Join(kubeapi.CacheDir(), "cluster-"+kubeapi.KubernetesVersion)
}

// Bin is the path of one cluster binary.
func Bin(name string) string { return filepath.Join(AssetsDir(), name) }

// CheckAssets says what is missing to run a cluster, wrapping ErrNoAssets.
func CheckAssets() error {
	if _, _, err := kubeapi.Assets(); err != nil {
		return fmt.Errorf("%w: %w", ErrNoAssets, err)
	}
	var missing []string
	for _, b := range binaries {
		if _, err := os.Stat(Bin(b)); err != nil {
			missing = append(missing, Bin(b))
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w: %v missing (run `make cluster-deps`, or set %s)", ErrNoAssets, missing, AssetsEnv)
	}
	for _, t := range hostTools {
		if _, err := lookPath(t); err != nil {
			return fmt.Errorf("%w: %s not installed (run `make cluster-deps`)", ErrNoAssets, t)
		}
	}
	for _, p := range cniPlugins {
		if _, err := os.Stat(filepath.Join(cniBinDir, p)); err != nil {
			return fmt.Errorf("%w: CNI plugin %s missing from %s (run `make cluster-deps`)", ErrNoAssets, p, cniBinDir)
		}
	}
	return nil
}
