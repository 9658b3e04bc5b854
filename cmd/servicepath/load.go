package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf/rlimit"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
)

func linkDir(bpffs string) string { return filepath.Join(bpffs, "links") }

func cmdLoad(args []string, o output) error {
	fs := newFlags("load", o)
	def := loader.DefaultConfig()
	bpffs := fs.String("bpffs", defaultBPFFS, "bpffs directory for pinned maps and links (bpffs is mounted there if absent)")
	var devices stringList
	fs.Var(&devices, "device", "pod host-side device to attach to (repeatable, or comma-separated)")
	cgroup := fs.String("cgroup", "", "cgroup2 directory whose sockets get socket-level load balancing (a node: the cgroup2 root)")
	fs.BoolVar(&def.SockLBHostOnly, "socket-lb-host-only", false, "translate at the socket only in this netns; pods use the per-packet path")
	mode := fs.String("attach-mode", string(attach.Auto), "auto (tcx, else tc), tcx, or tc (clsact + cls_bpf)")
	noBackend := fs.String("no-backend", "reject", "new flows to a service without ready backends: reject (ICMP unreachable) or drop")
	fs.Var((*uint32Flag)(&def.ServiceMapSize), "services-size", "service map entries (frontends plus their backend slots)")
	fs.Var((*uint32Flag)(&def.BackendMapSize), "backends-size", "backend map entries")
	fs.Var((*uint32Flag)(&def.CTMapSize), "ct-size", "connection tracking entries (two per load-balanced flow)")
	fs.DurationVar(&def.CTTCPSyn, "ct-tcp-syn", def.CTTCPSyn, "lifetime of a TCP flow before it is established")
	fs.DurationVar(&def.CTTCPEstablished, "ct-tcp-established", def.CTTCPEstablished, "lifetime of an idle established TCP flow")
	fs.DurationVar(&def.CTTCPClose, "ct-tcp-close", def.CTTCPClose, "lifetime of a closing TCP flow")
	fs.DurationVar(&def.CTNonTCP, "ct-non-tcp", def.CTNonTCP, "lifetime of an idle UDP flow")
	if err := parse(fs, args); err != nil {
		return err
	}
	m, err := attach.ParseMode(*mode)
	if err != nil {
		return err
	}
	if def.NoBackend, err = loader.ParseNoBackendAction(*noBackend); err != nil {
		return err
	}
	def.PinPath = *bpffs
	if err := rlimit.RemoveMemlock(); err != nil {
		return fmt.Errorf("raise memlock limit: %w", err)
	}

	dp, err := loader.Load(def)
	if err != nil {
		return err
	}
	defer dp.Close()

	a := &attach.Attacher{LinkDir: linkDir(*bpffs), Mode: m}
	for _, dev := range devices {
		for _, h := range []struct {
			dir  attach.Direction
			name string
		}{{attach.Ingress, "from-pod"}, {attach.Egress, "to-pod"}} {
			prog := dp.FromPod
			if h.dir == attach.Egress {
				prog = dp.ToPod
			}
			used, err := a.Attach(prog, dev, h.dir)
			if err != nil {
				return err
			}
			fmt.Fprintf(o.out, "attached %s to %s %s (%s)\n", h.name, dev, h.dir, used)
		}
	}
	if *cgroup != "" {
		for _, h := range dp.SockHooks {
			if err := a.AttachCgroup(h.Prog, *cgroup, h.Name, h.Attach); err != nil {
				return err
			}
		}
		fmt.Fprintf(o.out, "attached %d socket hooks to cgroup %s\n", len(dp.SockHooks), *cgroup)
	}
	fmt.Fprintf(o.out, "maps pinned under %s\n", *bpffs)
	return nil
}

func cmdUnload(args []string, o output) error {
	fs := newFlags("unload", o)
	bpffs := fs.String("bpffs", defaultBPFFS, "bpffs directory given to load")
	if err := parse(fs, args); err != nil {
		return err
	}
	a := &attach.Attacher{LinkDir: linkDir(*bpffs)}
	var errs []error
	errs = append(errs, a.DetachAll())
	for _, name := range []string{maps.ServicesName, maps.BackendsName, maps.SvcMetaName, maps.CTName, maps.FragsName, maps.MetricsName, maps.SockRevName, maps.AffinityName} {
		if err := os.Remove(filepath.Join(*bpffs, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	fmt.Fprintf(o.out, "detached servicepath from every device of this network namespace and removed %s\n", *bpffs)
	return nil
}

type uint32Flag uint32

func (u *uint32Flag) String() string { return fmt.Sprint(uint32(*u)) }

func (u *uint32Flag) Set(s string) error {
	var v uint32
	if _, err := fmt.Sscan(s, &v); err != nil || v == 0 {
		return fmt.Errorf("want a positive 32-bit integer, got %q", s)
	}
	*u = uint32Flag(v)
	return nil
}
