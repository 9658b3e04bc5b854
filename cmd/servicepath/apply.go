package main

import (
	"errors"
	"fmt"
	"io"

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
	objs, err := k8s.ReadManifests(files...)
	if err != nil {
		return err
	}
	res, err := k8s.Translate(objs.Services, objs.EndpointSlices)
	if err != nil {
		return fmt.Errorf("nothing applied:\n%w", err)
	}
	warn(o.errOut, "ignored", objs.Ignored)
	warn(o.errOut, "skipped", res.Skipped)
	warn(o.errOut, "unsupported", res.Unsupported)
	if len(objs.Services) == 0 && len(objs.EndpointSlices) > 0 {
		return errors.New("nothing applied: EndpointSlices without their Service; apply them together")
	}

	mgr, m, err := openManager(bpffs)
	if err != nil {
		return err
	}
	defer m.Close()
	if err := mgr.Apply(k8s.ServiceNames(objs.Services), res.Services); err != nil {
		return err
	}
	for _, s := range res.Services {
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
		return err
	}
	names := k8s.ServiceNames(objs.Services)
	mgr, m, err := openManager(bpffs)
	if err != nil {
		return err
	}
	defer m.Close()
	if err := mgr.DeleteOwned(names); err != nil {
		return err
	}
	for _, n := range names {
		fmt.Fprintf(o.out, "deleted %s\n", n)
	}
	return nil
}
