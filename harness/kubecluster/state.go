package kubecluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"syscall"

	"github.com/vishvananda/netns"
)

// State is what a cluster holds on the machine, recorded so that a cluster
// whose supervisor died can still be swept away (Sweep).
type State struct {
	Name string `json:"name"`
	// Netns are the named network namespaces of the nodes, the control
	// plane and the wire.
	Netns []string `json:"netns"`
	// Cgroups are the kubelets' cgroup roots.
	Cgroups []string `json:"cgroups"`
	// MountNS identify the nodes' mount namespaces (readlink of
	// /proc/PID/ns/mnt), where containerd's shims outlive containerd.
	MountNS []string `json:"mountNS"`
	// Kubeconfig and ControlPlane let a client reach the API server.
	Kubeconfig   string `json:"kubeconfig"`
	ControlPlane string `json:"controlPlane"`
}

// State returns what the cluster holds.
func (c *Cluster) State() State {
	s := State{Name: c.opts.Name, Kubeconfig: c.Kubeconfig, ControlPlane: c.ControlPlane}
	if c.Topo != nil {
		for _, n := range c.Topo.Nodes {
			s.Netns = append(s.Netns, n.Name)
		}
		s.Netns = append(s.Netns, c.Topo.External.Name, c.Topo.WireNetns)
	}
	for _, n := range c.Nodes {
		s.Cgroups = append(s.Cgroups, n.Cgroup)
		if n.holder != nil {
			if ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", n.holder.Pid())); err == nil {
				s.MountNS = append(s.MountNS, ns)
			}
		}
	}
	return s
}

// Command runs a binary in the cluster's control-plane netns, with
// KUBECONFIG set. Cancelling ctx kills its process group.
func (s State) Command(ctx context.Context, bin string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + netnsPath(s.ControlPlane), "--", bin}, args...)...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+s.Kubeconfig)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	return cmd
}

// WriteState records s in a file.
func WriteState(path string, s State) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

// ReadState reads a file WriteState wrote.
func ReadState(path string) (State, error) {
	var s State
	b, err := os.ReadFile(path)
	if err != nil {
		return s, err
	}
	return s, json.Unmarshal(b, &s)
}

// Sweep removes what a cluster left on the machine: it kills the
// processes in its nodes' mount namespaces and cgroups, removes the
// cgroups and deletes its netns. Whatever is already gone is skipped, so
// it is idempotent.
func Sweep(s State) error {
	self, _ := os.Readlink("/proc/self/ns/mnt")
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		ns, _ := os.Readlink("/proc/" + e.Name() + "/ns/mnt")
		for _, want := range s.MountNS {
			if ns == want && ns != self {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	var errs []error
	for _, cg := range s.Cgroups {
		errs = append(errs, killCgroupTree(cg), removeCgroups(cg))
	}
	for _, name := range s.Netns {
		if name == "" {
			continue
		}
		if err := netns.DeleteNamed(name); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("delete netns %s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}
