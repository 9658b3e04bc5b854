package kubecluster

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/servicepath/servicepath/harness/topology"
)

// DeployOptions say how servicepath's DaemonSet is deployed.
type DeployOptions struct {
	// Manifests is the folder of deploy/'s YAML files.
	Manifests string
	// Image is the agent's docker-archive (`make image`).
	Image    string
	SocketLB SocketLB
}

// SocketLB says which clients the socket hooks translate; the rest are
// translated per packet.
type SocketLB string

const (
	// SocketLBAll attaches the socket hooks (to each node's own cgroup2
	// subtree) for the host and pods: the deploy/ default.
	SocketLBAll SocketLB = "all"
	// SocketLBHostOnly leaves pods to the per-packet path
	// (--socket-lb-host-only). The host keeps its hooks: no per-packet
	// program sees what the host sends, so they are what makes Services
	// reachable from it (as in Cilium, whose host-reachable services are
	// its socket-LB).
	SocketLBHostOnly SocketLB = "host-only"
	// SocketLBOff attaches no socket hooks: pods per packet, and the
	// host's own connections to Services untranslated.
	SocketLBOff SocketLB = "off"
)

// ParseSocketLB reads a SocketLB's spelling.
func ParseSocketLB(s string) (SocketLB, error) {
	switch v := SocketLB(s); v {
	case SocketLBAll, SocketLBHostOnly, SocketLBOff:
		return v, nil
	}
	return "", fmt.Errorf("socket-LB %q: want all, host-only or off", s)
}

// DeployServicepath imports the agent's image into every node and applies
// deploy/ as a user would, changed only where this machine differs from a
// real cluster: the API server's address (no kube-proxy translates the
// kubernetes Service before the agent runs), the node device (the wire),
// and the cgroup2 hostPath (the node's own subtree, not the machine's
// root). It waits for the DaemonSet and then for CoreDNS, which reaches
// the API server through servicepath.
func (c *Cluster) DeployServicepath(ctx context.Context, o DeployOptions) error {
	for _, n := range c.Nodes {
		if err := n.importImages(netnsPath(n.Name), []string{o.Image}); err != nil {
			return err
		}
	}
	manifests, err := c.servicepathManifests(o)
	if err != nil {
		return err
	}
	c.progress("servicepath DaemonSet (socket-LB %s)", cmp.Or(o.SocketLB, SocketLBAll))
	if _, err := c.Apply(ctx, manifests); err != nil {
		return err
	}
	return c.WaitSystemReady(ctx)
}

// servicepathManifests reads deploy/*.yaml and adapts the DaemonSet.
func (c *Cluster) servicepathManifests(o DeployOptions) ([]byte, error) {
	files, err := filepath.Glob(filepath.Join(o.Manifests, "*.yaml"))
	if err != nil || len(files) == 0 {
		return nil, fmt.Errorf("no manifests in %q", o.Manifests)
	}
	var out bytes.Buffer
	found := false
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
		for {
			doc, err := r.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return nil, fmt.Errorf("%s: %w", f, err)
			}
			if len(bytes.TrimSpace(doc)) == 0 {
				continue
			}
			if bytes.Contains(doc, []byte("kind: ConfigMap")) {
				if doc, err = c.adaptConfig(doc); err != nil {
					return nil, fmt.Errorf("%s: %w", f, err)
				}
			}
			if bytes.Contains(doc, []byte("kind: DaemonSet")) {
				if doc, err = c.adaptDaemonSet(doc, o); err != nil {
					return nil, fmt.Errorf("%s: %w", f, err)
				}
				found = true
			}
			out.WriteString("---\n")
			out.Write(doc)
		}
	}
	if !found {
		return nil, fmt.Errorf("no DaemonSet in %s", o.Manifests)
	}
	return out.Bytes(), nil
}

func (c *Cluster) adaptDaemonSet(doc []byte, o DeployOptions) ([]byte, error) {
	var ds appsv1.DaemonSet
	if err := yaml.UnmarshalStrict(doc, &ds); err != nil {
		return nil, err
	}
	spec := &ds.Spec.Template.Spec
	for i := range spec.Volumes {
		if v := spec.Volumes[i].HostPath; v != nil && v.Path == "/sys/fs/cgroup" {
			v.Path = NodeCgroup2
		}
	}
	for i := range spec.Containers {
		ct := &spec.Containers[i]
		var args []string
		for _, a := range ct.Args {
			switch {
			case strings.HasPrefix(a, "--node-device="):
				a = "--node-device=" + topology.WireIfName
			case strings.HasPrefix(a, "--cgroup=") && o.SocketLB == SocketLBOff:
				continue
			}
			args = append(args, a)
		}
		if o.SocketLB == SocketLBHostOnly {
			args = append(args, "--socket-lb-host-only")
		}
		ct.Args = args
	}
	return yaml.Marshal(&ds)
}

// adaptConfig fills in the API server's address, as deploy/config.yaml
// asks its users to.
func (c *Cluster) adaptConfig(doc []byte) ([]byte, error) {
	var cm corev1.ConfigMap
	if err := yaml.UnmarshalStrict(doc, &cm); err != nil {
		return nil, err
	}
	if _, ok := cm.Data["k8s-api-server"]; ok {
		cm.Data["k8s-api-server"] = c.APIServer.String()
	}
	return yaml.Marshal(&cm)
}
