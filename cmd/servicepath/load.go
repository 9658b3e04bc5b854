package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf/rlimit"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/nodeaddrs"
)

func linkDir(bpffs string) string { return filepath.Join(bpffs, "links") }

// loadOptions are the flags of `load`, shared with `agent`, which loads
// and attaches the datapath the same way before it watches the API.
type loadOptions struct {
	cfg       loader.Config
	bpffs     string
	devices   stringList
	cgroup    string
	mode      string
	noBackend string
}

func addLoadFlags(fs *flag.FlagSet) *loadOptions {
	lo := &loadOptions{cfg: loader.DefaultConfig()}
	def := &lo.cfg
	fs.StringVar(&lo.bpffs, "bpffs", defaultBPFFS, "bpffs directory for pinned maps and links (bpffs is mounted there if absent)")
	fs.Var(&lo.devices, "device", "pod host-side device to attach to (repeatable, or comma-separated)")
	fs.StringVar(&lo.cgroup, "cgroup", "", "cgroup2 directory whose sockets get socket-level load balancing (a node: the cgroup2 root)")
	fs.BoolVar(&def.SockLBHostOnly, "socket-lb-host-only", false, "translate at the socket only in this netns; pods use the per-packet path")
	fs.StringVar(&lo.mode, "attach-mode", string(attach.Auto), "auto (tcx, else tc), tcx, or tc (clsact + cls_bpf)")
	fs.StringVar(&lo.noBackend, "no-backend", "reject", "new flows to a service without ready backends: reject (ICMP unreachable) or drop")
	fs.Var((*uint32Flag)(&def.ServiceMapSize), "services-size", "service map entries (frontends plus their backend slots)")
	fs.Var((*uint32Flag)(&def.BackendMapSize), "backends-size", "backend map entries")
	fs.Var((*uint32Flag)(&def.CTMapSize), "ct-size", "connection tracking entries (two per load-balanced flow)")
	fs.DurationVar(&def.CTTCPSyn, "ct-tcp-syn", def.CTTCPSyn, "lifetime of a TCP flow before it is established")
	fs.DurationVar(&def.CTTCPEstablished, "ct-tcp-established", def.CTTCPEstablished, "lifetime of an idle established TCP flow")
	fs.DurationVar(&def.CTTCPClose, "ct-tcp-close", def.CTTCPClose, "lifetime of a closing TCP flow")
	fs.DurationVar(&def.CTNonTCP, "ct-non-tcp", def.CTNonTCP, "lifetime of an idle UDP flow")
	return lo
}

func cmdLoad(args []string, o output) error {
	fs := newFlags("load", o)
	lo := addLoadFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	dp, err := loadDatapath(lo, o)
	if err != nil {
		return err
	}
	return dp.Close()
}

// loadDatapath loads the datapath (re-using maps already pinned, so flows
// survive) and attaches it. The caller closes the result.
func loadDatapath(lo *loadOptions, o output) (*loader.Datapath, error) {
	m, err := attach.ParseMode(lo.mode)
	if err != nil {
		return nil, err
	}
	def := lo.cfg
	if def.NoBackend, err = loader.ParseNoBackendAction(lo.noBackend); err != nil {
		return nil, err
	}
	def.PinPath = lo.bpffs
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("raise memlock limit: %w", err)
	}

	dp, err := loader.Load(def)
	if err != nil {
		return nil, err
	}
	if err := nodeaddrs.SyncLocal(dp.Maps.NodeAddrs); err != nil {
		dp.Close()
		return nil, err
	}
	if err := attachDatapath(dp, lo, m, o); err != nil {
		dp.Close()
		return nil, err
	}
	fmt.Fprintf(o.out, "maps pinned under %s\n", lo.bpffs)
	return dp, nil
}

func attachDatapath(dp *loader.Datapath, lo *loadOptions, m attach.Mode, o output) error {
	a := &attach.Attacher{LinkDir: linkDir(lo.bpffs), Mode: m}
	for _, dev := range lo.devices {
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
	if lo.cgroup != "" {
		for _, h := range dp.SockHooks {
			if err := a.AttachCgroup(h.Prog, lo.cgroup, h.Name, h.Attach); err != nil {
				return err
			}
		}
		fmt.Fprintf(o.out, "attached %d socket hooks to cgroup %s\n", len(dp.SockHooks), lo.cgroup)
	}
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
	for _, name := range []string{maps.ServicesName, maps.BackendsName, maps.SvcMetaName, maps.CTName, maps.FragsName, maps.MetricsName, maps.SockRevName, maps.AffinityName, maps.NodeAddrName} {
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
