package main

import (
	"errors"
	"fmt"
	"io"

	"github.com/cilium/ebpf"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/mounts"
	"github.com/servicepath/servicepath/datapath/sockdestroy"

	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/k8s"
)

// manifestArgs parses -f and --bpffs for apply and delete.
func manifestArgs(name string, args []string, o output) (files []string, bpffs string, err error) {
	fs := newFlags(name, o)
	dir := fs.String("bpffs", defaultBPFFS, "bpffs directory given to load")
	fs.Var((*stringList)(&files), "f", "manifest file or directory (repeatable)")
	if err := parse(fs, args); err != nil {
		return nil, "", err
	}
	if len(files) == 0 {
		fmt.Fprintln(fs.Output(), "-f is required")
		fs.Usage()
		return nil, "", errUsage
	}
	return files, *dir, nil
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

func cmdApply(args []string, o output) error {
	files, bpffs, err := manifestArgs("apply", args, o)
	if err != nil {
		return err
	}
	// Everything is validated before any map is opened: a bad manifest
	// leaves the datapath as it was.
	objs, err := k8s.ReadManifests(files...)
	if err != nil {
		return fmt.Errorf("nothing applied:\n%w", err)
	}
	res, err := k8s.Translate(objs.Services, objs.EndpointSlices)
	if err != nil {
		return fmt.Errorf("nothing applied:\n%w", err)
	}
	// Manifests name no node: every Pod's hostPorts are this node's.
	pods, err := k8s.TranslatePods(k8s.Options{}, objs.Pods)
	if err != nil {
		return fmt.Errorf("nothing applied:\n%w", err)
	}
	warn(o.errOut, "ignored", objs.Ignored)
	warn(o.errOut, "skipped", append(res.Skipped, pods.Skipped...))
	warn(o.errOut, "unsupported", append(res.Unsupported, pods.Unsupported...))
	if len(objs.Services) == 0 && len(objs.EndpointSlices) > 0 {
		return errors.New("nothing applied: EndpointSlices without their Service; apply them together")
	}

	mgr, m, err := openManager(bpffs)
	if err != nil {
		return err
	}
	defer m.Close()
	services := append(res.Services, pods.Services...)
	if err := mgr.Apply(append(k8s.ServiceNames(objs.Services), k8s.PodNames(objs.Pods)...), services); err != nil {
		return err
	}
	if err := destroyStaleSockets(o, bpffs, m, mgr.TakeRemoved()); err != nil {
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
}

func cmdDelete(args []string, o output) error {
	files, bpffs, err := manifestArgs("delete", args, o)
	if err != nil {
		return err
	}
	objs, err := k8s.ReadManifests(files...)
	if err != nil {
		return fmt.Errorf("nothing deleted:\n%w", err)
	}
	names := append(k8s.ServiceNames(objs.Services), k8s.PodNames(objs.Pods)...)
	mgr, m, err := openManager(bpffs)
	if err != nil {
		return err
	}
	defer m.Close()
	if err := mgr.DeleteOwned(names); err != nil {
		return err
	}
	if err := destroyStaleSockets(o, bpffs, m, mgr.TakeRemoved()); err != nil {
		return err
	}
	for _, n := range names {
		fmt.Fprintf(o.out, "deleted %s\n", n)
	}
	return nil
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
