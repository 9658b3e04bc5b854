// Package kubecluster runs a real Kubernetes cluster on one machine for
// servicepath's end-to-end and conformance runs: a control plane (etcd,
// kube-apiserver, kube-controller-manager, kube-scheduler) and nodes, each
// a network namespace with its own mount namespace, containerd, CNI and
// kubelet, joined by a wire (harness/topology). Binaries come from
// tools/kube/build.sh and Debian packages; images from docker-archive
// tarballs (tools/image), since nothing can be pulled. The machine's own
// netns, routes, firewall and cgroups are never touched: each node's
// kubelet gets cgroups of its own under a cgroup named after the cluster.
package kubecluster

import (
	"bytes"
	"cmp"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/servicepath/servicepath/datapath/nsexec"
	"github.com/servicepath/servicepath/harness/kubeapi"
	"github.com/servicepath/servicepath/harness/procs"
	"github.com/servicepath/servicepath/harness/topology"
)

// Proxy is what implements Services on the nodes.
type Proxy string

const (
	// NoProxy leaves Services untranslated: the caller deploys one (the
	// servicepath DaemonSet).
	NoProxy Proxy = "none"
	// KubeProxyIPTables and KubeProxyNFTables run kube-proxy on every node,
	// as a process, in that mode: the baselines.
	KubeProxyIPTables Proxy = "iptables"
	KubeProxyNFTables Proxy = "nftables"
)

// ParseProxy checks a -proxy value.
func ParseProxy(s string) (Proxy, error) {
	switch p := Proxy(s); p {
	case NoProxy, KubeProxyIPTables, KubeProxyNFTables:
		return p, nil
	}
	return "", fmt.Errorf("unknown proxy %q: want %s, %s or %s", s, NoProxy, KubeProxyIPTables, KubeProxyNFTables)
}

// Addressing. The pod network is the topology's (node n routes
// 198.18.n.0/24); ClusterCIDR covers the pod CIDRs of up to 128 nodes and
// not the wire (198.18.254.0/24), so kube-proxy tells pods from nodes.
var (
	ServiceCIDR = netip.MustParsePrefix("10.96.0.0/16")
	ClusterCIDR = netip.MustParsePrefix("198.18.0.0/17")
	// DNSServiceIP is kube-dns's ClusterIP (dns.yaml), as kubeadm sets it.
	DNSServiceIP = netip.MustParseAddr("10.96.0.10")
)

//go:embed dns.yaml
var dnsManifest []byte

// Options configure a cluster.
type Options struct {
	// Name prefixes netns, node and cgroup names; default "spk".
	Name string
	// Dir holds every node's state, configs and logs; it must exist.
	Dir string
	// Nodes is how many nodes to run; default 2.
	Nodes int
	// Proxy is the service proxy; default NoProxy.
	Proxy Proxy
	// Images are docker-archive tarballs imported into every node.
	Images []string
	// SandboxImage is the pause image's tag (it must be among Images).
	SandboxImage string
	// Progress, when set, gets a line per step.
	Progress io.Writer
	// OnState, when set, is given what the cluster holds on the machine
	// each time that grows, for a sweep should the caller die (Sweep).
	OnState func(State) error
}

// Cluster is a running cluster.
type Cluster struct {
	opts Options
	Topo *topology.Topology
	API  *kubeapi.Server
	// ControlPlane is the netns of the control plane (and of kubectl and
	// e2e.test); it sits on the wire beside the nodes.
	ControlPlane string
	// APIServer is kube-apiserver's address as nodes and pods reach it.
	APIServer netip.AddrPort
	Nodes     []*Node
	Client    *kubernetes.Clientset
	// Kubeconfig works inside ControlPlane and on the nodes.
	Kubeconfig string

	controllers []*procs.Proc
	stopOnce    sync.Once
	stopErr     error
}

const apiServerPort = 6443

// Start brings a cluster up and waits until its nodes are Ready (and
// kube-proxy, when chosen, serves its health port on each). On failure
// everything started is stopped and the error names the component, with
// the end of its log.
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	if err := CheckAssets(); err != nil {
		return nil, err
	}
	opts.Name = cmp.Or(opts.Name, "spk")
	opts.Proxy = cmp.Or(opts.Proxy, NoProxy)
	opts.Nodes = cmp.Or(opts.Nodes, 2)
	if opts.SandboxImage == "" {
		return nil, errors.New("kubecluster: no sandbox (pause) image given")
	}
	c := &Cluster{opts: opts}
	if err := c.start(ctx); err != nil {
		return nil, errors.Join(err, c.Stop())
	}
	return c, nil
}

func (c *Cluster) progress(format string, args ...any) {
	if c.opts.Progress != nil {
		fmt.Fprintf(c.opts.Progress, format+"\n", args...)
	}
}

func (c *Cluster) start(ctx context.Context) error {
	var err error
	c.progress("network: %d nodes and the control plane on a wire", c.opts.Nodes)
	c.Topo, err = topology.New(topology.Spec{Name: c.opts.Name, Nodes: c.opts.Nodes, External: true})
	if err != nil {
		return fmt.Errorf("network: %w", err)
	}
	c.ControlPlane = c.Topo.External.Name
	if err := c.recordState(); err != nil {
		return err
	}
	// Nodes route everything they do not know to the control plane, as
	// real nodes have a default route: without one a cluster IP is
	// unreachable before any proxy's rules are consulted.
	for _, n := range c.Topo.Nodes {
		err := n.Do(func() error {
			return netlink.RouteAdd(&netlink.Route{Gw: c.Topo.External.IPv4.AsSlice()})
		})
		if err != nil {
			return fmt.Errorf("node %s: default route: %w", n.Name, err)
		}
	}
	c.APIServer = netip.AddrPortFrom(c.Topo.External.IPv4, apiServerPort)

	c.progress("control plane: etcd and kube-apiserver at %s", c.APIServer)
	cpDir := filepath.Join(c.opts.Dir, "control-plane")
	if err := os.MkdirAll(cpDir, 0o755); err != nil {
		return err
	}
	c.API, err = kubeapi.Start(kubeapi.Options{
		Dir: cpDir, Netns: c.ControlPlane, ServiceCIDRs: ServiceCIDR.String(),
		Address: c.Topo.External.IPv4.String(),
		Dial:    c.Dial,
		// Privileged pods: the servicepath DaemonSet and e2e's host-network test pods.
		// Node names resolve nowhere: reach kubelets by their InternalIP.
		ExtraArgs: []string{"--allow-privileged=true", "--kubelet-preferred-address-types=InternalIP"},
	})
	if err != nil {
		return fmt.Errorf("control plane: %w", err)
	}
	c.Kubeconfig = c.API.Kubeconfig
	if c.Client, err = c.API.Client(); err != nil {
		return err
	}
	if err := c.startControllers(cpDir); err != nil {
		return err
	}

	errs := make([]error, c.opts.Nodes)
	var wg sync.WaitGroup
	for i, tn := range c.Topo.Nodes {
		n := &Node{
			Name:    tn.Name,
			IP:      tn.WireIPv4,
			PodCIDR: tn.PodCIDRv4,
			Cgroup:  "/servicepath-" + tn.Name,
			dir:     filepath.Join(c.opts.Dir, tn.Name),
		}
		c.Nodes = append(c.Nodes, n)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if errs[i] = c.startNode(ctx, n); errs[i] != nil {
				errs[i] = fmt.Errorf("node %s: %w", n.Name, errs[i])
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(append(errs, c.recordState())...); err != nil {
		return err
	}
	c.progress("waiting for %d nodes to be Ready", len(c.Nodes))
	if err := c.waitNodesReady(ctx); err != nil {
		return err
	}
	if c.opts.Proxy != NoProxy {
		c.progress("kube-proxy (%s mode) on every node", c.opts.Proxy)
		for _, n := range c.Nodes {
			if err := c.startKubeProxy(ctx, n); err != nil {
				return fmt.Errorf("node %s: %w", n.Name, err)
			}
		}
	}
	c.progress("cluster DNS (CoreDNS)")
	if _, err := c.Apply(ctx, dnsManifest); err != nil {
		return err
	}
	if c.opts.Proxy != NoProxy {
		if err := c.WaitSystemReady(ctx); err != nil {
			return err
		}
	}
	c.progress("cluster %s is up", c.opts.Name)
	return nil
}

// systemDiagnostics shows kube-system's pods, and the events and last log
// lines of those not ready, for a failure message.
func (c *Cluster) systemDiagnostics() string {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var b strings.Builder
	pods, _ := c.Kubectl(ctx, "-n", "kube-system", "get", "pods", "-o", "wide")
	b.WriteString(pods)
	list, err := c.Client.CoreV1().Pods("kube-system").List(ctx, metav1.ListOptions{})
	if err != nil {
		return b.String()
	}
	for _, p := range list.Items {
		ready := false
		for _, cond := range p.Status.Conditions {
			ready = ready || (cond.Type == corev1.PodReady && cond.Status == corev1.ConditionTrue)
		}
		if ready {
			continue
		}
		events, _ := c.Kubectl(ctx, "-n", "kube-system", "events", "--for=pod/"+p.Name)
		logs, _ := c.Kubectl(ctx, "-n", "kube-system", "logs", p.Name, "--all-containers", "--tail=20")
		fmt.Fprintf(&b, "\n--- pod %s (%s on %s)\n%s\n%s", p.Name, p.Status.Phase, p.Spec.NodeName, events, logs)
	}
	return b.String()
}

// Apply applies manifests with kubectl.
func (c *Cluster) Apply(ctx context.Context, manifests []byte) (string, error) {
	return c.kubectl(ctx, bytes.NewReader(manifests), "apply", "-f", "-")
}

// WaitSystemReady waits until kube-system's Deployments are available and
// its DaemonSets ready on every node: CoreDNS needs the service proxy to
// reach the API server, so with NoProxy the caller waits after deploying
// one.
func (c *Cluster) WaitSystemReady(ctx context.Context) error {
	c.progress("waiting for kube-system's Deployments and DaemonSets")
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	for _, args := range [][]string{
		{"-n", "kube-system", "rollout", "status", "deployment", "--timeout=3m"},
		{"-n", "kube-system", "rollout", "status", "daemonset", "--timeout=3m"},
	} {
		if out, err := c.Kubectl(ctx, args...); err != nil && !strings.Contains(out, "No resources found") {
			return fmt.Errorf("%w\n%s", err, c.systemDiagnostics())
		}
	}
	return nil
}

func (c *Cluster) recordState() error {
	if c.opts.OnState == nil {
		return nil
	}
	return c.opts.OnState(c.State())
}

// Dial connects from the control plane's netns, where the API server is and
// from where every node and pod is reachable.
func (c *Cluster) Dial(ctx context.Context, network, addr string) (conn net.Conn, err error) {
	err = nsexec.Do(c.Topo.External.NS, func() error {
		var d net.Dialer
		conn, err = d.DialContext(ctx, network, addr)
		return err
	})
	return conn, err
}

// netnsPath is a named netns's file, which nsenter enters.
func netnsPath(name string) string { return filepath.Join("/run/netns", name) }

// startControllers starts kube-controller-manager and kube-scheduler in the
// control plane's netns.
func (c *Cluster) startControllers(dir string) error {
	cp := netnsPath(c.ControlPlane)
	kcm := exec.Command("nsenter", "--net="+cp, "--", Bin("kube-controller-manager"),
		"--kubeconfig="+c.Kubeconfig, "--authentication-kubeconfig="+c.Kubeconfig, "--authorization-kubeconfig="+c.Kubeconfig,
		"--leader-elect=false", "--bind-address=127.0.0.1",
		// Pods verify the API server with the CA it generated for itself.
		"--root-ca-file="+filepath.Join(dir, "certs", "apiserver.crt"),
		"--service-account-private-key-file="+filepath.Join(dir, "sa.key"),
		"--service-cluster-ip-range="+ServiceCIDR.String(),
		"--cluster-name="+c.opts.Name)
	sched := exec.Command("nsenter", "--net="+cp, "--", Bin("kube-scheduler"),
		"--kubeconfig="+c.Kubeconfig, "--authentication-kubeconfig="+c.Kubeconfig, "--authorization-kubeconfig="+c.Kubeconfig,
		"--leader-elect=false", "--bind-address=127.0.0.1")
	for name, cmd := range map[string]*exec.Cmd{"kube-controller-manager": kcm, "kube-scheduler": sched} {
		c.progress("control plane: %s", name)
		p, err := procs.Start(name, filepath.Join(dir, name+".log"), cmd)
		if err != nil {
			return err
		}
		c.controllers = append(c.controllers, p)
	}
	return nil
}

func (c *Cluster) startNode(ctx context.Context, n *Node) error {
	ns := netnsPath(n.Name)
	if err := os.MkdirAll(n.dir, 0o755); err != nil {
		return err
	}
	startCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := n.makeCgroups(); err != nil {
		return err
	}
	c.progress("node %s: mount namespace", n.Name)
	if err := n.startHolder(startCtx); err != nil {
		return err
	}
	c.progress("node %s: containerd", n.Name)
	if err := n.startContainerd(startCtx, ns, c.opts.SandboxImage); err != nil {
		return err
	}
	c.progress("node %s: importing %d images", n.Name, len(c.opts.Images))
	if err := n.importImages(ns, c.opts.Images); err != nil {
		return err
	}
	if err := n.writeCNIConfig(c.opts.Proxy != NoProxy); err != nil {
		return err
	}
	c.progress("node %s: kubelet at %s", n.Name, n.IP)
	return n.startKubelet(ns, c.Kubeconfig)
}

// waitNodesReady waits for every node to register and be Ready, and gives
// each its pod CIDR (the topology's, which host-local allocates from).
func (c *Cluster) waitNodesReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for _, n := range c.Nodes {
		var last string
		for {
			node, err := c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err == nil && node.Spec.PodCIDR == "" {
				patch := fmt.Sprintf(`{"spec":{"podCIDR":%q,"podCIDRs":[%q]}}`, n.PodCIDR, n.PodCIDR)
				_, err = c.Client.CoreV1().Nodes().Patch(ctx, n.Name, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
			}
			if err == nil {
				if ready, why := nodeReady(node); ready {
					break
				} else {
					last = why
				}
			} else {
				last = err.Error()
			}
			if exited, how := n.kubelet.Exited(); exited {
				return fmt.Errorf("node %s: kubelet exited (%s); last log lines:\n%s", n.Name, how, n.kubelet.LogTail())
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("node %s not Ready: %s; last kubelet log lines:\n%s", n.Name, last, n.kubelet.LogTail())
			case <-time.After(500 * time.Millisecond):
			}
		}
	}
	return nil
}

func nodeReady(n *corev1.Node) (bool, string) {
	for _, cond := range n.Status.Conditions {
		if cond.Type == corev1.NodeReady {
			return cond.Status == corev1.ConditionTrue, cond.Reason + ": " + cond.Message
		}
	}
	return false, "no Ready condition yet"
}

// startKubeProxy runs kube-proxy on the node, as the baselines' clusters
// run it, and waits for its health port.
func (c *Cluster) startKubeProxy(ctx context.Context, n *Node) error {
	ns := netnsPath(n.Name)
	var err error
	n.kubeProxy, err = procs.Start(n.Name+" kube-proxy", n.path("kube-proxy.log"),
		n.nodeCommand(ns, Bin("kube-proxy"), "--kubeconfig="+c.Kubeconfig, "--hostname-override="+n.Name,
			"--proxy-mode="+string(c.opts.Proxy), "--cluster-cidr="+ClusterCIDR.String(),
			"--healthz-bind-address=0.0.0.0:10256", "--metrics-bind-address=127.0.0.1:10249",
			// Conntrack limits are machine-wide: leave the machine's as they are.
			"--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0", "--conntrack-tcp-timeout-close-wait=0",
			"--v=2"))
	if err != nil {
		return err
	}
	waitCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	return waitFor(waitCtx, n.kubeProxy, "kube-proxy healthz", func() error {
		return c.inControlPlane(func() error {
			conn, err := net.DialTimeout("tcp", netip.AddrPortFrom(n.IP, 10256).String(), time.Second)
			if err == nil {
				conn.Close()
			}
			return err
		})
	})
}

func (c *Cluster) inControlPlane(fn func() error) error { return nsexec.Do(c.Topo.External.NS, fn) }

// Command runs a binary in the control plane's netns, with KUBECONFIG set:
// kubectl and e2e.test. Cancelling ctx kills its process group.
func (c *Cluster) Command(ctx context.Context, bin string, args ...string) *exec.Cmd {
	return State{ControlPlane: c.ControlPlane, Kubeconfig: c.Kubeconfig}.Command(ctx, bin, args...)
}

// Kubectl runs kubectl against the cluster and returns its combined output.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) (string, error) {
	return c.kubectl(ctx, nil, args...)
}

func (c *Cluster) kubectl(ctx context.Context, stdin io.Reader, args ...string) (string, error) {
	cmd := c.Command(ctx, Bin("kubectl"), args...)
	cmd.Stdin = stdin
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// Stop stops the nodes, then the control plane, and removes the network.
// It is safe to call more than once and on a partly started cluster.
func (c *Cluster) Stop() error {
	c.stopOnce.Do(func() {
		var errs []error
		var wg sync.WaitGroup
		nodeErrs := make([]error, len(c.Nodes))
		for i, n := range c.Nodes {
			wg.Add(1)
			go func() {
				defer wg.Done()
				nodeErrs[i] = n.stop()
			}()
		}
		wg.Wait()
		errs = append(errs, nodeErrs...)
		for _, p := range c.controllers {
			errs = append(errs, p.Stop(10*time.Second))
		}
		if c.API != nil {
			errs = append(errs, c.API.Stop())
		}
		if c.Topo != nil {
			errs = append(errs, c.Topo.Close())
		}
		c.stopErr = errors.Join(errs...)
	})
	return c.stopErr
}
