package bench

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/mounts"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/kubeproxy"
	"github.com/servicepath/servicepath/harness/netperf"
	"github.com/servicepath/servicepath/harness/topology"
)

// Addressing of the benchmark's services: ClusterIPs counted up from
// vipBase (the target is the last), services added by update runs from
// addedBase, all on port 80, backends on backendPort.
var (
	vipBase   = netip.MustParseAddr("10.96.0.1")
	addedBase = netip.MustParseAddr("10.112.0.1")
)

const (
	vipPort     = 80
	backendPort = 8080
)

var backendNames = []string{"backend-1", "backend-2", "backend-3"}

// Op is a control-plane operation on one service.
type Op string

const (
	OpLoad   Op = "load"   // all N services from scratch
	OpAdd    Op = "add"    // one more service
	OpChange Op = "change" // one service's backends (3 -> 2)
	OpRemove Op = "remove" // one service
)

// Ops in the order they are run and reported.
var Ops = []Op{OpLoad, OpAdd, OpChange, OpRemove}

// Contender is one way of implementing services, set up in a topology of
// its own: a client pod, a node netns holding the rules or programs, and
// three backend pods serving new-connection latency requests.
type Contender struct {
	Name string
	// Describe says what it is, for the report.
	Describe string
	// Pending, when set, says why the contender is not run yet; the
	// report lists it with this reason instead of numbers.
	Pending string
	// Floor contenders connect straight to a backend and have no control
	// plane.
	Floor bool
	// Available reports a missing tool.
	Available func() error
	// Setup builds an instance with services (target last) programmed.
	Setup func(ctx context.Context, e *Env, services []kubeproxy.Service) (Instance, error)
	// LoadScratch times loading services into a fresh, empty netns or
	// datapath, apart from the instance.
	LoadScratch func(ctx context.Context, e *Env, services []kubeproxy.Service) (time.Duration, error)
}

// Instance is a contender set up at one N.
type Instance interface {
	// Client is the pod new connections come from; Target where they go.
	Client() *topology.Pod
	Target() netip.AddrPort
	// Loaded is how long the first load of all services took.
	Loaded() time.Duration
	// Apply runs one update (OpAdd, OpChange, OpRemove) on svc.
	Apply(ctx context.Context, op Op, svc kubeproxy.Service) (time.Duration, error)
	Close() error
}

// Env is what contenders share: the CPU everything is pinned to, the map
// sizes and a bpffs for tcx link pins.
type Env struct {
	CPU      int
	MaxN     int
	BPFFS    string
	Progress func(format string, args ...any)
}

// NewEnv mounts a private bpffs under a temporary directory.
func NewEnv(cpu, maxN int) (*Env, error) {
	dir, err := os.MkdirTemp("", "servicepath-bench-bpffs-")
	if err != nil {
		return nil, err
	}
	if err := mounts.EnsureBPFFS(dir); err != nil {
		os.Remove(dir)
		return nil, err
	}
	return &Env{CPU: cpu, MaxN: maxN, BPFFS: dir, Progress: func(string, ...any) {}}, nil
}

// Close unmounts the bpffs (dropping any link pins) and removes it.
func (e *Env) Close() error {
	err := unix.Unmount(e.BPFFS, unix.MNT_DETACH)
	return errors.Join(err, os.Remove(e.BPFFS))
}

// DatapathConfig sizes the maps for the run's largest N, the same at every
// N so only the number of services changes.
func (e *Env) DatapathConfig() loader.Config {
	cfg := loader.DefaultConfig()
	slots := uint32(4*(e.MaxN+64)) + 1024
	cfg.ServiceMapSize = slots
	cfg.BackendMapSize = slots
	return cfg
}

// Contenders lists every contender, in report order. servicepath's
// socket-level load balancing plugs in here once the cgroup hooks exist:
// give it a Setup that attaches them in the cluster's cgroup.
func Contenders() []Contender {
	return []Contender{
		{
			Name: "floor", Floor: true,
			Describe: "no rules at all: the client connects straight to a backend pod",
			Setup:    setupFloor,
		},
		kubeProxyContender("iptables-legacy", kubeproxy.IPTablesLegacy,
			"kube-proxy iptables mode, legacy x_tables backend (iptables-legacy-restore)"),
		kubeProxyContender("iptables-nft", kubeproxy.IPTablesNFT,
			"kube-proxy iptables mode, nf_tables backend (iptables-nft-restore)"),
		kubeProxyContender("nftables", kubeproxy.NFT,
			"kube-proxy nftables mode (nft -f)"),
		{
			Name:        "servicepath-tc",
			Describe:    "servicepath per-packet load balancing at tc on the pod devices (bpf_lxc.c)",
			Setup:       setupServicepathTC,
			LoadScratch: loadScratchServicepath,
		},
		{
			Name:        "servicepath-socket",
			Describe:    "servicepath socket-level load balancing at the cgroup connect hooks (bpf_sock.c)",
			Setup:       setupServicepathSocket,
			LoadScratch: loadScratchServicepath,
		},
	}
}

// cluster is the shared shape: client pod, three backend pods with pinned
// CRR servers, the node between them.
type cluster struct {
	topo    *topology.Topology
	servers []*netperf.Server
	eps     []netip.AddrPort
}

func newCluster(e *Env, name string) (*cluster, error) {
	spec := topology.Spec{Name: name, Pods: []topology.PodSpec{{Name: "client"}}}
	for _, b := range backendNames {
		spec.Pods = append(spec.Pods, topology.PodSpec{Name: b})
	}
	topo, err := topology.New(spec)
	if err != nil {
		return nil, fmt.Errorf("topology %s: %w", name, err)
	}
	c := &cluster{topo: topo}
	for _, b := range backendNames {
		p := topo.Pod(b)
		srv, err := netperf.Listen(p, backendPort, e.CPU, netperf.CRR, 64)
		if err != nil {
			return nil, errors.Join(fmt.Errorf("server in %s: %w", b, err), c.Close())
		}
		c.servers = append(c.servers, srv)
		c.eps = append(c.eps, netip.AddrPortFrom(p.IPv4, backendPort))
	}
	if want := Endpoints(); !slices.Equal(c.eps, want) {
		return nil, errors.Join(fmt.Errorf("backend pods got %v, the services point at %v", c.eps, want), c.Close())
	}
	return c, nil
}

func (c *cluster) Client() *topology.Pod { return c.topo.Pod("client") }

func (c *cluster) Close() error {
	var errs []error
	for _, s := range c.servers {
		errs = append(errs, s.Close())
	}
	return errors.Join(append(errs, c.topo.Close())...)
}

// Endpoints are the backends every benchmark service points at.
func Endpoints() []netip.AddrPort {
	// The topology numbers pods from .10 in spec order: the client,
	// then the backends. newCluster checks this still holds.
	var out []netip.AddrPort
	a := topology.PodCIDRv4.Addr()
	for i := range 10 + len(backendNames) {
		a = a.Next()
		if i >= 10 {
			out = append(out, netip.AddrPortFrom(a, backendPort))
		}
	}
	return out
}

type floor struct{ *cluster }

func setupFloor(_ context.Context, e *Env, _ []kubeproxy.Service) (Instance, error) {
	c, err := newCluster(e, "b-floor")
	if err != nil {
		return nil, err
	}
	return floor{c}, nil
}

func (f floor) Target() netip.AddrPort { return f.eps[0] }
func (f floor) Loaded() time.Duration  { return 0 }
func (f floor) Apply(context.Context, Op, kubeproxy.Service) (time.Duration, error) {
	return 0, errors.New("the floor has no control plane")
}

// generator is the common face of the two kube-proxy generators.
type generator interface {
	full(services []kubeproxy.Service) (string, error)
	Upsert(s kubeproxy.Service) (string, error)
	Delete(key string) (string, error)
}

type iptGen struct{ *kubeproxy.IPTables }

func (g iptGen) full(s []kubeproxy.Service) (string, error) { return g.FullSync(s, true) }

type nftGen struct{ *kubeproxy.NFTables }

func (g nftGen) full(s []kubeproxy.Service) (string, error) { return g.FullSync(s) }

func newGenerator(tool kubeproxy.Tool) generator {
	cfg := kubeproxy.DefaultConfig(topology.PodCIDRv4)
	if tool == kubeproxy.NFT {
		return nftGen{kubeproxy.NewNFTables(cfg)}
	}
	return iptGen{kubeproxy.NewIPTables(cfg)}
}

func kubeProxyContender(name string, tool kubeproxy.Tool, describe string) Contender {
	return Contender{
		Name: name, Describe: describe,
		Available: tool.Available,
		Setup: func(ctx context.Context, e *Env, services []kubeproxy.Service) (Instance, error) {
			c, err := newCluster(e, "b-"+name)
			if err != nil {
				return nil, err
			}
			kp := &kubeProxy{cluster: c, tool: tool, gen: newGenerator(tool), runner: &kubeproxy.Runner{NS: c.topo.Node}}
			text, err := kp.gen.full(services)
			if err == nil {
				kp.loaded, err = kp.runner.Apply(ctx, tool, text)
			}
			if err != nil {
				return nil, errors.Join(err, kp.Close())
			}
			kp.target = netip.AddrPortFrom(services[len(services)-1].ClusterIP, vipPort)
			return kp, nil
		},
		LoadScratch: func(ctx context.Context, e *Env, services []kubeproxy.Service) (time.Duration, error) {
			topo, err := topology.New(topology.Spec{Name: "b-scratch"})
			if err != nil {
				return 0, err
			}
			defer topo.Close()
			r := &kubeproxy.Runner{NS: topo.Node}
			defer r.Close()
			text, err := newGenerator(tool).full(services)
			if err != nil {
				return 0, err
			}
			return r.Apply(ctx, tool, text)
		},
	}
}

type kubeProxy struct {
	*cluster
	tool   kubeproxy.Tool
	gen    generator
	runner *kubeproxy.Runner
	target netip.AddrPort
	loaded time.Duration
}

func (k *kubeProxy) Target() netip.AddrPort { return k.target }
func (k *kubeProxy) Loaded() time.Duration  { return k.loaded }

func (k *kubeProxy) Apply(ctx context.Context, op Op, svc kubeproxy.Service) (time.Duration, error) {
	var text string
	var err error
	switch op {
	case OpAdd, OpChange:
		text, err = k.gen.Upsert(svc)
	case OpRemove:
		text, err = k.gen.Delete(svc.Key())
	default:
		err = fmt.Errorf("op %s", op)
	}
	if err != nil {
		return 0, err
	}
	return k.runner.Apply(ctx, k.tool, text)
}

func (k *kubeProxy) Close() error {
	return errors.Join(k.runner.Close(), k.cluster.Close())
}

// toService converts a kube-proxy service port to servicepath's model.
func toService(s kubeproxy.Service) service.Service {
	out := service.Service{
		Name: s.Namespace + "/" + s.Name, PortName: s.PortName,
		Frontend: service.Frontend{Addr: s.ClusterIP, Port: s.Port, Protocol: service.TCP},
	}
	for _, ep := range s.Endpoints {
		out.Backends = append(out.Backends, service.Backend{Addr: ep.Addr(), Port: ep.Port()})
	}
	return out
}

func toServices(ss []kubeproxy.Service) ([]string, []service.Service) {
	owners := make([]string, len(ss))
	out := make([]service.Service, len(ss))
	for i, s := range ss {
		out[i] = toService(s)
		owners[i] = out[i].Name
	}
	return owners, out
}

type servicepathTC struct {
	*cluster
	dp     *loader.Datapath
	att    *attach.Attacher
	mgr    *service.Manager
	target netip.AddrPort
	loaded time.Duration
	// cgroup holds the socket hooks (socket contender only).
	cgroup string
}

var tcSeq int

func setupServicepathTC(_ context.Context, e *Env, services []kubeproxy.Service) (Instance, error) {
	return setupServicepath(e, services, false)
}

// servicepathSocket is servicepath with only the socket hooks attached:
// the bench joins their cgroup while it measures.
type servicepathSocket struct{ *servicepathTC }

func setupServicepathSocket(_ context.Context, e *Env, services []kubeproxy.Service) (Instance, error) {
	s, err := setupServicepath(e, services, true)
	if err != nil {
		return nil, err
	}
	return servicepathSocket{s}, nil
}

// programmed is an instance whose BPF programs the bench can ask the
// kernel's run-time stats of.
type programmed interface {
	Programs() map[string]*ebpf.Program
}

// Programs are the per-packet programs on the pod devices.
func (s *servicepathTC) Programs() map[string]*ebpf.Program {
	return map[string]*ebpf.Program{"sp_from_pod": s.dp.FromPod, "sp_to_pod": s.dp.ToPod}
}

// Programs are the socket hooks.
func (s servicepathSocket) Programs() map[string]*ebpf.Program {
	progs := map[string]*ebpf.Program{}
	for _, h := range s.dp.SockHooks {
		progs["sp_"+h.Name] = h.Prog
	}
	return progs
}

// cgroupJoiner is an instance whose clients must run in its cgroup.
type cgroupJoiner interface {
	Join() (leave func() error, err error)
}

func (s servicepathSocket) Join() (func() error, error) {
	home, err := mounts.OwnCgroup()
	if err != nil {
		return nil, err
	}
	if err := mounts.JoinCgroup(s.cgroup); err != nil {
		return nil, err
	}
	return func() error { return mounts.JoinCgroup(home) }, nil
}

// setupServicepath loads the datapath, attaches it per packet to the pod
// devices or at the socket hooks of a child cgroup, and programs services.
func setupServicepath(e *Env, services []kubeproxy.Service, socket bool) (*servicepathTC, error) {
	c, err := newCluster(e, "b-sp-tc")
	if err != nil {
		return nil, err
	}
	dp, err := loader.Load(e.DatapathConfig())
	if err != nil {
		return nil, errors.Join(fmt.Errorf("load datapath: %w", err), c.Close())
	}
	tcSeq++
	s := &servicepathTC{cluster: c, dp: dp, att: &attach.Attacher{LinkDir: filepath.Join(e.BPFFS, fmt.Sprintf("links-%d", tcSeq))}}
	if socket {
		err = s.attachSocket()
	} else {
		err = c.topo.Node.Do(func() error {
			for _, p := range c.topo.Pods {
				if _, err := s.att.Attach(dp.FromPod, p.HostIf, attach.Ingress); err != nil {
					return err
				}
				if _, err := s.att.Attach(dp.ToPod, p.HostIf, attach.Egress); err != nil {
					return err
				}
			}
			return nil
		})
	}
	if err == nil {
		s.mgr, err = service.NewManager(dp.Maps)
	}
	if err == nil {
		owners, svcs := toServices(services)
		start := time.Now()
		err = s.mgr.Apply(owners, svcs)
		s.loaded = time.Since(start)
	}
	if err != nil {
		return nil, errors.Join(err, s.Close())
	}
	s.target = netip.AddrPortFrom(services[len(services)-1].ClusterIP, vipPort)
	return s, nil
}

func (s *servicepathTC) attachSocket() error {
	root, err := mounts.Cgroup2Root()
	if err != nil {
		return err
	}
	if s.cgroup, err = os.MkdirTemp(root, "servicepath-bench-"); err != nil {
		return err
	}
	for _, h := range s.dp.SockHooks {
		if err := s.att.AttachCgroup(h.Prog, s.cgroup, h.Name, h.Attach); err != nil {
			return err
		}
	}
	return nil
}

func (s *servicepathTC) Target() netip.AddrPort { return s.target }
func (s *servicepathTC) Loaded() time.Duration  { return s.loaded }

func (s *servicepathTC) Apply(_ context.Context, op Op, svc kubeproxy.Service) (time.Duration, error) {
	start := time.Now()
	var err error
	switch op {
	case OpAdd, OpChange:
		err = s.mgr.Upsert(toService(svc))
	case OpRemove:
		err = s.mgr.Delete(toService(svc).Frontend)
	default:
		err = fmt.Errorf("op %s", op)
	}
	return time.Since(start), err
}

func (s *servicepathTC) Close() error {
	// Pinned links go with the bpffs directory; the devices go with the
	// topology.
	errs := []error{os.RemoveAll(s.att.LinkDir), s.cluster.Close()}
	if s.dp != nil {
		errs = append(errs, s.dp.Close())
	}
	if s.cgroup != "" {
		errs = append(errs, os.Remove(s.cgroup))
	}
	return errors.Join(errs...)
}

func loadScratchServicepath(_ context.Context, e *Env, services []kubeproxy.Service) (time.Duration, error) {
	dp, err := loader.Load(e.DatapathConfig())
	if err != nil {
		return 0, err
	}
	defer dp.Close()
	mgr, err := service.NewManager(dp.Maps)
	if err != nil {
		return 0, err
	}
	owners, svcs := toServices(services)
	start := time.Now()
	err = mgr.Apply(owners, svcs)
	return time.Since(start), err
}
