package kubecluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/servicepath/servicepath/datapath/mounts"
	"github.com/servicepath/servicepath/harness/procs"
)

// Node is one Kubernetes node: a netns of its own (from harness/topology)
// with its own mount namespace, containerd and kubelet.
type Node struct {
	// Name is the Kubernetes node name (also its netns name).
	Name string
	// IP is the node's InternalIP, on the wire.
	IP netip.Addr
	// PodCIDR is routed to the node's pods; host-local allocates from it.
	PodCIDR netip.Prefix
	// Cgroup is the kubelet's cgroupRoot, created in every hierarchy.
	Cgroup string

	dir        string
	holder     *procs.Proc
	containerd *procs.Proc
	kubelet    *procs.Proc
	kubeProxy  *procs.Proc
}

func (n *Node) path(elem ...string) string { return filepath.Join(append([]string{n.dir}, elem...)...) }

// Socket is the node's containerd socket, in the node's private /run/containerd
// (socket paths must be short): it exists only in the node's mount namespace.
func (n *Node) Socket() string { return "/run/containerd/containerd.sock" }

// kernel sysctls kubelet sets to its liking at start. They are not
// per-netns, so each node's mount namespace covers them with files of its
// own: kubelet writes there and the machine keeps its settings.
var shadowedSysctls = []string{"vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops"}

// Paths each node's containerd, CNI plugins and kubelet write to outside
// their own folders (pod netns bind mounts, shim sockets, the CNI result
// cache), covered with tmpfs in the node's mount namespace so that nodes
// never share them and nothing is left on the machine when it goes.
// The kubelet's root is one of them: its sockets' paths must be short.
var privateDirs = []string{"/run/netns", "/run/containerd", "/var/lib/cni", kubeletRoot}

const kubeletRoot = "/var/lib/kubelet"

// NodeCgroup2 is where, in each node's mount namespace, the node's own
// cgroup2 subtree (its pods' cgroups) is mounted.
const NodeCgroup2 = "/run/servicepath/node-cgroup2"

// startHolder starts the process that owns the node's mount namespace:
// a slave of the machine's, so the node sees the machine's filesystems but
// its own mounts (secrets, pod netns, the sysctl covers) never leak out.
// nsenter, unlike `ip netns exec`, leaves /sys as it is, and with it the
// cgroup hierarchies kubelet manages.
func (n *Node) startHolder(ctx context.Context) error {
	shadow := n.path("sysctl")
	if err := os.MkdirAll(shadow, 0o755); err != nil {
		return err
	}
	ready := n.path("mountns.ready")
	os.Remove(ready)
	var script strings.Builder
	script.WriteString("set -e\n")
	for _, d := range privateDirs {
		fmt.Fprintf(&script, "mkdir -p %s && mount -t tmpfs -o mode=0755 servicepath %s\n", d, d)
	}
	for _, key := range shadowedSysctls {
		cur, err := os.ReadFile(filepath.Join("/proc/sys", key))
		if err != nil {
			return err
		}
		file := filepath.Join(shadow, strings.ReplaceAll(key, "/", "."))
		if err := os.WriteFile(file, cur, 0o644); err != nil {
			return err
		}
		fmt.Fprintf(&script, "mount --bind %s /proc/sys/%s\n", file, key)
	}
	// A bpffs of the node's own, and the node's cgroup2 subtree where a
	// DaemonSet finds it (shared, for HostToContainer propagation):
	// servicepath pins there and attaches its socket
	// hooks there, never to the machine's cgroup2 root.
	v2, err := mounts.Cgroup2Root()
	if err != nil {
		return err
	}
	fmt.Fprintf(&script, "mount -t bpf bpffs /sys/fs/bpf && mount --make-shared /sys/fs/bpf\nmkdir -p %[1]s && mount --bind %[2]s %[1]s\n",
		NodeCgroup2, filepath.Join(v2, n.Cgroup))
	// Its own hostname too: a hostNetwork pod answers with the node's name,
	// which e2e checks (the machine's UTS namespace is never changed).
	fmt.Fprintf(&script, "hostname %s\n", n.Name)
	fmt.Fprintf(&script, "touch %s\nexec sleep infinity\n", ready)
	n.holder, err = procs.Start(n.Name+" mount namespace", n.path("mountns.log"),
		exec.Command("unshare", "--mount", "--uts", "--propagation", "slave", "sh", "-c", script.String()))
	if err != nil {
		return err
	}
	return waitFor(ctx, n.holder, "mount namespace", func() error {
		_, err := os.Stat(ready)
		return err
	})
}

// nodeCommand runs bin in the node's network, mount and UTS namespaces.
func (n *Node) nodeCommand(netnsPath, bin string, args ...string) *exec.Cmd {
	holder := "/proc/" + strconv.Itoa(n.holder.Pid()) + "/ns/"
	cmd := exec.Command("nsenter", append([]string{"--net=" + netnsPath,
		"--mount=" + holder + "mnt", "--uts=" + holder + "uts", "--", bin}, args...)...)
	cmd.Env = append(os.Environ(), "PATH="+toolPath)
	return cmd
}

// toolPath finds runc in /usr/sbin even when the caller's PATH lacks it.
const toolPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

func lookPath(name string) (string, error) {
	for _, dir := range filepath.SplitList(toolPath) {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return exec.LookPath(name)
}

// makeCgroups creates the kubelet's cgroupRoot in every cgroup v1
// hierarchy (kubelet refuses a root that does not exist) and in cgroup2:
// a child of the machine's root cgroup, never the root itself.
func (n *Node) makeCgroups() error {
	roots, err := cgroupRoots()
	if err != nil {
		return err
	}
	for _, root := range roots {
		parent := root
		for _, part := range strings.Split(strings.Trim(n.Cgroup, "/"), "/") {
			dir := filepath.Join(parent, part)
			if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
				return fmt.Errorf("cgroup %s: %w", dir, err)
			}
			// A v1 cpuset cgroup takes no tasks until it has CPUs and memory nodes.
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				if v, err := os.ReadFile(filepath.Join(parent, f)); err == nil {
					if err := os.WriteFile(filepath.Join(dir, f), v, 0); err != nil {
						return fmt.Errorf("cgroup %s: %w", dir, err)
					}
				}
			}
			parent = dir
		}
	}
	return nil
}

// cgroupRoots lists the mount points of every cgroup hierarchy.
func cgroupRoots() ([]string, error) {
	v1, err := mounts.MountPoints("cgroup")
	if err != nil {
		return nil, err
	}
	v2, err := mounts.MountPoints("cgroup2")
	if err != nil {
		return nil, err
	}
	return append(v1, v2...), nil
}

const containerdConfig = `version = 2
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = %[3]q
[plugins."io.containerd.internal.v1.opt"]
  path = %[4]q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[5]q
  disable_apparmor = true
  # Pods' oom_score_adj no lower than containerd's: lowering it takes
  # CAP_SYS_RESOURCE, which a sandboxed machine (such as CI's) may lack.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = %[6]q
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %[7]q
    conf_dir = %[8]q
`

// startContainerd writes the node's containerd config and starts it.
func (n *Node) startContainerd(ctx context.Context, netnsPath, sandboxImage string) error {
	dir := n.path("containerd")
	for _, d := range []string{dir, n.path("cni", "net.d")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	conf := fmt.Sprintf(containerdConfig, filepath.Join(dir, "root"), filepath.Join(dir, "state"), n.Socket(),
		filepath.Join(dir, "opt"), sandboxImage, filepath.Join(dir, "runc"), cniBinDir, n.path("cni", "net.d"))
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(conf), 0o644); err != nil {
		return err
	}
	var err error
	n.containerd, err = procs.Start(n.Name+" containerd", n.path("containerd.log"),
		n.nodeCommand(netnsPath, "containerd", "--config", filepath.Join(dir, "config.toml")))
	if err != nil {
		return err
	}
	return waitFor(ctx, n.containerd, "containerd", func() error {
		return n.ctr(netnsPath, "version").Run()
	})
}

// ctr runs containerd's client against the node's containerd, in the
// Kubernetes namespace.
func (n *Node) ctr(netnsPath string, args ...string) *exec.Cmd {
	return n.nodeCommand(netnsPath, "ctr", append([]string{"--address", n.Socket(), "--namespace", "k8s.io"}, args...)...)
}

// importImages loads docker-archive tarballs into the node's containerd:
// nothing can be pulled here.
func (n *Node) importImages(netnsPath string, tarballs []string) error {
	for _, t := range tarballs {
		if out, err := n.ctr(netnsPath, "images", "import", "--no-unpack=false", t).CombinedOutput(); err != nil {
			return fmt.Errorf("import %s into %s: %w: %s", t, n.Name, err, out)
		}
	}
	return nil
}

// writeCNIConfig gives the node a routed pod network: each pod a veth with
// a /32 route to it (ptp), addresses from the node's pod CIDR. portmap
// serves hostPort when kube-proxy is the service proxy, as in clusters that
// run it; servicepath serves hostPort itself.
func (n *Node) writeCNIConfig(portmap bool) error {
	plugins := []any{map[string]any{
		"type": "ptp",
		"mtu":  1500,
		"ipam": map[string]any{
			"type":    "host-local",
			"ranges":  [][]map[string]string{{{"subnet": n.PodCIDR.String()}}},
			"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
			"dataDir": n.path("cni", "ipam"),
		},
	}}
	if portmap {
		plugins = append(plugins, map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}})
	}
	b, err := json.MarshalIndent(map[string]any{"cniVersion": "1.0.0", "name": "servicepath", "plugins": plugins}, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(n.path("cni", "net.d", "10-servicepath.conflist"), b, 0o644)
}

const kubeletConfig = `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: %[1]s
failSwapOn: false
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
podLogsDir: %[2]s
resolvConf: %[3]s
clusterDomain: cluster.local
clusterDNS: [%[5]s]
# Images cannot be pulled again here: never collect them, never evict for disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%%", imagefs.available: "1%%", nodefs.inodesFree: "1%%"}
serializeImagePulls: false
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
containerRuntimeEndpoint: unix://%[4]s
`

// startKubelet writes the node's kubelet config and starts kubelet.
func (n *Node) startKubelet(netnsPath, kubeconfig string) error {
	resolv := n.path("resolv.conf")
	if err := os.WriteFile(resolv, []byte("# no DNS in this cluster\n"), 0o644); err != nil {
		return err
	}
	conf := fmt.Sprintf(kubeletConfig, n.Cgroup, n.path("pod-logs"), resolv, n.Socket(), DNSServiceIP)
	if err := os.WriteFile(n.path("kubelet.yaml"), []byte(conf), 0o644); err != nil {
		return err
	}
	var err error
	n.kubelet, err = procs.Start(n.Name+" kubelet", n.path("kubelet.log"),
		n.nodeCommand(netnsPath, Bin("kubelet"), "--config="+n.path("kubelet.yaml"), "--kubeconfig="+kubeconfig,
			"--root-dir="+kubeletRoot, "--node-ip="+n.IP.String(), "--hostname-override="+n.Name, "--v=2"))
	return err
}

// stop stops the node's processes, then kills what they leave behind (the
// containers, and the shims, which containerd detaches), and removes the
// node's cgroups.
func (n *Node) stop() error {
	var errs []error
	for _, p := range []*procs.Proc{n.kubeProxy, n.kubelet} {
		errs = append(errs, p.Stop(10*time.Second))
	}
	errs = append(errs, killCgroupTree(n.Cgroup), n.containerd.Stop(10*time.Second))
	if n.holder != nil {
		errs = append(errs, killMountNS(n.holder.Pid()))
	}
	errs = append(errs, n.holder.Stop(time.Second), removeCgroups(n.Cgroup))
	return errors.Join(errs...)
}

// killMountNS kills every process but pid in the mount namespace of pid:
// the shims containerd detached for the node's containers.
func killMountNS(pid int) error {
	ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", pid))
	if err != nil {
		return nil // already gone
	}
	if self, _ := os.Readlink("/proc/self/ns/mnt"); ns == self {
		return fmt.Errorf("process %d is in our own mount namespace; not killing its peers", pid)
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil || p == pid {
			continue
		}
		if got, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", p)); got == ns {
			syscall.Kill(p, syscall.SIGKILL)
		}
	}
	return nil
}

// killCgroupTree kills every process in the cgroup (all hierarchies) and
// its children: the node's containers.
func killCgroupTree(cgroup string) error {
	roots, err := cgroupRoots()
	if err != nil {
		return err
	}
	for _, root := range roots {
		filepath.WalkDir(filepath.Join(root, cgroup), func(path string, d os.DirEntry, err error) error {
			if err != nil || !d.IsDir() {
				return nil
			}
			b, _ := os.ReadFile(filepath.Join(path, "cgroup.procs"))
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil {
					syscall.Kill(pid, syscall.SIGKILL)
				}
			}
			return nil
		})
	}
	return nil
}

// removeCgroups removes the cgroup and its children, deepest first, in
// every hierarchy, waiting for killed tasks to leave them.
func removeCgroups(cgroup string) error {
	if cgroup == "" || strings.Trim(cgroup, "/") == "" {
		return nil
	}
	roots, err := cgroupRoots()
	if err != nil {
		return err
	}
	var errs []error
	for _, root := range roots {
		var dirs []string
		filepath.WalkDir(filepath.Join(root, cgroup), func(path string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, path)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			var err error
			for range 50 {
				if err = os.Remove(dirs[i]); err == nil || errors.Is(err, os.ErrNotExist) {
					err = nil
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", dirs[i], err))
			}
		}
	}
	return errors.Join(errs...)
}

// waitFor polls ok until it succeeds, p exits or ctx ends; a failure says
// what did not come up and shows the end of its log.
func waitFor(ctx context.Context, p *procs.Proc, what string, ok func() error) error {
	for {
		err := ok()
		if err == nil {
			return nil
		}
		if exited, how := p.Exited(); exited {
			return fmt.Errorf("%s exited (%s); last log lines:\n%s", p.Name, how, p.LogTail())
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not ready: %v; last log lines of %s:\n%s", what, err, p.Name, p.LogTail())
		case <-time.After(200 * time.Millisecond):
		}
	}
}
