package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf/rlimit"
	"github.com/spf13/pflag"
	"github.com/vishvananda/netlink"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/coexist"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/netdev"
	"github.com/servicepath/servicepath/datapath/nodeaddrs"
)

// parsePortRange reads MIN-MAX.
func parsePortRange(s string) (lo, hi uint16, err error) {
	a, b, ok := strings.Cut(s, "-")
	if !ok {
		return 0, 0, fmt.Errorf("port range %q: want MIN-MAX", s)
	}
	l, err1 := strconv.ParseUint(a, 10, 16)
	h, err2 := strconv.ParseUint(b, 10, 16)
	if err1 != nil || err2 != nil || l == 0 || l > h {
		return 0, 0, fmt.Errorf("port range %q: want MIN-MAX with 1 <= MIN <= MAX <= 65535", s)
	}
	return uint16(l), uint16(h), nil
}

func linkDir(bpffs string) string { return filepath.Join(bpffs, "links") }

// loadOptions are the flags of `load`, shared with `agent`, which loads
// and attaches the datapath the same way before it watches the API.
type loadOptions struct {
	cfg       loader.Config
	bpffs     string
	devices   stringList
	netdevs   stringList
	netdevXDP string
	natPorts  string
	cgroup    string
	mode      string
	noBackend string
	sockState string
	// allowKubeProxy loads next to kube-proxy (a migration window).
	allowKubeProxy bool
	// bigTCP raises the GSO/GRO limits of every device attached to.
	bigTCP bool
}

func addLoadFlags(fs *pflag.FlagSet) *loadOptions {
	lo := &loadOptions{cfg: loader.DefaultConfig()}
	def := &lo.cfg
	fs.StringVar(&lo.bpffs, "bpffs", defaultBPFFS, "bpffs directory for pinned maps and links (bpffs is mounted there if absent)")
	fs.Var(&lo.devices, "device", "pod host-side device to attach to (repeatable, or comma-separated)")
	fs.Var(&lo.netdevs, "node-device", "node device for NodePort, ExternalIP, LoadBalancer and HostPort traffic from outside (repeatable, or comma-separated)")
	fs.StringVar(&lo.netdevXDP, "node-device-xdp", string(attach.XDPOff), "XDP ahead of tc on the node devices: off; native (in the driver); generic (on the skb: any device, no faster than tc); auto (native, else generic; tc alone on a kernel without XDP's helpers, 5.18+)")
	fs.StringVar(&lo.natPorts, "nat-ports", fmt.Sprintf("%d-%d", def.NATPortMin, def.NATPortMax), "ports SNAT of north-south flows takes on a node device's address, MIN-MAX")
	fs.Var((*uint32Flag)(&def.NATMapSize), "nat-size", "SNAT entries (two per SNATed north-south flow)")
	fs.StringVar(&lo.cgroup, "cgroup", "", "cgroup2 directory whose sockets get socket-level load balancing (a node: the cgroup2 root)")
	fs.BoolVar(&def.SockLBHostOnly, "socket-lb-host-only", false, "translate at the socket only in this netns; pods use the per-packet path")
	fs.StringVar(&lo.mode, "attach-mode", string(attach.Auto), "auto (tcx, else tc), tcx, or tc (clsact + cls_bpf)")
	fs.StringVar(&lo.noBackend, "no-backend", "reject", "new flows to a service without ready backends: reject (ICMP unreachable) or drop")
	fs.Var((*uint32Flag)(&def.ServiceMapSize), "services-size", "service map entries (frontends plus their backend slots)")
	fs.Var((*uint32Flag)(&def.BackendMapSize), "backends-size", "backend map entries")
	fs.Var((*uint32Flag)(&def.CTMapSize), "ct-size", "connection tracking entries (two per load-balanced flow); with zones, the east-west zone's")
	fs.Var((*sizeOrOffFlag)(&def.CTNorthSouthMapSize), "ct-ns-size", "entries of the north-south conntrack zone (node devices), so a north-south flood never evicts east-west flows; 0: one map for both (changing it needs unload)")
	fs.Var((*uint32Flag)(&def.MaglevTableSize), "maglev-table-size", "slots of each Maglev service's table: a prime from 251 to 131071, 16381 or 65521 advised (changing it needs unload)")
	fs.DurationVar(&def.CTTCPSyn, "ct-tcp-syn", def.CTTCPSyn, "lifetime of a TCP flow before it is established")
	fs.DurationVar(&def.CTTCPEstablished, "ct-tcp-established", def.CTTCPEstablished, "lifetime of an idle established TCP flow")
	fs.DurationVar(&def.CTTCPClose, "ct-tcp-close", def.CTTCPClose, "lifetime of a closing TCP flow")
	fs.DurationVar(&def.CTNonTCP, "ct-non-tcp", def.CTNonTCP, "lifetime of an idle UDP flow")
	fs.TextVar(&def.HairpinIPv4, "hairpin-ipv4", def.HairpinIPv4, "source of a pod's IPv4 packets to a service that picked the pod itself: an address no pod owns, routed out of every pod's device")
	fs.TextVar(&def.HairpinIPv6, "hairpin-ipv6", def.HairpinIPv6, "the same for IPv6; not link-local, which pods answer from their link-local address")
	fs.StringVar(&lo.sockState, "sock-state", string(loader.SockStateMap), "where socket-LB keeps each socket's reverse translation: map (sp_sock_revnat LRU), storage (the socket's own BPF storage, Linux 5.10+) or auto")
	fs.Var((*uint32Flag)(&def.SockRevNATMapSize), "sock-revnat-size", "socket reverse-NAT entries (map mode: one per socket and backend)")
	fs.BoolVar(&lo.bigTCP, "big-tcp", false, "BIG TCP: raise the GSO and GRO limits of the pod and node devices attached to to 192 KiB, IPv6 and IPv4 (IPv4 needs Linux 6.3+), as far as each driver lets it (what applied is printed)")
	fs.BoolVar(&lo.allowKubeProxy, "allow-kube-proxy", false, "load even though kube-proxy's rules or ports are found (a migration window: both translate until kube-proxy is gone)")
	return lo
}

func cmdLoad(fs *pflag.FlagSet, o output) func() error {
	lo := addLoadFlags(fs)
	return func() error {
		dp, lock, err := loadDatapath(lo, o)
		if err != nil {
			return err
		}
		defer lock.Release()
		return dp.Close()
	}
}

// loadDatapath loads the datapath (re-using maps already pinned, so flows
// survive) and attaches it, unless kube-proxy or another servicepath is
// found. The caller closes the result and releases the pin directory's
// lock when it exits.
func loadDatapath(lo *loadOptions, o output) (_ *loader.Datapath, _ *coexist.Lock, err error) {
	defer func() {
		if errors.Is(err, os.ErrPermission) {
			err = fmt.Errorf("%w (loading the datapath needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON; CAP_SYS_ADMIN before Linux 5.8)", err)
		}
	}()
	m, err := attach.ParseMode(lo.mode)
	if err != nil {
		return nil, nil, err
	}
	xdp, err := attach.ParseXDPMode(lo.netdevXDP)
	if err != nil {
		return nil, nil, fmt.Errorf("--node-device-xdp: %w", err)
	}
	def := lo.cfg
	def.XDP = xdp != attach.XDPOff && len(lo.netdevs) > 0
	if def.NoBackend, err = loader.ParseNoBackendAction(lo.noBackend); err != nil {
		return nil, nil, err
	}
	if def.SockState, err = loader.ParseSockState(lo.sockState); err != nil {
		return nil, nil, err
	}
	if def.NATPortMin, def.NATPortMax, err = parsePortRange(lo.natPorts); err != nil {
		return nil, nil, fmt.Errorf("--nat-ports: %w", err)
	}
	// Every device is checked before anything is loaded or attached.
	for _, dev := range append(append([]string{}, lo.devices...), lo.netdevs...) {
		if _, err := netlink.LinkByName(dev); err != nil {
			return nil, nil, fmt.Errorf("device %s: %w", dev, err)
		}
	}
	// A bad --cgroup is found before anything is pinned.
	if lo.cgroup != "" {
		if _, err := attach.CheckCgroup(lo.cgroup); err != nil {
			return nil, nil, fmt.Errorf("--cgroup: %w", err)
		}
	}
	def.PinPath = lo.bpffs
	if err := def.Validate(); err != nil {
		return nil, nil, fmt.Errorf("load config: %w", err)
	}
	lock, err := coexist.Preflight(lo.bpffs, lo.allowKubeProxy, o.errOut)
	if err != nil {
		return nil, nil, err
	}
	defer func() {
		if err != nil {
			lock.Release()
		}
	}()
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, nil, fmt.Errorf("raise memlock limit: %w", err)
	}

	dp, err := loader.Load(def)
	if err != nil {
		return nil, nil, err
	}
	if err := nodeaddrs.SyncLocal(dp.Maps.NodeAddrs); err != nil {
		dp.Close()
		return nil, nil, err
	}
	if err := attachDatapath(dp, lo, m, xdp, o); err != nil {
		dp.Close()
		return nil, nil, err
	}
	if lo.cgroup != "" {
		// auto is resolved by probing; say what it chose.
		if st, err := def.ResolveSockState(); err == nil {
			fmt.Fprintf(o.out, "socket state kept in: %s\n", st)
		}
	}
	fmt.Fprintf(o.out, "maps pinned under %s\n", lo.bpffs)
	return dp, lock, nil
}

func attachDatapath(dp *loader.Datapath, lo *loadOptions, m attach.Mode, xdp attach.XDPMode, o output) error {
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
	for _, dev := range lo.netdevs {
		used, err := netdev.Attach(a, dp, dev, xdp)
		if err != nil {
			return err
		}
		fmt.Fprintf(o.out, "attached from-netdev and to-netdev to %s (%s)\n", dev, used.TC)
		switch {
		case used.XDP != attach.XDPOff:
			fmt.Fprintf(o.out, "attached xdp-from-netdev to %s (%s)\n", dev, used.XDP)
		case xdp != attach.XDPOff:
			fmt.Fprintf(o.out, "no XDP on %s, tc alone: %v\n", dev, dp.XDPMissing)
		}
	}
	if lo.bigTCP {
		for _, dev := range append(append([]string{}, lo.devices...), lo.netdevs...) {
			b, err := netdev.SetBigTCP(dev, netdev.BigTCPSize)
			if err != nil {
				return err
			}
			fmt.Fprintf(o.out, "big tcp on %v (IPv6 %v, IPv4 %v)\n", b, b.IPv6(), b.IPv4())
			for _, r := range b.Refused {
				fmt.Fprintf(o.out, "big tcp on %s refused: %v\n", dev, r)
			}
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

func cmdUnload(fs *pflag.FlagSet, o output) func() error {
	bpffs := fs.String("bpffs", defaultBPFFS, "bpffs directory given to load")
	return func() error {
		done, err := coexist.RemoveServicepath(*bpffs, linkDir(*bpffs))
		if err := report(o, *bpffs, done, err); err != nil {
			return err
		}
		fmt.Fprintln(o.out, "detached servicepath from every device of this network namespace")
		return nil
	}
}

type uint32Flag uint32

func (u *uint32Flag) String() string { return fmt.Sprint(uint32(*u)) }
func (u *uint32Flag) Type() string   { return "uint32" }

func (u *uint32Flag) Set(s string) error {
	var v uint32
	if _, err := fmt.Sscan(s, &v); err != nil || v == 0 {
		return fmt.Errorf("want a positive 32-bit integer, got %q", s)
	}
	*u = uint32Flag(v)
	return nil
}

// sizeOrOffFlag is a size where 0 turns the feature off.
type sizeOrOffFlag uint32

func (u *sizeOrOffFlag) String() string { return fmt.Sprint(uint32(*u)) }
func (u *sizeOrOffFlag) Type() string   { return "uint32" }

func (u *sizeOrOffFlag) Set(s string) error {
	if s == "0" {
		*u = 0
		return nil
	}
	return (*uint32Flag)(u).Set(s)
}
