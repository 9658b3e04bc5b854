// Package loader loads servicepath's BPF objects with their runtime
// settings, pinning maps so that a restarted servicepath keeps its flows.
package loader

import (
	"errors"
	"fmt"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/maglev"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/mounts"
)

// NoBackendAction is what a service without backends does to new flows.
type NoBackendAction uint32

const (
	// Reject answers with ICMP/ICMPv6 port unreachable, as kube-proxy does.
	Reject NoBackendAction = 0
	// Drop drops silently.
	Drop NoBackendAction = 1
)

// ParseNoBackendAction reads the CLI spelling.
func ParseNoBackendAction(s string) (NoBackendAction, error) {
	switch s {
	case "reject":
		return Reject, nil
	case "drop":
		return Drop, nil
	}
	return 0, fmt.Errorf("no-backend action %q: want reject or drop", s)
}

// HostRouting is how what pods send is routed on the node.
type HostRouting string

const (
	// HostRoutingAuto is BPF where the kernel has the helpers, else the
	// upper stack.
	HostRoutingAuto HostRouting = ""
	// HostRoutingStack leaves routing to the node's upper stack.
	HostRoutingStack HostRouting = "stack"
	// HostRoutingBPF routes in BPF: bpf_redirect_peer into local pods,
	// bpf_fib_lookup + bpf_redirect_neigh off the node (bpf/lib/fib.h).
	// It applies to pods registered in the endpoints map (Datapath.Endpoints).
	HostRoutingBPF HostRouting = "bpf"
)

// ParseHostRouting reads the CLI spelling.
func ParseHostRouting(s string) (HostRouting, error) {
	switch h := HostRouting(s); h {
	case HostRoutingStack, HostRoutingBPF:
		return h, nil
	case "auto":
		return HostRoutingAuto, nil
	}
	return "", fmt.Errorf("host routing %q: want auto, stack or bpf", s)
}

// ProbeHostRouting reports whether the kernel has what BPF host routing
// needs in tc programs; an error wrapping ebpf.ErrNotSupported when not.
func ProbeHostRouting() error {
	for _, h := range []struct {
		name string
		fn   asm.BuiltinFunc
	}{{"bpf_fib_lookup", asm.FnFibLookup}, {"bpf_redirect_neigh", asm.FnRedirectNeigh}, {"bpf_redirect_peer", asm.FnRedirectPeer}} {
		if err := features.HaveProgramHelper(ebpf.SchedCLS, h.fn); err != nil {
			return fmt.Errorf("BPF host routing needs %s: %w", h.name, err)
		}
	}
	return nil
}

// Config holds load-time settings.
type Config struct {
	// PinPath is a directory on bpffs (mounted there if absent) where maps
	// are pinned and re-used by later loads. Empty: nothing is pinned.
	PinPath string

	ServiceMapSize uint32
	BackendMapSize uint32
	CTMapSize      uint32
	// CTNoCommonLRU gives sp_ct one LRU list per CPU (BPF_F_NO_COMMON_LRU)
	// instead of one shared list: no cross-CPU lock on insert, but each CPU
	// evicts only from its own max/ncpus share (scenarios/lruscale measures
	// both). Changing it needs an unload, like a size.
	CTNoCommonLRU bool
	// CTNorthSouthMapSize sizes the north-south conntrack zone, sp_ct_ns.
	// The node-device objects get it in place of sp_ct, and every
	// north-south flow is tracked by them alone (bpf/lib/ct_maps.h), so a
	// flood of new north-south flows evicts only north-south entries. It
	// costs a second preallocated map. 0: one map shared by both, as before
	// zones. Turning zones on or off, like a size, needs an unload.
	CTNorthSouthMapSize uint32

	NoBackend NoBackendAction

	CTTCPSyn         time.Duration
	CTTCPEstablished time.Duration
	CTTCPClose       time.Duration
	CTNonTCP         time.Duration

	// SockLBHostOnly limits socket-level load balancing to the netns the
	// loader runs in (the host's); pods then use the per-packet path, for
	// sidecars that must see the VIP on the wire.
	SockLBHostOnly bool

	// HostRouting selects how pods' traffic is routed; Auto probes.
	HostRouting HostRouting

	// NATMapSize bounds sp_nat: two entries per SNATed north-south flow.
	NATMapSize uint32
	// NATPortMin and NATPortMax are the ports SNAT takes on the node's
	// address. The default stays above Linux's default ephemeral range,
	// so SNAT never takes the port of a node socket's connection.
	NATPortMin, NATPortMax uint16

	// HairpinIPv4 and HairpinIPv6 are the source a pod's packet gets when
	// its service flow was sent to the pod itself, so the reply comes back
	// through the datapath (bpf/lib/config.h says why these defaults). Each
	// must be an address no pod owns that every pod routes out of its
	// device: a cluster using one of them picks another.
	HairpinIPv4, HairpinIPv6 netip.Addr

	// XDP loads the node-device ingress path for XDP too (bpf_xdp.c,
	// Datapath.XDPFromNetdev) where the kernel can run it (ProbeXDP). Off
	// by default: it costs another large program to verify.
	XDP bool

	// MaglevTableSize is the slots of each Maglev service's lookup table:
	// a prime from 251 to 131071, well above the backends a Maglev service
	// has (its disruption on a change grows as size/backends shrinks).
	// maglev.Small (16381, the default) and maglev.Large (65521) are the
	// documented choices. Changing it needs an unload, like a size.
	MaglevTableSize uint32

	// SockState is where the socket hooks keep each socket's reverse
	// translation: SockStateMap ("", the default), SockStateStorage, or
	// SockStateAuto (storage where the kernel has it). Switching on a
	// running node leaves sockets opened before it unrewritten.
	SockState SockState
	// SockRevNATMapSize bounds sp_sock_revnat, which map mode fills with
	// one entry per socket and backend it translated.
	SockRevNATMapSize uint32
}

// The hairpin addresses' defaults: Cilium's for IPv4, the discard prefix
// (RFC 6666) for IPv6, where a link-local one would be answered from the
// pod's link-local address.
var (
	DefaultHairpinIPv4 = netip.MustParseAddr("169.254.42.1")
	DefaultHairpinIPv6 = netip.MustParseAddr("100::1")
)

// DefaultConfig has the sizes and Cilium's CT lifetimes. Zones are
// on: the north-south zone is sized like sp_nat, which bounds SNATed flows
// at the same 64Ki (two entries each).
func DefaultConfig() Config {
	return Config{
		ServiceMapSize:      65536,
		BackendMapSize:      65536,
		CTMapSize:           512 * 1024,
		CTNorthSouthMapSize: 128 * 1024,
		SockRevNATMapSize:   256 * 1024,
		NATMapSize:          128 * 1024,
		NATPortMin:          61000,
		NATPortMax:          65535,
		HairpinIPv4:         DefaultHairpinIPv4,
		HairpinIPv6:         DefaultHairpinIPv6,
		MaglevTableSize:     maglev.Small,
		NoBackend:           Reject,
		CTTCPSyn:            60 * time.Second,
		CTTCPEstablished:    6 * time.Hour,
		CTTCPClose:          10 * time.Second,
		CTNonTCP:            60 * time.Second,
	}
}

// Validate checks the settings without touching the kernel, so a caller
// can refuse bad input before it changes anything.
func (c Config) Validate() error {
	for _, s := range []struct {
		name string
		v    uint32
	}{{"service map size", c.ServiceMapSize}, {"backend map size", c.BackendMapSize}, {"conntrack map size", c.CTMapSize}, {"socket reverse-NAT map size", c.SockRevNATMapSize}, {"NAT map size", c.NATMapSize}} {
		if s.v == 0 {
			return fmt.Errorf("%s must be > 0", s.name)
		}
	}
	if c.NATPortMin == 0 || c.NATPortMin > c.NATPortMax {
		return fmt.Errorf("SNAT port range %d-%d: want 1 <= min <= max", c.NATPortMin, c.NATPortMax)
	}
	if a := c.HairpinIPv4; !a.Is4() || a.IsUnspecified() || a.IsMulticast() || a.IsLoopback() {
		return fmt.Errorf("hairpin IPv4 address %s: want a unicast IPv4 address no pod owns", a)
	}
	if a := c.HairpinIPv6; !a.Is6() || a.Is4In6() || a.Zone() != "" || a.IsUnspecified() || a.IsMulticast() || a.IsLoopback() {
		return fmt.Errorf("hairpin IPv6 address %s: want a unicast IPv6 address no pod owns", a)
	}
	if n := c.MaglevTableSize; n < 251 || n > 131071 || !big.NewInt(int64(n)).ProbablyPrime(20) {
		return fmt.Errorf("Maglev table size %d: want a prime from 251 to 131071 (16381 or 65521)", n)
	}
	switch c.HostRouting {
	case HostRoutingAuto, HostRoutingStack, HostRoutingBPF:
	default:
		return fmt.Errorf("unknown host routing %q", c.HostRouting)
	}
	if !c.SockState.valid() {
		return fmt.Errorf("unknown socket state %q", c.SockState)
	}
	if c.NoBackend != Reject && c.NoBackend != Drop {
		return fmt.Errorf("unknown no-backend action %d", c.NoBackend)
	}
	for _, l := range []struct {
		name string
		d    time.Duration
	}{{"TCP SYN lifetime", c.CTTCPSyn}, {"TCP established lifetime", c.CTTCPEstablished}, {"TCP close lifetime", c.CTTCPClose}, {"non-TCP lifetime", c.CTNonTCP}} {
		if l.d < time.Second || l.d > time.Duration(1<<32-1)*time.Second {
			return fmt.Errorf("%s %s out of range (1s to 2^32-1 s)", l.name, l.d)
		}
	}
	return nil
}

// SockHook is one cgroup socket hook and its program.
type SockHook struct {
	Name   string
	Attach ebpf.AttachType
	Prog   *ebpf.Program
}

// Datapath is a loaded set of programs and their maps.
type Datapath struct {
	Maps    *maps.Maps
	FromPod *ebpf.Program
	ToPod   *ebpf.Program
	// SockHooks translate service addresses at the socket (cgroup hooks).
	SockHooks []SockHook
	// HostRouting is the mode in effect (Auto resolved by probing).
	HostRouting HostRouting
	// Endpoints lists the node's local pods for BPF host routing
	// (datapath/endpoints).
	Endpoints *ebpf.Map
	// FromNetdev and ToNetdev are the node-device programs (north-south
	// load balancing): tc ingress and egress of the node's own devices.
	FromNetdev *ebpf.Program
	ToNetdev   *ebpf.Program
	// XDPFromNetdev is the node-device ingress path at XDP (bpf_xdp.c),
	// ahead of FromNetdev, which must stay attached for what it passes
	// on. Nil unless Config.XDP; nil too when the kernel cannot run it,
	// and XDPMissing says why.
	XDPFromNetdev *ebpf.Program
	XDPMissing    error
	lxc           LxcObjects
	sock          SockObjects
	host          HostObjects
	xdp           XdpObjects
	ctNS          *ebpf.Map
	PinnedAt      string
}

// Load verifies and loads the programs with cfg applied. The objects
// share their maps: the pod-device object creates (or re-uses the pinned)
// maps, and the socket and node-device objects are given the same ones.
func Load(cfg Config) (*Datapath, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("load config: %w", err)
	}
	routing, err := cfg.hostRouting()
	if err != nil {
		return nil, err
	}
	specs, err := cfg.objectSpecs(routing)
	if err != nil {
		return nil, err
	}
	var opts ebpf.CollectionOptions
	if cfg.PinPath == "" {
		for _, spec := range specs.all() {
			for _, m := range spec.Maps {
				m.Pinning = ebpf.PinNone
			}
		}
	} else {
		if err := mounts.EnsureBPFFS(cfg.PinPath); err != nil {
			return nil, err
		}
		opts.Maps.PinPath = cfg.PinPath
	}
	if err := cfg.checkPinnedZones(); err != nil {
		return nil, loadError(cfg, err)
	}
	dp := &Datapath{HostRouting: routing, XDPMissing: specs.xdpMissing, PinnedAt: cfg.PinPath}
	if err := dp.load(cfg, specs, opts); err != nil {
		dp.Close()
		return nil, loadError(cfg, err)
	}
	return dp, nil
}

// objectSpecs are the BPF objects of a load, sized and configured.
type objectSpecs struct {
	lxc, sock, host *ebpf.CollectionSpec
	// xdp is nil when not asked for or, xdpMissing says why, when the
	// kernel cannot run it: north-south then runs in tc alone.
	xdp        *ebpf.CollectionSpec
	xdpMissing error
}

func (o *objectSpecs) all() []*ebpf.CollectionSpec {
	specs := []*ebpf.CollectionSpec{o.lxc, o.sock, o.host}
	if o.xdp != nil {
		specs = append(specs, o.xdp)
	}
	return specs
}

// objectSpecs reads the objects and gives them cfg's map sizes and knobs.
func (c Config) objectSpecs(routing HostRouting) (*objectSpecs, error) {
	knobs, err := c.knobs()
	if err != nil {
		return nil, err
	}
	knobs["cfg_host_routing"] = uint32(0)
	if routing == HostRoutingBPF {
		knobs["cfg_host_routing"] = uint32(1)
	}
	var o objectSpecs
	for _, x := range []struct {
		spec **ebpf.CollectionSpec
		read func() (*ebpf.CollectionSpec, error)
	}{{&o.lxc, LoadLxc}, {&o.sock, LoadSock}, {&o.host, LoadHost}} {
		if *x.spec, err = x.read(); err != nil {
			return nil, fmt.Errorf("read BPF object: %w", err)
		}
	}
	if c.XDP {
		o.xdpMissing = ProbeXDP()
		switch {
		case o.xdpMissing == nil:
			if o.xdp, err = LoadXdp(); err != nil {
				return nil, fmt.Errorf("read BPF object: %w", err)
			}
		case !errors.Is(o.xdpMissing, ebpf.ErrNotSupported):
			return nil, fmt.Errorf("probe XDP: %w", o.xdpMissing)
		}
	}
	for _, spec := range o.all() {
		c.sizeMaps(spec)
		for name, v := range knobs {
			if spec.Variables[name] == nil {
				continue // a knob this object's code never reads
			}
			if err := spec.Variables[name].Set(v); err != nil {
				return nil, fmt.Errorf("set %s: %w", name, err)
			}
		}
	}
	return &o, nil
}

// load loads the objects into d, the later ones sharing the maps they
// declare with the first (whether or not they are pinned), and takes out
// the handles. On error the caller closes d.
func (d *Datapath) load(cfg Config, specs *objectSpecs, opts ebpf.CollectionOptions) error {
	if err := specs.lxc.LoadAndAssign(&d.lxc, &opts); err != nil {
		return err
	}
	shared := objectMaps(&d.lxc.LxcMaps)
	opts.MapReplacements = declared(specs.sock, shared)
	if err := specs.sock.LoadAndAssign(&d.sock, &opts); err != nil {
		return err
	}
	opts.MapReplacements = declared(specs.host, shared)
	// Every node-device object (bpf_host.c, and the XDP one) gets the
	// north-south zone as its sp_ct.
	if nsSpec := cfg.ctZoneSpec(specs.host); nsSpec != nil {
		var err error
		if d.ctNS, err = ebpf.NewMapWithOptions(nsSpec, opts.Maps); err != nil {
			return fmt.Errorf("north-south conntrack zone %s: %w", maps.CTNSName, err)
		}
		opts.MapReplacements[maps.CTName] = d.ctNS
	}
	if err := specs.host.LoadAndAssign(&d.host, &opts); err != nil {
		return err
	}
	if specs.xdp != nil {
		if err := d.loadXDP(specs.xdp, specs.host, opts); err != nil {
			return err
		}
	}
	// Every object's maps; the first's sp_ct (east-west) over the node
	// devices' (the north-south zone, when zones are on).
	all := objectMaps(&d.host.HostMaps)
	for _, m := range []map[string]*ebpf.Map{objectMaps(&d.sock.SockMaps), shared} {
		for name, mp := range m {
			all[name] = mp
		}
	}
	if d.ctNS != nil {
		all[maps.CTNSName] = d.ctNS
	}
	var err error
	if d.Maps, err = maps.FromObjects(all); err != nil {
		return err
	}
	d.Endpoints = d.lxc.SpEndpoints
	d.FromPod = d.lxc.SpFromPod
	d.ToPod = d.lxc.SpToPod
	d.FromNetdev = d.host.SpFromNetdev
	d.ToNetdev = d.host.SpToNetdev
	d.XDPFromNetdev = d.xdp.SpXdpFromNetdev
	p := d.sock.SockPrograms
	d.SockHooks = []SockHook{
		{"connect4", ebpf.AttachCGroupInet4Connect, p.SpConnect4},
		{"connect6", ebpf.AttachCGroupInet6Connect, p.SpConnect6},
		{"sendmsg4", ebpf.AttachCGroupUDP4Sendmsg, p.SpSendmsg4},
		{"sendmsg6", ebpf.AttachCGroupUDP6Sendmsg, p.SpSendmsg6},
		{"recvmsg4", ebpf.AttachCGroupUDP4Recvmsg, p.SpRecvmsg4},
		{"recvmsg6", ebpf.AttachCGroupUDP6Recvmsg, p.SpRecvmsg6},
		{"getpeername4", ebpf.AttachCgroupInet4GetPeername, p.SpGetpeername4},
		{"getpeername6", ebpf.AttachCgroupInet6GetPeername, p.SpGetpeername6},
		{"post_bind4", ebpf.AttachCGroupInet4PostBind, p.SpPostBind4},
		{"post_bind6", ebpf.AttachCGroupInet6PostBind, p.SpPostBind6},
	}
	return nil
}

// declared are the maps of loaded that spec declares too.
func declared(spec *ebpf.CollectionSpec, loaded map[string]*ebpf.Map) map[string]*ebpf.Map {
	out := map[string]*ebpf.Map{}
	for name := range spec.Maps {
		if m, ok := loaded[name]; ok {
			out[name] = m
		}
	}
	return out
}

// ctZoneSpec is the north-south zone: sp_ct's spec under its own name
// and size, pinned by that name. The node-device object's sp_ct takes the
// same size, since a replacement map must match its spec. Nil with zones
// off.
func (c Config) ctZoneSpec(host *ebpf.CollectionSpec) *ebpf.MapSpec {
	if c.CTNorthSouthMapSize == 0 {
		return nil
	}
	ct := host.Maps[maps.CTName]
	ct.MaxEntries = c.CTNorthSouthMapSize
	ns := ct.Copy()
	ns.Name = maps.CTNSName
	return ns
}

// checkPinnedZones refuses to turn zones on or off over pinned maps: the
// node-device programs would look for established north-south flows in
// the other map and break them.
func (c Config) checkPinnedZones() error {
	if c.PinPath == "" {
		return nil
	}
	if _, err := os.Stat(filepath.Join(c.PinPath, maps.CTName)); err != nil {
		return nil // nothing pinned yet
	}
	_, err := os.Stat(filepath.Join(c.PinPath, maps.CTNSName))
	switch pinned := err == nil; {
	case c.CTNorthSouthMapSize > 0 && !pinned:
		return fmt.Errorf("conntrack zones asked for (a %d-entry north-south zone), but the pinned maps have one shared conntrack map: %w",
			c.CTNorthSouthMapSize, ebpf.ErrMapIncompatible)
	case c.CTNorthSouthMapSize == 0 && pinned:
		return fmt.Errorf("one shared conntrack map asked for, but the pinned maps have a north-south zone (%s): %w",
			maps.CTNSName, ebpf.ErrMapIncompatible)
	}
	return nil
}

func (c Config) sizeMaps(spec *ebpf.CollectionSpec) {
	for name, size := range map[string]uint32{
		maps.ServicesName:     c.ServiceMapSize,
		maps.SvcMetaName:      c.ServiceMapSize,
		maps.FrontendAddrName: c.ServiceMapSize,
		maps.BackendsName:     c.BackendMapSize,
		maps.CTName:           c.CTMapSize,
		maps.SockRevName:      c.SockRevNATMapSize,
		maps.NATName:          c.NATMapSize,
	} {
		if m, ok := spec.Maps[name]; ok {
			m.MaxEntries = size
		}
	}
	if m, ok := spec.Maps[maps.MaglevName]; ok {
		m.ValueSize = 4 * c.MaglevTableSize // backend ids, read with cfg_maglev_size
	}
	if m, ok := spec.Maps[maps.CTName]; ok && c.CTNoCommonLRU {
		m.Flags |= unix.BPF_F_NO_COMMON_LRU
	}
}

// knobs are the volatile const values of bpf/lib/config.h, some of them
// probed from the running kernel.
func (c Config) knobs() (map[string]any, error) {
	haveSetRetval := uint32(1)
	if err := ProbeSetRetval(); errors.Is(err, ebpf.ErrNotSupported) {
		haveSetRetval = 0
	} else if err != nil {
		return nil, fmt.Errorf("probe bpf_set_retval: %w", err)
	}
	// The loader runs in the host netns. Without the cookie the hooks cannot
	// tell the host from a pod: loopback NodePort and bind protection are
	// then off, and the host-only mode cannot work at all.
	hostCookie, err := netnsCookie()
	if err != nil && c.SockLBHostOnly {
		return nil, fmt.Errorf("socket-LB in the host netns only needs this netns' cookie (SO_NETNS_COOKIE, Linux 5.14+): %w", err)
	}
	// Socket storage also keeps unconnected UDP on one backend per
	// destination in map mode; without it (before 5.10) each datagram is
	// balanced on its own.
	storage := ProbeSockStorage()
	if storage != nil && !errors.Is(storage, ebpf.ErrNotSupported) {
		return nil, fmt.Errorf("probe socket storage: %w", storage)
	}
	sockState, err := c.sockState(storage)
	if err != nil {
		return nil, err
	}
	haveStorage := uint32(0)
	if storage == nil {
		haveStorage = 1
	}
	var hostOnly uint32
	if c.SockLBHostOnly {
		hostOnly = 1
	}
	return map[string]any{
		"cfg_no_backend_action":    uint32(c.NoBackend),
		"cfg_ct_tcp_syn_s":         uint32(c.CTTCPSyn / time.Second),
		"cfg_ct_tcp_established_s": uint32(c.CTTCPEstablished / time.Second),
		"cfg_ct_tcp_close_s":       uint32(c.CTTCPClose / time.Second),
		"cfg_ct_nontcp_s":          uint32(c.CTNonTCP / time.Second),
		"cfg_have_set_retval":      haveSetRetval,
		"cfg_sock_lb_host_only":    hostOnly,
		"cfg_host_netns_cookie":    hostCookie,
		"cfg_sock_state":           sockState.knob(),
		"cfg_have_sk_storage":      haveStorage,
		"cfg_nat_port_min":         uint32(c.NATPortMin),
		"cfg_nat_port_max":         uint32(c.NATPortMax),
		"cfg_maglev_size":          c.MaglevTableSize,
		"cfg_hairpin_ipv4":         c.HairpinIPv4.As4(),
		"cfg_hairpin_ipv6":         c.HairpinIPv6.As16(),
	}, nil
}

// ProbeSetRetval reports whether the socket hooks can call bpf_set_retval
// (5.19+); an error wrapping ebpf.ErrNotSupported when not. It loads the
// call the way the hooks make it, with a scalar argument:
// features.HaveProgramHelper's probe passes the context instead, which
// newer verifiers reject (7.2: "R1 is not a scalar"), turning a present
// helper into an error.
func ProbeSetRetval() error {
	for _, p := range []struct {
		typ    ebpf.ProgramType
		attach ebpf.AttachType
	}{{ebpf.CGroupSockAddr, ebpf.AttachCGroupInet4Connect}, {ebpf.CGroupSock, ebpf.AttachCGroupInet4PostBind}} {
		prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
			Type:       p.typ,
			AttachType: p.attach,
			License:    "GPL",
			Instructions: asm.Instructions{
				asm.Mov.Imm(asm.R1, 0),
				asm.FnSetRetval.Call(),
				asm.Mov.Imm(asm.R0, 1),
				asm.Return(),
			},
		})
		var ve *ebpf.VerifierError
		switch {
		case err == nil:
			prog.Close()
		case errors.As(err, &ve) || errors.Is(err, unix.EINVAL):
			return fmt.Errorf("bpf_set_retval in %s programs: %w (%v)", p.typ, ebpf.ErrNotSupported, err)
		default:
			return fmt.Errorf("probe bpf_set_retval in %s programs: %w", p.typ, err)
		}
	}
	return nil
}

// hostRouting resolves the configured mode against the kernel.
func (c Config) hostRouting() (HostRouting, error) {
	if c.HostRouting == HostRoutingStack {
		return HostRoutingStack, nil
	}
	err := ProbeHostRouting()
	switch {
	case err == nil:
		return HostRoutingBPF, nil
	case c.HostRouting == HostRoutingAuto && errors.Is(err, ebpf.ErrNotSupported):
		return HostRoutingStack, nil
	}
	return "", err
}

// netnsCookie is the cookie of the calling thread's network namespace, as
// bpf_get_netns_cookie reports it.
func netnsCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	return unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
}

func loadError(cfg Config, err error) error {
	if errors.Is(err, ebpf.ErrMapIncompatible) {
		return fmt.Errorf("maps pinned under %s were made with other sizes or an older layout: "+
			"load with the same sizes, or `servicepath unload` first (drops tracked flows): %w", cfg.PinPath, err)
	}
	var ve *ebpf.VerifierError
	if errors.As(err, &ve) {
		return fmt.Errorf("BPF verifier rejected the datapath: %+v", ve)
	}
	return fmt.Errorf("load BPF objects: %w", err)
}

func (d *Datapath) closeCTNS() error {
	if d.ctNS == nil {
		return nil
	}
	return d.ctNS.Close()
}

// Close releases file descriptors; pinned maps and attached links stay.
func (d *Datapath) Close() error {
	return errors.Join(d.xdp.Close(), d.host.Close(), d.closeCTNS(), d.sock.Close(), d.lxc.Close())
}
