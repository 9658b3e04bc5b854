// Package sockstate asks where the socket hooks keep a socket's
// reverse translation, sp_sock_revnat (an LRU keyed by socket cookie) or
// the socket's own BPF storage (loader.SockState). It measures what each
// costs per connection (CRR at several concurrencies, both modes in one
// run), what each costs in memory, and what each loses when more sockets
// are alive than the LRU holds.
package sockstate

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/cluster"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/netperf"
	"github.com/servicepath/servicepath/harness/stats"
	"github.com/servicepath/servicepath/harness/testenv"
)

// Ports of the bed's services and of the CRR servers behind them.
const (
	crrPort = 9000
	vipTCP  = 80
	vipUDP  = 53
)

// VIP is the bed's service address (TCP to the CRR servers, UDP to the
// cluster's echo servers).
var VIP = netip.MustParseAddr("198.19.0.70")

// Bed is one cluster with socket LB and the socket hooks of both modes
// loaded over the same pinned maps, so a round switches mode by swapping
// the cgroup's programs (link update) and nothing else.
type Bed struct {
	C        *cluster.Cluster
	hooks    map[loader.SockState][]loader.SockHook
	attacher *attach.Attacher
	// Direct are the CRR servers' own addresses, for connections the hooks
	// look up and leave alone.
	Direct []netip.AddrPort
}

// NewBed builds the bed, with sp_sock_revnat sized revnatSize; CRR servers
// pinned to cpu listen in each backend. Storage mode skips t, naming
// what is missing, on a kernel without it.
func NewBed(t *testing.T, revnatSize uint32, cpu int) *Bed {
	testenv.RequireRoot(t)
	testenv.RequireFeature(t, "socket storage in cgroup sock_addr programs", loader.SockStateMinKernel, loader.ProbeSockStorage())
	size := func(cfg *loader.Config) { cfg.SockRevNATMapSize = revnatSize }
	c := cluster.New(t, cluster.Options{SocketLB: true, Config: size})
	b := &Bed{C: c, hooks: map[loader.SockState][]loader.SockHook{loader.SockStateMap: c.DP.SockHooks},
		attacher: &attach.Attacher{LinkDir: filepath.Join(c.DP.PinnedAt, "links")}}

	cfg := loader.DefaultConfig()
	size(&cfg)
	cfg.PinPath = c.DP.PinnedAt
	cfg.SockState = loader.SockStateStorage
	err := c.Topo.Node.Do(func() error {
		dp, err := loader.Load(cfg)
		if err != nil {
			return err
		}
		t.Cleanup(func() { dp.Close() })
		b.hooks[loader.SockStateStorage] = dp.SockHooks
		return nil
	})
	if err != nil {
		t.Fatalf("load the storage-mode hooks over the same maps: %v", err)
	}

	s := service.Service{Name: "default/crr", Frontend: service.Frontend{Addr: VIP, Port: vipTCP, Protocol: service.TCP}}
	for _, name := range cluster.Backends {
		srv, err := netperf.Listen(c.Topo.Pod(name), crrPort, cpu, netperf.CRR, RequestSize)
		if err != nil {
			t.Fatalf("CRR server in %s: %v", name, err)
		}
		t.Cleanup(func() { srv.Close() })
		addr := c.Addr(name, VIP)
		s.Backends = append(s.Backends, service.Backend{Addr: addr, Port: crrPort})
		b.Direct = append(b.Direct, netip.AddrPortFrom(addr, crrPort))
	}
	// Run-time stats of every program, for the hooks' own cost.
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		t.Fatalf("enable BPF run-time stats: %v", err)
	}
	t.Cleanup(func() { stats.Close() })
	if err := c.Services.Upsert(s); err != nil {
		t.Fatalf("program %s: %v", s.Frontend, err)
	}
	c.Program(t, VIP, vipUDP, service.UDP, cluster.Backends...)
	return b
}

// HookStats is a hook program's run count and total run time (kernel
// BPF stats, on while the bed lives).
func (b *Bed) HookStats(mode loader.SockState, hook string) (ebpf.ProgramStats, error) {
	for _, h := range b.hooks[mode] {
		if h.Name == hook {
			st, err := h.Prog.Stats()
			if err != nil {
				return ebpf.ProgramStats{}, err
			}
			return *st, nil
		}
	}
	return ebpf.ProgramStats{}, fmt.Errorf("no hook %s", hook)
}

// HookNs runs fn and returns the mean run time of mode's hook program
// over the runs fn caused: the hook's own cost, without the stack's.
func (b *Bed) HookNs(mode loader.SockState, hook string, fn func() error) (float64, error) {
	before, err := b.HookStats(mode, hook)
	if err != nil {
		return 0, err
	}
	if err := fn(); err != nil {
		return 0, err
	}
	after, err := b.HookStats(mode, hook)
	if err != nil {
		return 0, err
	}
	runs := after.RunCount - before.RunCount
	if runs == 0 {
		return 0, nil
	}
	return float64((after.Runtime - before.Runtime).Nanoseconds()) / float64(runs), nil
}

// Use puts mode's programs on the bed's cgroup.
func (b *Bed) Use(mode loader.SockState) error {
	for _, h := range b.hooks[mode] {
		if err := b.attacher.AttachCgroup(h.Prog, b.C.Cgroup, h.Name, h.Attach); err != nil {
			return err
		}
	}
	return nil
}

// RevNATEntries counts sp_sock_revnat's entries.
func (b *Bed) RevNATEntries() (int, error) {
	n := 0
	var k, v []byte
	it := b.C.DP.Maps.SockRevNAT.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	return n, it.Err()
}

// ClearRevNAT empties sp_sock_revnat.
func (b *Bed) ClearRevNAT() error { return inject.ClearMap(b.C.DP.Maps.SockRevNAT) }

// FillRevNAT fills sp_sock_revnat to its size with entries of sockets
// that do not exist, as a node's map stands once closed sockets' entries
// have piled up (nothing deletes them): every new connection then evicts.
func (b *Bed) FillRevNAT() error {
	m := b.C.DP.Maps.SockRevNAT
	n := int(m.MaxEntries())
	keys := make([]maps.SockRevNATKey, n)
	vals := make([]maps.SockRevNATValue, n)
	for i := range keys {
		// Cookies from the top half of the space: the kernel counts up from 1.
		keys[i] = maps.SockRevNATKey{Cookie: rand.Uint64() | 1<<63, Addr: maps.Addr{10}, Family: maps.IPv4}
	}
	_, err := m.BatchUpdate(keys, vals, nil)
	return err
}

// RequestSize is the CRR request and response, bytes.
const RequestSize = 64

// CRRResult is one CRR run.
type CRRResult struct {
	Connections int `json:"connections"`
	Errors      int `json:"errors"`
	// NsPerConn is wall time over connections: the inverse of the rate.
	NsPerConn float64 `json:"ns_per_conn"`
	// ClientCPUNsPerConn is the driving thread's CPU time (user+system,
	// where connect's hook runs) over connections.
	ClientCPUNsPerConn float64 `json:"client_cpu_ns_per_conn"`
	// ConnectP50Ns is the median of the connect() syscall alone.
	ConnectP50Ns float64 `json:"connect_p50_ns"`
	// ConnectHookNs is the connect4 program's mean run time (BPF stats).
	ConnectHookNs float64 `json:"connect4_hook_ns"`
}

// CRROptions shape a run.
type CRROptions struct {
	CPU int
	// Concurrency connections are open at any time; each that completes
	// is replaced by a new one, until Warmup+N have completed.
	Concurrency, Warmup, N int
}

// crrConn is one connection of the event loop.
type crrConn struct {
	fd        int
	connected bool
	got       int
}

// CRR drives TCP connect-request-response-close transactions from one
// thread pinned to o.CPU in doer's netns, o.Concurrency at a time, with
// non-blocking sockets and epoll, as a load generator does: connect, send
// RequestSize bytes, read the response and the server's close, close. The
// destination of connection i is dsts[i%len(dsts)].
func CRR(doer netperf.Doer, dsts []netip.AddrPort, o CRROptions) (CRRResult, error) {
	var r CRRResult
	err := netperf.Pinned(doer, o.CPU, func() error {
		epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if err != nil {
			return err
		}
		defer unix.Close(epfd)
		conns := map[int]*crrConn{}
		defer func() {
			for fd := range conns {
				unix.Close(fd)
			}
		}()
		req := make([]byte, RequestSize)
		buf := make([]byte, 4096)
		total := o.Warmup + o.N
		started, done := 0, 0
		var connectNs []float64
		var t0 time.Time
		var cpu0 time.Duration

		// complete counts a connection done; the clock starts after warmup.
		complete := func(failed bool) error {
			done++
			if failed {
				r.Errors++
			}
			if done == o.Warmup {
				t0 = time.Now()
				cpu0, _ = threadCPU()
			}
			if r.Errors > total/10+10 {
				return fmt.Errorf("%d of %d connections failed", r.Errors, done)
			}
			return nil
		}
		start := func() error {
			dst := dsts[started%len(dsts)]
			started++
			fam, sa := unix.AF_INET6, unix.Sockaddr(&unix.SockaddrInet6{Port: int(dst.Port()), Addr: dst.Addr().As16()})
			if dst.Addr().Is4() {
				fam, sa = unix.AF_INET, &unix.SockaddrInet4{Port: int(dst.Port()), Addr: dst.Addr().As4()}
			}
			fd, err := unix.Socket(fam, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("socket: %w", err)
			}
			c0 := time.Now()
			err = unix.Connect(fd, sa)
			if done >= o.Warmup {
				connectNs = append(connectNs, float64(time.Since(c0).Nanoseconds()))
			}
			if err != nil && err != unix.EINPROGRESS {
				unix.Close(fd)
				return complete(true)
			}
			conns[fd] = &crrConn{fd: fd}
			return unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLOUT, Fd: int32(fd)})
		}
		finish := func(c *crrConn, failed bool) error {
			delete(conns, c.fd)
			unix.Close(c.fd)
			if err := complete(failed); err != nil {
				return err
			}
			if started < total {
				return start()
			}
			return nil
		}
		if o.Warmup == 0 {
			t0 = time.Now()
			cpu0, _ = threadCPU()
		}
		events := make([]unix.EpollEvent, 256)
		for done < total {
			if len(conns) == 0 {
				if err := start(); err != nil {
					return err
				}
				continue
			}
			n, err := unix.EpollWait(epfd, events, 5000)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return fmt.Errorf("epoll_wait: %w", err)
			}
			if n == 0 {
				return fmt.Errorf("no progress for 5 s with %d connections open", len(conns))
			}
			for _, ev := range events[:n] {
				c := conns[int(ev.Fd)]
				if c == nil {
					continue
				}
				if !c.connected {
					if v, err := unix.GetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_ERROR); err != nil || v != 0 {
						if err := finish(c, true); err != nil {
							return err
						}
						continue
					}
					c.connected = true
					if w, err := unix.Write(c.fd, req); err != nil || w != len(req) {
						if err := finish(c, true); err != nil {
							return err
						}
						continue
					}
					if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_MOD, c.fd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(c.fd)}); err != nil {
						return err
					}
					continue
				}
				for {
					m, err := unix.Read(c.fd, buf)
					if err == unix.EAGAIN {
						break
					}
					if err != nil || m == 0 {
						// The server closes after its response.
						if err := finish(c, err != nil || c.got < RequestSize); err != nil {
							return err
						}
						break
					}
					c.got += m
				}
			}
		}
		elapsed := time.Since(t0)
		cpu1, _ := threadCPU()
		r.Connections = o.N
		r.NsPerConn = float64(elapsed.Nanoseconds()) / float64(o.N)
		r.ClientCPUNsPerConn = float64((cpu1 - cpu0).Nanoseconds()) / float64(o.N)
		slices.Sort(connectNs)
		r.ConnectP50Ns = stats.Percentile(connectNs, 50)
		return nil
	})
	return r, err
}

func threadCPU() (time.Duration, error) {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		return 0, err
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), nil
}

// PressureResult is one correctness-under-pressure run.
type PressureResult struct {
	Mode    string `json:"mode"`
	Sockets int    `json:"sockets"`
	MapSize int    `json:"revnat_map_size"`
	// NotRewritten counts replies whose source (recvmsg) was not the VIP;
	// PeerNotVIP counts sockets whose getpeername was not the VIP.
	NotRewritten int `json:"replies_not_rewritten"`
	PeerNotVIP   int `json:"getpeername_not_vip"`
	Errors       int `json:"errors"`
	// RevNATEntries is sp_sock_revnat's fill at the end.
	RevNATEntries int `json:"revnat_entries"`
	// Mean run time of the hooks over the run (BPF stats), ns.
	RecvmsgHookNs     float64 `json:"recvmsg4_hook_ns"`
	GetpeernameHookNs float64 `json:"getpeername4_hook_ns"`
}

// Pressure opens n connected UDP sockets to vip from doer's netns, all
// before any talks (long-lived sockets of a busy node), then has each send
// a datagram and read the reply with recvfrom, and asks getpeername.
func Pressure(doer netperf.Doer, vip netip.AddrPort, n int) (PressureResult, error) {
	r := PressureResult{Sockets: n}
	err := doer.Do(func() error {
		fds := make([]int, 0, n)
		defer func() {
			for _, fd := range fds {
				unix.Close(fd)
			}
		}()
		sa := &unix.SockaddrInet4{Port: int(vip.Port()), Addr: vip.Addr().As4()}
		for range n {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("socket %d: %w", len(fds), err)
			}
			fds = append(fds, fd)
			tv := unix.NsecToTimeval((2 * time.Second).Nanoseconds())
			if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
				return err
			}
			if err := unix.Connect(fd, sa); err != nil {
				return fmt.Errorf("connect socket %d: %w", len(fds), err)
			}
		}
		buf := make([]byte, 1024)
		for _, fd := range fds {
			// A datagram lost on a slow guest is sent again, twice at most.
			var from unix.Sockaddr
			var err error = unix.EAGAIN
			for try := 0; try < 3 && (err == unix.EAGAIN || err == unix.EINTR); try++ {
				if _, err = unix.Write(fd, []byte("p")); err == nil {
					_, from, err = unix.Recvfrom(fd, buf, 0)
				}
			}
			if err != nil {
				r.Errors++
				continue
			}
			if !isVIP(from, vip) {
				r.NotRewritten++
			}
			if peer, err := unix.Getpeername(fd); err != nil || !isVIP(peer, vip) {
				r.PeerNotVIP++
			}
		}
		return nil
	})
	return r, err
}

func isVIP(sa unix.Sockaddr, vip netip.AddrPort) bool {
	in, ok := sa.(*unix.SockaddrInet4)
	return ok && netip.AddrPortFrom(netip.AddrFrom4(in.Addr), uint16(in.Port)) == vip
}

// Memory is what each mode costs in kernel memory.
type Memory struct {
	// RevNATMemlock is sp_sock_revnat's memlock at its default size
	// (preallocated: paid whether sockets exist or not), and per entry.
	RevNATEntries     uint32  `json:"revnat_max_entries"`
	RevNATMemlock     uint64  `json:"revnat_memlock_bytes"`
	RevNATPerEntry    float64 `json:"revnat_bytes_per_entry"`
	SockCtxMemlock    uint64  `json:"sock_ctx_memlock_bytes"`
	SockCtxValue      int     `json:"sock_ctx_value_bytes"`
	ElemHeader        int     `json:"storage_elem_header_bytes"`
	LocalStorage      int     `json:"local_storage_bytes"`
	StoragePerSocket  int     `json:"storage_bytes_per_socket"`
	MeasuredPerSocket float64 `json:"measured_slab_bytes_per_socket"`
	MeasuredSockets   int     `json:"measured_sockets"`
	GrewCaches        string  `json:"grew_caches"`
}

// MapMemory reads what the preallocated map costs at its default size:
// the sock object's sp_sock_revnat created alone, and its memlock.
func MapMemory() (Memory, error) {
	var mem Memory
	spec, err := loader.LoadSock()
	if err != nil {
		return mem, err
	}
	for name, dst := range map[string]*uint64{maps.SockRevName: &mem.RevNATMemlock, maps.SockCtxName: &mem.SockCtxMemlock} {
		ms := spec.Maps[name].Copy()
		ms.Pinning = ebpf.PinNone
		m, err := ebpf.NewMap(ms)
		if err != nil {
			return mem, fmt.Errorf("create %s: %w", name, err)
		}
		info, err := m.Info()
		m.Close()
		if err != nil {
			return mem, err
		}
		*dst, _ = info.Memlock()
		if name == maps.SockRevName {
			mem.RevNATEntries = ms.MaxEntries
			mem.RevNATPerEntry = float64(*dst) / float64(ms.MaxEntries)
		} else {
			mem.SockCtxValue = int(ms.ValueSize)
		}
	}
	// What the kernel allocates per socket: an element (header up to its
	// data, then the value) and, for a socket's first storage, struct
	// bpf_local_storage; each rounded up to its kmalloc size class.
	kspec, err := btf.LoadKernelSpec()
	if err != nil {
		return mem, fmt.Errorf("kernel BTF: %w", err)
	}
	var elem, ls *btf.Struct
	if err := kspec.TypeByName("bpf_local_storage_elem", &elem); err != nil {
		return mem, err
	}
	if err := kspec.TypeByName("bpf_local_storage", &ls); err != nil {
		return mem, err
	}
	for _, m := range elem.Members {
		if m.Name == "sdata" {
			// sdata is {smap pointer; data[]}.
			mem.ElemHeader = int(m.Offset.Bytes()) + 8
		}
	}
	mem.LocalStorage = int(ls.Size)
	mem.StoragePerSocket = kmallocClass(mem.ElemHeader+mem.SockCtxValue) + kmallocClass(mem.LocalStorage)
	return mem, nil
}

// kmallocClass is the kmalloc size class n bytes come from.
func kmallocClass(n int) int {
	for _, c := range []int{8, 16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096, 8192} {
		if n <= c {
			return c
		}
	}
	return n
}

// Slab is /proc/slabinfo: bytes in use per cache.
type Slab map[string]int64

// ReadSlab reads /proc/slabinfo (root only).
func ReadSlab() (Slab, error) {
	f, err := os.Open("/proc/slabinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	s := Slab{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 4 || strings.HasPrefix(fs[0], "#") || fs[0] == "slabinfo" {
			continue
		}
		active, err1 := strconv.ParseInt(fs[1], 10, 64)
		size, err2 := strconv.ParseInt(fs[3], 10, 64)
		if err1 != nil || err2 != nil {
			continue
		}
		s[fs[0]] = active * size
	}
	return s, sc.Err()
}

// Delta is after − before per cache, and its sum over the caches BPF
// storage elements come from: the memcg-accounted kmalloc caches
// (kmalloc-cg-*, 5.14+), else every kmalloc cache. Other caches only add
// slab-granularity noise.
func (after Slab) Delta(before Slab) (map[string]int64, int64) {
	prefix := "kmalloc-"
	for k := range after {
		if strings.HasPrefix(k, "kmalloc-cg-") {
			prefix = "kmalloc-cg-"
			break
		}
	}
	d := map[string]int64{}
	var sum int64
	for k, v := range after {
		if x := v - before[k]; x != 0 {
			d[k] = x
			if strings.HasPrefix(k, prefix) {
				sum += x
			}
		}
	}
	return d, sum
}

// HoldSockets opens n connected UDP sockets to vip from doer's netns,
// runs fn while they are open, and closes them.
func HoldSockets(doer netperf.Doer, vip netip.AddrPort, n int, fn func() error) error {
	return doer.Do(func() error {
		fds := make([]int, 0, n)
		defer func() {
			for _, fd := range fds {
				unix.Close(fd)
			}
		}()
		sa := &unix.SockaddrInet4{Port: int(vip.Port()), Addr: vip.Addr().As4()}
		for range n {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			fds = append(fds, fd)
			if err := unix.Connect(fd, sa); err != nil {
				return err
			}
		}
		return fn()
	})
}
