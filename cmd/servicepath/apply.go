package main

import (
	"errors"
	"fmt"
	"io"

	"github.com/cilium/ebpf"
	"github.com/spf13/pflag"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/mounts"
	"github.com/servicepath/servicepath/datapath/sockdestroy"

	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/k8s"
)

// manifestOptions are the flags of apply and delete.
type manifestOptions struct {
	files stringList
	bpffs string
}

func addManifestFlags(fs *pflag.FlagSet) *manifestOptions {
	mo := &manifestOptions{}
	fs.StringVar(&mo.bpffs, "bpffs", defaultBPFFS, "bpffs directory given to load")
	fs.VarP(&mo.files, "filename", "f", "manifest file or directory (repeatable)")
	return mo
}

func (mo *manifestOptions) check() error {
	if len(mo.files) == 0 {
		return usagef("-f is required")
	}
	return nil
}

func openManager(bpffs string) (*service.Manager, *maps.Maps, error) {
	m, err := maps.OpenPinned(bpffs)
	if err != nil {
		return nil, nil, err
	}
	mgr, err := service.NewManager(m)
	if err != nil {
		m.Close()
		return nil, nil, err
	}
	return mgr, m, nil
}

func warn(w io.Writer, kind string, items []string) {
	for _, s := range items {
		fmt.Fprintf(w, "%s: %s\n", kind, s)
	}
}

func cmdApply(fs *pflag.FlagSet, o output) func() error {
	var node k8s.Options
	fs.StringVar(&node.NodeName, "node-name", "", "this node's name, as the agent's: traffic policies Local, node hints, and only this node's Pods' hostPorts (default: none, every endpoint and Pod)")
	fs.StringVar(&node.Zone, "zone", "", "this node's topology.kubernetes.io/zone label, for the slices' zone hints")
	return checked(addManifestFlags(fs), func(mo *manifestOptions) error {
		// Everything is validated before any map is opened: a bad manifest
		// leaves the datapath as it was.
		objs, err := k8s.ReadManifests(mo.files...)
		if err != nil {
			return fmt.Errorf("nothing applied:\n%w", err)
		}
		res, err := k8s.TranslateWith(node, objs.Services, objs.EndpointSlices)
		if err != nil {
			return fmt.Errorf("nothing applied:\n%w", err)
		}
		pods, err := k8s.TranslatePods(node, objs.Pods)
		if err != nil {
			return fmt.Errorf("nothing applied:\n%w", err)
		}
		warn(o.errOut, "ignored", objs.Ignored)
		warn(o.errOut, "skipped", append(res.Skipped, pods.Skipped...))
		warn(o.errOut, "unsupported", append(res.Unsupported, pods.Unsupported...))
		if len(objs.Services) == 0 && len(objs.EndpointSlices) > 0 {
			return errors.New("nothing applied: EndpointSlices without their Service; apply them together")
		}

		mgr, m, err := openManager(mo.bpffs)
		if err != nil {
			return err
		}
		defer m.Close()
		services := append(res.Services, pods.Services...)
		if err := mgr.Apply(append(k8s.ServiceNames(objs.Services), k8s.PodNames(objs.Pods)...), services); err != nil {
			return err
		}
		if err := destroyStaleSockets(o, mo.bpffs, m, mgr.TakeRemoved()); err != nil {
			return err
		}
		for _, s := range services {
			active := 0
			for _, b := range s.Backends {
				if b.State == service.Active {
					active++
				}
			}
			fmt.Fprintf(o.out, "%s %s: %d backends (%d active)\n", s.Name, s.Frontend, len(s.Backends), active)
		}
		return nil
	})
}

func cmdDelete(fs *pflag.FlagSet, o output) func() error {
	return checked(addManifestFlags(fs), func(mo *manifestOptions) error {
		objs, err := k8s.ReadManifests(mo.files...)
		if err != nil {
			return fmt.Errorf("nothing deleted:\n%w", err)
		}
		names := append(k8s.ServiceNames(objs.Services), k8s.PodNames(objs.Pods)...)
		mgr, m, err := openManager(mo.bpffs)
		if err != nil {
			return err
		}
		defer m.Close()
		if err := mgr.DeleteOwned(names); err != nil {
			return err
		}
		if err := destroyStaleSockets(o, mo.bpffs, m, mgr.TakeRemoved()); err != nil {
			return err
		}
		for _, n := range names {
			fmt.Fprintf(o.out, "deleted %s\n", n)
		}
		return nil
	})
}

// destroyStaleSockets closes sockets the socket hooks connected to removed
// backends, in every netns of the cgroups they are attached to. A kernel
// without bpf_sock_destroy is reported, not fatal: those clients keep
// their sockets until they time out.
func destroyStaleSockets(o output, bpffs string, m *maps.Maps, removed []service.Removed) error {
	if len(removed) == 0 {
		return nil
	}
	root, err := mounts.Cgroup2Root()
	if err != nil {
		return err
	}
	cgroups, err := (&attach.Attacher{LinkDir: linkDir(bpffs)}).AttachedCgroups(root)
	if err != nil || len(cgroups) == 0 {
		return err
	}
	d, err := loader.LoadSockDestroyer(m)
	if errors.Is(err, ebpf.ErrNotSupported) {
		fmt.Fprintf(o.errOut, "warning: %d backends removed but their sockets cannot be destroyed on this kernel: %v\n", len(removed), err)
		return nil
	}
	if err != nil {
		return err
	}
	defer d.Close()
	rep, err := sockdestroy.Run(d, m, cgroups, removed)
	if err != nil {
		return err
	}
	fmt.Fprintf(o.out, "destroyed %d sockets of removed backends in %d network namespaces\n", rep.Destroyed, rep.Namespaces)
	for _, u := range rep.Unreachable {
		fmt.Fprintf(o.errOut, "warning: could not reach %s\n", u)
	}
	return nil
}
