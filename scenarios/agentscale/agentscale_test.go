// Package agentscale runs `servicepath agent`, the built binary in a
// process of its own, against a real kube-apiserver holding many Services
// (100,000 with 300,000 endpoints in the full form). It measures the time
// to the first full sync, the agent's memory, and the network-programming
// latency of endpoint changes, from the API write to the BPF map holding
// the new backend, seen in the pinned map itself. Beside it, kube-proxy's
// nftables ruleset as harness/kubeproxy rebuilds it is applied with `nft
// -f` at the sizes that fit.
package agentscale

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"math"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/servicepath/servicepath/bench/plot"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/harness/kubeapi"
	"github.com/servicepath/servicepath/harness/kubeproxy"
	"github.com/servicepath/servicepath/harness/procs"
	"github.com/servicepath/servicepath/harness/stats"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/harness/topology"
	"github.com/servicepath/servicepath/scenarios"
)

var (
	fullServices = flag.Int("agentscale.services", 100000, "Services of the full form (3 endpoints each)")
	loadBudget   = flag.Duration("agentscale.load-budget", 10*time.Minute, "creating the full form's objects stops here; the run goes on with what was created")
	nftBudget    = flag.Duration("agentscale.nft-budget", 150*time.Second, "nft loads projected past this are not run")
	fullChanges  = flag.Int("agentscale.changes", 200, "endpoint changes of the full form")
	fullRate     = flag.Float64("agentscale.rate", 5, "endpoint changes per second of the full form")
	fullWorkers  = flag.Int("agentscale.workers", 32, "parallel creators of the full form's load")
	binFlag      = flag.String("agentscale.bin", "", "servicepath binary to run (default: built from this tree)")
)

const (
	endpointsPer = 3
	svcPort      = 80
	backendPort  = 8080
	namespace    = "scale"
	// pollEvery is how often the maps are read for awaited changes: the
	// resolution of the latency seen in the map.
	pollEvery = 2 * time.Millisecond
)

// Options shape one run.
type Options struct {
	Services int
	Changes  int
	// Rate is endpoint changes per second, each to a different Service.
	Rate    float64
	Workers int // parallel creators during the load
	// NFTSizes are the ruleset sizes tried, ascending.
	NFTSizes   []int
	NFTPerSize int // one-service updates timed at each size
}

// Result is one run.
type Result struct {
	Services  int `json:"services"`
	Endpoints int `json:"endpoints"`
	Load      struct {
		Seconds       float64 `json:"seconds"`
		ObjectsPerSec float64 `json:"objects_per_second"`
		Workers       int     `json:"workers"`
		Truncated     bool    `json:"truncated"` // the load budget ran out
	} `json:"load"`
	Sync struct {
		// From exec to the datapath loaded, to the informers' caches
		// complete, and to /readyz 200.
		LoadedSeconds float64 `json:"datapath_loaded_seconds"`
		CachesSeconds float64 `json:"caches_seconds"`
		ReadySeconds  float64 `json:"ready_seconds"`
		// The agent's own sync histogram: syncs run by then and their time.
		Syncs         float64 `json:"syncs"`
		SyncSeconds   float64 `json:"sync_seconds"`
		Programmed    float64 `json:"services_programmed"`
		Frontends     float64 `json:"frontends_programmed"`
		Backends      float64 `json:"backends_programmed"`
		WrongInMaps   int     `json:"wrong_in_maps"`
		VerifySeconds float64 `json:"verify_seconds"`
	} `json:"first_sync"`
	Memory struct {
		AfterSyncRSSKiB    int `json:"after_sync_rss_kib"`
		AfterSyncHWMKiB    int `json:"after_sync_hwm_kib"`
		AfterChangesRSSKiB int `json:"after_changes_rss_kib"`
		AfterChangesHWMKiB int `json:"after_changes_hwm_kib"`
	} `json:"agent_memory"`
	Changes struct {
		Sent       int       `json:"sent"`
		Observed   int       `json:"observed"`
		RatePerSec float64   `json:"rate_per_second"`
		Latency    Quantiles `json:"latency_ms"`   // API write sent -> new backend in the map
		APICall    Quantiles `json:"api_call_ms"`  // the Update call itself
		SamplesMs  []float64 `json:"samples_ms"`   // sorted
		Metric     Metric    `json:"agent_metric"` // servicepath_network_programming_duration_seconds
		// Syncs the agent ran during the changes, and their mean time.
		Syncs        float64 `json:"syncs"`
		SyncMeanMs   float64 `json:"sync_mean_ms"`
		DirectMeanMs float64 `json:"direct_mean_ms"`
	} `json:"changes"`
	NFT []NFTResult `json:"nftables"`
}

// Quantiles summarise samples in ms.
type Quantiles struct{ Min, P50, P90, P99, Max float64 }

func quantiles(sorted []float64) Quantiles {
	if len(sorted) == 0 {
		return Quantiles{} // JSON has no NaN
	}
	return Quantiles{Min: sorted[0], P50: stats.Percentile(sorted, 50), P90: stats.Percentile(sorted, 90),
		P99: stats.Percentile(sorted, 99), Max: sorted[len(sorted)-1]}
}

// Metric is the agent's network-programming histogram after the changes,
// with quantiles estimated from its buckets as histogram_quantile does.
type Metric struct {
	Count  float64 `json:"count"`
	MeanMs float64 `json:"mean_ms"`
	P50Ms  float64 `json:"estimated_p50_ms"`
	P90Ms  float64 `json:"estimated_p90_ms"`
	P99Ms  float64 `json:"estimated_p99_ms"`
}

// NFTResult is kube-proxy's nftables ruleset (as harness/kubeproxy writes
// it) at one size, in a netns of its own.
type NFTResult struct {
	Services    int       `json:"services"`
	LoadSeconds float64   `json:"load_seconds,omitempty"`
	UpdateMs    Quantiles `json:"update_ms"`
	Updates     int       `json:"updates"`
	NotRun      string    `json:"not_run,omitempty"`
}

// backendAddr is endpoint j of Service i: 172.16.0.0/12 holds 1M.
func backendAddr(i, j int) netip.Addr { return addrAt(0xac100000, endpointsPer*i+j) }

// changeAddr is the new endpoint of change c, from 100.64.0.0/10.
func changeAddr(c int) netip.Addr { return addrAt(0x64400000, c) }

func addrAt(base uint32, n int) netip.Addr {
	v := base + uint32(n)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

func svcName(i int) string { return fmt.Sprintf("svc-%06d", i) }

func slice(i int, addrs []netip.Addr) *discoveryv1.EndpointSlice {
	name, proto, port := "http", corev1.ProtocolTCP, int32(backendPort)
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: svcName(i) + "-1", Labels: map[string]string{discoveryv1.LabelServiceName: svcName(i)}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &name, Protocol: &proto, Port: &port}},
	}
	ready := true
	for _, a := range addrs {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{a.String()},
			Conditions: discoveryv1.EndpointConditions{Ready: &ready}})
	}
	return es
}

// cluster is the API server, in the netns the agent runs in.
type cluster struct {
	topo   *topology.Topology
	srv    *kubeapi.Server
	client *kubernetes.Clientset
	http   *http.Client
	ips    []netip.Addr // cluster IP of Service i
}

func (c *cluster) dial(ctx context.Context, network, addr string) (conn net.Conn, err error) {
	err = c.topo.Node.Do(func() error {
		conn, err = (&net.Dialer{}).DialContext(ctx, network, addr)
		return err
	})
	return conn, err
}

func startCluster(t *testing.T) *cluster {
	t.Helper()
	c := &cluster{topo: topology.NewForTest(t, topology.Spec{Name: "agentscale"})}
	dir := t.TempDir()
	// A /12, the widest kube-apiserver takes: 100k cluster IPs fit.
	srv, err := kubeapi.Start(kubeapi.Options{Dir: dir, Netns: c.topo.Node.Name, Dial: c.dial, ServiceCIDRs: "10.96.0.0/12"})
	require.NoError(t, err, "start kube-apiserver and etcd in %s", c.topo.Node.Name)
	t.Cleanup(func() {
		if err := srv.Stop(); err != nil {
			t.Errorf("stop kube-apiserver and etcd: %v", err)
		}
	})
	c.srv = srv
	c.client, err = srv.Client()
	require.NoError(t, err, "client")
	c.http = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: c.dial}}
	return c
}

// load creates n Services with a slice of 3 endpoints each from parallel
// clients, stopping early when budget runs out; it returns how many exist.
func (c *cluster) load(t *testing.T, n, workers int, budget time.Duration) int {
	t.Helper()
	ctx := context.Background()
	_, err := c.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: namespace}}, metav1.CreateOptions{})
	require.NoError(t, err, "create namespace")
	c.ips = make([]netip.Addr, n)
	deadline := time.Now().Add(budget)
	var next atomic.Int64
	var errMu sync.Mutex
	var firstErr error
	var wg sync.WaitGroup
	// HTTP/2 multiplexes one connection per client: a client per 8
	// workers spreads the requests over several.
	for w := 0; w < workers; w += 8 {
		client, err := kubernetes.NewForConfig(c.srv.Config)
		require.NoError(t, err, "client")
		for range min(8, workers-w) {
			wg.Go(func() {
				if err := c.create(ctx, client, n, &next, deadline); err != nil {
					errMu.Lock()
					firstErr = errors.Join(firstErr, err)
					errMu.Unlock()
				}
			})
		}
	}
	wg.Wait()
	require.NoError(t, firstErr, "create Services and EndpointSlices")
	// Every index taken was created whole, and they are 0 upwards.
	return min(int(next.Load()), n)
}

// create takes indexes until none are left or the deadline passed; an
// index taken is created whole, Service then slice.
func (c *cluster) create(ctx context.Context, client *kubernetes.Clientset, n int, next *atomic.Int64, deadline time.Time) error {
	for time.Now().Before(deadline) {
		i := int(next.Add(1) - 1)
		if i >= n {
			return nil
		}
		svc, err := client.CoreV1().Services(namespace).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: svcName(i)},
			Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: svcPort}}},
		}, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("Service %d: %w", i, err)
		}
		if c.ips[i], err = netip.ParseAddr(svc.Spec.ClusterIP); err != nil {
			return fmt.Errorf("Service %d's cluster IP: %w", i, err)
		}
		addrs := make([]netip.Addr, endpointsPer)
		for j := range addrs {
			addrs[j] = backendAddr(i, j)
		}
		if _, err := client.DiscoveryV1().EndpointSlices(namespace).Create(ctx, slice(i, addrs), metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("EndpointSlice %d: %w", i, err)
		}
	}
	return nil
}

// agentProc is the servicepath agent process.
type agentProc struct {
	*procs.Proc
	started time.Time
	pin     string
}

// servicepathBin builds cmd/servicepath from this tree, unless given.
func servicepathBin(t *testing.T) string {
	t.Helper()
	if *binFlag != "" {
		return *binFlag
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
		if _, serr := os.Stat(goBin); serr != nil {
			t.Skipf("needs the go command to build cmd/servicepath (or -agentscale.bin): %v", err)
		}
	}
	root, err := scenarios.RepoRoot()
	require.NoError(t, err, "repo root")
	bin := filepath.Join(t.TempDir(), "servicepath")
	cmd := exec.Command(goBin, "build", "-o", bin, "./cmd/servicepath")
	cmd.Dir = root
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "build cmd/servicepath: %s", out)
	return bin
}

// startAgent runs the agent in the cluster's netns (forked from a thread
// there, so no `ip netns exec` is timed) inside cgroup, with maps sized
// for services.
func (c *cluster) startAgent(t *testing.T, bin string, services int) *agentProc {
	t.Helper()
	pin := filepath.Join(testenv.BPFFS(t), "servicepath")
	cg := testenv.ChildCgroup(t)
	cgfd, err := syscall.Open(cg, syscall.O_DIRECTORY|syscall.O_RDONLY, 0)
	require.NoError(t, err, "open cgroup %s", cg)
	defer syscall.Close(cgfd)
	// Master and slots per frontend, plus room for changes in flight.
	svcSize := (1+endpointsPer)*services + 4096
	args := []string{"agent", "--kubeconfig", c.srv.Kubeconfig, "--node-name", "agentscale", "--bpffs", pin, "--cgroup", cg,
		"--healthz-bind-address", "127.0.0.1:10256", "--metrics-bind-address", "127.0.0.1:10249", "--pod-device-pattern", "",
		"--services-size", strconv.Itoa(svcSize), "--backends-size", strconv.Itoa(svcSize)}
	cmd := exec.Command(bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cgfd}
	a := &agentProc{pin: pin}
	require.NoError(t, c.topo.Node.Do(func() error {
		a.started = time.Now()
		a.Proc, err = procs.Start("agent", filepath.Join(t.TempDir(), "agent.log"), cmd)
		return err
	}), "start %s", bin)
	t.Cleanup(func() { a.stop(t) })
	return a
}

// stop stops the agent, which must exit on SIGTERM; a second call is a
// no-op.
func (a *agentProc) stop(t *testing.T) {
	if done, _ := a.Exited(); done {
		return
	}
	if err := a.Stop(30 * time.Second); err != nil {
		t.Error(err)
	}
	if _, how := a.Exited(); how == "signal: killed" {
		t.Errorf("agent did not stop on SIGTERM; log:\n%s", a.LogTail())
	}
}

// memory reads VmRSS and VmHWM (KiB) of the agent process.
func (a *agentProc) memory() (rss, hwm int, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", a.Pid()))
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), ":")
		n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
		switch k {
		case "VmRSS":
			rss = n
		case "VmHWM":
			hwm = n
		}
	}
	return rss, hwm, sc.Err()
}

// logged is when the agent first logged msg (slog's time= field).
func (a *agentProc) logged(msg string) (time.Time, error) {
	f, err := os.Open(a.Log)
	if err != nil {
		return time.Time{}, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if strings.Contains(line, `msg="`+msg) && strings.HasPrefix(line, "time=") {
			ts, _, _ := strings.Cut(strings.TrimPrefix(line, "time="), " ")
			return time.Parse(time.RFC3339Nano, ts)
		}
	}
	return time.Time{}, fmt.Errorf("no %q in the agent's log", msg)
}

// waitReady polls /readyz: 200 once the first full sync is done.
func (c *cluster) waitReady(t *testing.T, a *agentProc, timeout time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		resp, err := c.http.Get("http://127.0.0.1:10256/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return time.Now()
			}
		}
		select {
		case <-a.Done():
			t.Fatalf("agent exited before it was ready; log:\n%s", a.LogTail())
		case <-time.After(20 * time.Millisecond):
		}
		require.True(t, time.Now().Before(deadline), "agent ready within %s; log:\n%s", timeout, a.LogTail())
	}
}

// metrics is a scrape of the agent's /metrics, by family name.
type metrics map[string]*dto.MetricFamily

// value is an unlabelled counter's or gauge's value, 0 when absent.
func (m metrics) value(name string) float64 {
	f := m[name]
	if f == nil || len(f.Metric) == 0 {
		return 0
	}
	if c := f.Metric[0].GetCounter(); c != nil {
		return c.GetValue()
	}
	return f.Metric[0].GetGauge().GetValue()
}

// histogram is an unlabelled histogram, empty when absent.
func (m metrics) histogram(name string) *dto.Histogram {
	if f := m[name]; f != nil && len(f.Metric) > 0 && f.Metric[0].Histogram != nil {
		return f.Metric[0].Histogram
	}
	return &dto.Histogram{}
}

func (c *cluster) scrape(t *testing.T) metrics {
	t.Helper()
	resp, err := c.http.Get("http://127.0.0.1:10249/metrics")
	require.NoError(t, err, "scrape /metrics")
	defer resp.Body.Close()
	var parser expfmt.TextParser
	fams, err := parser.TextToMetricFamilies(resp.Body)
	require.NoError(t, err, "parse /metrics")
	return fams
}

// waitHistogram scrapes until histogram name counts want samples: the
// agent observes its metrics at the end of a sync, after the map writes
// the test saw.
func (c *cluster) waitHistogram(t *testing.T, name string, want uint64) metrics {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		m := c.scrape(t)
		if m.histogram(name).GetSampleCount() >= want || time.Now().After(deadline) {
			return m
		}
		time.Sleep(50 * time.Millisecond)
	}
}

const npMetric = "servicepath_network_programming_duration_seconds"

// histogramQuantile estimates quantile q (0..1) of a histogram by linear
// interpolation inside its buckets, as Prometheus's histogram_quantile
// does; the PromQL engine that has it is too big a dependency for this.
func histogramQuantile(h *dto.Histogram, q float64) float64 {
	if h.GetSampleCount() == 0 {
		return 0
	}
	rank := q * float64(h.GetSampleCount())
	lo, below := 0.0, 0.0
	for _, b := range h.Bucket {
		n := float64(b.GetCumulativeCount())
		if n >= rank {
			if math.IsInf(b.GetUpperBound(), 1) {
				return lo
			}
			return lo + (b.GetUpperBound()-lo)*(rank-below)/(n-below)
		}
		lo, below = b.GetUpperBound(), n
	}
	return lo
}

// backends reads the active backends of vip:80/TCP from the maps.
func backends(m *maps.Maps, vip netip.Addr) ([]netip.AddrPort, error) {
	addr, fam := maps.AddrFrom(vip)
	k := maps.ServiceKey{Addr: addr, Port: maps.NewBE16(svcPort), Proto: 6, Family: fam}
	var v maps.ServiceValue
	if err := m.Services.Lookup(&k, &v); err != nil {
		return nil, err
	}
	out := make([]netip.AddrPort, 0, v.Count)
	for s := uint16(1); s <= v.Count; s++ {
		k.Slot = s
		var sv maps.ServiceValue
		if err := m.Services.Lookup(&k, &sv); err != nil {
			return nil, err
		}
		var b maps.Backend
		if err := m.Backends.Lookup(&sv.BackendID, &b); err != nil {
			return nil, err
		}
		out = append(out, netip.AddrPortFrom(b.Addr.Netip(b.Family), b.Port.Uint16()))
	}
	return out, nil
}

// verify counts Services whose frontend does not hold exactly their 3
// backends.
func verify(m *maps.Maps, ips []netip.Addr) int {
	wrong := 0
	for i, ip := range ips {
		got, err := backends(m, ip)
		if err != nil || len(got) != endpointsPer {
			wrong++
			continue
		}
		for j := range endpointsPer {
			if !slices.Contains(got, netip.AddrPortFrom(backendAddr(i, j), backendPort)) {
				wrong++
				break
			}
		}
	}
	return wrong
}

// awaited is a change not yet seen in the maps.
type awaited struct {
	vip  netip.Addr
	want netip.AddrPort
	sent time.Time
}

// changes replaces one endpoint of o.Changes distinct Services, o.Rate
// per second, each slice annotated with its trigger time as the
// EndpointSlice controller does, and times each until the map holds it.
func (c *cluster) changes(t *testing.T, m *maps.Maps, n int, o Options) (latency, api []float64, sent int) {
	t.Helper()
	ctx := context.Background()
	var mu sync.Mutex
	pending := map[int]awaited{}
	// The poller ends once the last change sent is seen, or on quit.
	sending, quit, done := make(chan struct{}), make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for {
			mu.Lock()
			for id, w := range pending {
				got, err := backends(m, w.vip)
				if err == nil && slices.Contains(got, w.want) {
					latency = append(latency, float64(time.Since(w.sent).Microseconds())/1e3)
					delete(pending, id)
				}
			}
			left := len(pending)
			mu.Unlock()
			select {
			case <-quit:
				return
			case <-sending:
				if left == 0 {
					return
				}
			default:
			}
			time.Sleep(pollEvery)
		}
	}()
	tick := time.NewTicker(time.Duration(float64(time.Second) / o.Rate))
	defer tick.Stop()
	// A stride coprime with n spreads the changes over the Services.
	stride := 7919
	for gcd(stride, n) != 1 {
		stride++
	}
	for ch := range min(o.Changes, n) {
		<-tick.C
		i := ch * stride % n
		es, err := c.client.DiscoveryV1().EndpointSlices(namespace).Get(ctx, svcName(i)+"-1", metav1.GetOptions{})
		require.NoError(t, err, "get slice %d", i)
		na := changeAddr(ch)
		es.Endpoints[ch%endpointsPer].Addresses = []string{na.String()}
		start := time.Now()
		if es.Annotations == nil {
			es.Annotations = map[string]string{}
		}
		es.Annotations[corev1.EndpointsLastChangeTriggerTime] = start.UTC().Format(time.RFC3339Nano)
		mu.Lock()
		pending[ch] = awaited{vip: c.ips[i], want: netip.AddrPortFrom(na, backendPort), sent: start}
		mu.Unlock()
		_, err = c.client.DiscoveryV1().EndpointSlices(namespace).Update(ctx, es, metav1.UpdateOptions{})
		require.NoError(t, err, "update slice %d", i)
		api = append(api, float64(time.Since(start).Microseconds())/1e3)
		sent++
	}
	close(sending)
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		close(quit)
		<-done
		t.Errorf("changes not seen in the maps 60 s after the last was sent")
	}
	mu.Lock()
	defer mu.Unlock()
	return slices.Sorted(slices.Values(latency)), slices.Sorted(slices.Values(api)), sent
}

func gcd(a, b int) int {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

// runAgent is the agent half: load, first sync, memory, changes.
func runAgent(t *testing.T, o Options, budget time.Duration, res *Result) {
	testenv.RequireRoot(t)
	if _, _, err := kubeapi.Assets(); err != nil {
		t.Skipf("needs a real API server: %v", err)
	}
	bin := servicepathBin(t)
	c := startCluster(t)

	began := time.Now()
	n := c.load(t, o.Services, o.Workers, budget)
	res.Load.Seconds = time.Since(began).Seconds()
	res.Load.ObjectsPerSec = float64(2*n) / res.Load.Seconds
	res.Load.Workers = o.Workers
	res.Load.Truncated = n < o.Services
	c.ips = c.ips[:n]
	res.Services, res.Endpoints = n, n*endpointsPer
	t.Logf("created %d Services and %d EndpointSlices (%d endpoints) in %.1f s, %.0f objects/s", n, n, n*endpointsPer,
		res.Load.Seconds, res.Load.ObjectsPerSec)

	a := c.startAgent(t, bin, n)
	ready := c.waitReady(t, a, 10*time.Minute)
	res.Sync.ReadySeconds = ready.Sub(a.started).Seconds()
	if at, err := a.logged("agent started"); assert.NoError(t, err, "agent log") {
		res.Sync.LoadedSeconds = at.Sub(a.started).Seconds()
	}
	if at, err := a.logged("caches synced"); assert.NoError(t, err, "agent log") {
		res.Sync.CachesSeconds = at.Sub(a.started).Seconds()
	}
	rss, hwm, err := a.memory()
	require.NoError(t, err, "agent memory")
	res.Memory.AfterSyncRSSKiB, res.Memory.AfterSyncHWMKiB = rss, hwm
	m0 := c.scrape(t)
	firstSyncs := m0.histogram("servicepath_sync_duration_seconds")
	res.Sync.Syncs, res.Sync.SyncSeconds = float64(firstSyncs.GetSampleCount()), firstSyncs.GetSampleSum()
	res.Sync.Programmed = m0.value("servicepath_services_programmed")
	res.Sync.Frontends = m0.value("servicepath_frontends_programmed")
	res.Sync.Backends = m0.value("servicepath_backends_programmed")

	m, err := maps.OpenPinned(a.pin)
	require.NoError(t, err, "open the agent's pinned maps")
	defer m.Close()
	vstart := time.Now()
	res.Sync.WrongInMaps = verify(m, c.ips)
	res.Sync.VerifySeconds = time.Since(vstart).Seconds()
	t.Logf("agent ready %.2f s after exec (caches %.2f s), %v syncs taking %.2f s, RSS %d KiB, HWM %d KiB, %d Services wrong in the maps",
		res.Sync.ReadySeconds, res.Sync.CachesSeconds, res.Sync.Syncs, res.Sync.SyncSeconds, rss, hwm, res.Sync.WrongInMaps)

	before := c.scrape(t)
	began = time.Now()
	lat, api, sent := c.changes(t, m, n, o)
	res.Changes.RatePerSec = float64(sent) / time.Since(began).Seconds()
	res.Changes.Sent, res.Changes.Observed = sent, len(lat)
	res.Changes.Latency, res.Changes.APICall, res.Changes.SamplesMs = quantiles(lat), quantiles(api), lat
	after := c.waitHistogram(t, npMetric, uint64(sent))
	np := after.histogram(npMetric)
	count := float64(np.GetSampleCount())
	res.Changes.Metric = Metric{Count: count, MeanMs: 1e3 * np.GetSampleSum() / max(count, 1),
		P50Ms: 1e3 * histogramQuantile(np, 0.5), P90Ms: 1e3 * histogramQuantile(np, 0.9),
		P99Ms: 1e3 * histogramQuantile(np, 0.99)}
	syncsBefore, syncsAfter := before.histogram("servicepath_sync_duration_seconds"), after.histogram("servicepath_sync_duration_seconds")
	syncs := float64(syncsAfter.GetSampleCount() - syncsBefore.GetSampleCount())
	res.Changes.Syncs = syncs
	res.Changes.SyncMeanMs = 1e3 * (syncsAfter.GetSampleSum() - syncsBefore.GetSampleSum()) / syncs
	var sum float64
	for _, l := range lat {
		sum += l
	}
	res.Changes.DirectMeanMs = sum / float64(len(lat))
	res.Memory.AfterChangesRSSKiB, res.Memory.AfterChangesHWMKiB, err = a.memory()
	require.NoError(t, err, "agent memory")
	t.Logf("%d changes at %.1f/s, %d seen in the maps: p50 %.1f ms, p90 %.1f ms, p99 %.1f ms (agent metric: %v samples, mean %.1f ms against %.1f ms)",
		sent, res.Changes.RatePerSec, len(lat), res.Changes.Latency.P50, res.Changes.Latency.P90, res.Changes.Latency.P99,
		count, res.Changes.Metric.MeanMs, res.Changes.DirectMeanMs)
	a.stop(t)
}

// runNFT applies the nftables ruleset at each size in a fresh netns, and
// times one-service updates over it; sizes projected (quadratically, as
// nft -f grows here) past budget are not run.
func runNFT(t *testing.T, o Options, upTo int, budget time.Duration) []NFTResult {
	testenv.RequireRoot(t)
	if err := kubeproxy.NFT.Available(); err != nil {
		t.Skipf("needs nft: %v", err)
	}
	eps := []netip.AddrPort{netip.MustParseAddrPort("10.244.1.1:8080"), netip.MustParseAddrPort("10.244.1.2:8080"), netip.MustParseAddrPort("10.244.1.3:8080")}
	var out []NFTResult
	var last NFTResult
	for _, n := range o.NFTSizes {
		if n > upTo {
			break
		}
		r := NFTResult{Services: n}
		if last.LoadSeconds > 0 {
			if proj := time.Duration(last.LoadSeconds * math.Pow(float64(n)/float64(last.Services), 2) * float64(time.Second)); proj > budget {
				r.NotRun = fmt.Sprintf("load projected at %s (quadratic from %d), over the %s budget", proj.Round(time.Second), last.Services, budget)
				out = append(out, r)
				continue
			}
		}
		topo := topology.NewForTest(t, topology.Spec{Name: "agentscale-nft"})
		run := &kubeproxy.Runner{NS: topo.Node}
		gen := kubeproxy.NewNFTables(kubeproxy.DefaultConfig(netip.MustParsePrefix("10.244.0.0/16")))
		svcs := kubeproxy.Synthetic(n, netip.MustParseAddr("10.96.0.1"), svcPort, eps)
		full, err := gen.FullSync(svcs)
		require.NoError(t, err, "nftables ruleset of %d services", n)
		ctx, cancel := context.WithTimeout(context.Background(), 2*budget)
		took, err := run.Apply(ctx, kubeproxy.NFT, full)
		cancel()
		require.NoError(t, err, "nft -f of %d services", n)
		r.LoadSeconds = took.Seconds()
		var ups []float64
		for u := range o.NFTPerSize {
			s := svcs[(u*7919)%n]
			s.Endpoints = slices.Clone(s.Endpoints)
			s.Endpoints[u%endpointsPer] = netip.AddrPortFrom(changeAddr(u), backendPort)
			diff, err := gen.Upsert(s)
			require.NoError(t, err, "update of service %s", s.Name)
			took, err := run.Apply(context.Background(), kubeproxy.NFT, diff)
			require.NoError(t, err, "nft -f of one service's update at %d", n)
			ups = append(ups, float64(took.Microseconds())/1e3)
		}
		sort.Float64s(ups)
		r.UpdateMs, r.Updates = quantiles(ups), len(ups)
		require.NoError(t, run.Close(), "runner")
		t.Logf("nftables %d services: load %.2f s, one-service update p50 %.1f ms (%d)", n, r.LoadSeconds, r.UpdateMs.P50, len(ups))
		out = append(out, r)
		last = r
	}
	return out
}

func run(t *testing.T, o Options, budget time.Duration) Result {
	var res Result
	t.Run("agent", func(t *testing.T) { runAgent(t, o, budget, &res) })
	// Up to the size the agent had, in case the load budget cut it.
	upTo := o.Services
	if res.Services > 0 {
		upTo = res.Services
	}
	t.Run("nftables", func(t *testing.T) { res.NFT = runNFT(t, o, upTo, *nftBudget) })
	return res
}

func TestAgentScaleSmall(t *testing.T) {
	o := Options{Services: 200, Changes: 40, Rate: 20, Workers: 8, NFTSizes: []int{200}, NFTPerSize: 3}
	r := run(t, o, time.Minute)
	if t.Skipped() || r.Services == 0 {
		return
	}
	assert.Equal(t, o.Services, r.Services, "every Service created")
	assert.Zero(t, r.Sync.WrongInMaps, "every Service in the maps with its 3 backends after the first sync")
	assert.Equal(t, float64(o.Services+1), r.Sync.Programmed, "the agent counts every Service and default/kubernetes")
	assert.Equal(t, o.Changes, r.Changes.Sent, "every change sent")
	assert.Equal(t, o.Changes, r.Changes.Observed, "every change seen in the maps")
	assert.Equal(t, float64(o.Changes), r.Changes.Metric.Count, "the agent's network-programming histogram counts every change")
}

func TestAgentScaleFull(t *testing.T) {
	scenarios.SkipUnlessFull(t)
	o := Options{Services: *fullServices, Changes: *fullChanges, Rate: *fullRate, Workers: *fullWorkers,
		NFTSizes: []int{1000, 3000, 10000, 30000, 100000}, NFTPerSize: 10}
	began := time.Now()
	r := run(t, o, *loadBudget)
	require.NotZero(t, r.Services, "the agent half ran")
	pass := r.Sync.WrongInMaps == 0 && r.Changes.Observed == r.Changes.Sent && r.Changes.Metric.Count == float64(r.Changes.Sent)
	verdict := fmt.Sprintf("%s Services with %s endpoints loaded in %.0f s (%.0f objects/s). The agent was ready %.1f s after exec (caches %.1f s, first full sync %.1f s), "+
		"RSS %.0f MiB after it (peak %.0f MiB); %d Services wrong in the maps. %d endpoint changes at %.0f/s, all %d seen in the map: p50 %.0f ms, p90 %.0f ms, p99 %.0f ms from the API write",
		thousands(r.Services), thousands(r.Endpoints), r.Load.Seconds, r.Load.ObjectsPerSec, r.Sync.ReadySeconds, r.Sync.CachesSeconds, r.Sync.SyncSeconds,
		float64(r.Memory.AfterSyncRSSKiB)/1024, float64(r.Memory.AfterSyncHWMKiB)/1024, r.Sync.WrongInMaps,
		r.Changes.Sent, r.Changes.RatePerSec, r.Changes.Observed, r.Changes.Latency.P50, r.Changes.Latency.P90, r.Changes.Latency.P99)
	if nft := largestNFT(r.NFT); nft != nil {
		verdict += fmt.Sprintf(". nftables (the harness's rebuild of kube-proxy's rules): %s services load in %.1f s, one-service update p50 %.0f ms", thousands(nft.Services), nft.LoadSeconds, nft.UpdateMs.P50)
	}
	rep := scenarios.Report{Name: "agentscale", Title: "The agent at scale against a real API server", Stamp: scenarios.Stamp(), Pass: pass, Verdict: verdict,
		WallSeconds: time.Since(began).Seconds(),
		Settings: map[string]any{"services": r.Services, "endpoints_per_service": endpointsPer, "changes": o.Changes, "rate_per_s": o.Rate,
			"load_workers": o.Workers, "min_sync_period": "1s (default)", "sync_period": "30s (default)", "poll_ms": pollEvery.Milliseconds()},
		Data: r}
	dir, err := scenarios.Write(rep, body(r), map[string]plot.Line{"programming.svg": programmingChart(r)})
	require.NoError(t, err, "write results")
	f, err := os.Create(filepath.Join(dir, "latency.svg"))
	require.NoError(t, err, "latency chart")
	require.NoError(t, latencyHistogram(r).Write(f), "latency chart")
	require.NoError(t, f.Close(), "latency chart")
	require.NoError(t, appendChart(dir, "latency.svg"), "link the latency chart")
	t.Logf("wrote %s: %s", dir, verdict)
	assert.True(t, pass, "every Service synced, every change seen and counted")
}

func largestNFT(rs []NFTResult) *NFTResult {
	var best *NFTResult
	for i := range rs {
		if rs[i].NotRun == "" {
			best = &rs[i]
		}
	}
	return best
}

func thousands(n int) string {
	s := strconv.Itoa(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

// latencyHistogram bins the direct latencies in 1-2-5 widths, about 15.
func latencyHistogram(r Result) plot.Bars {
	l := r.Changes.SamplesMs
	width := 1.0
	for _, w := range []float64{1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000} {
		width = w
		if len(l) == 0 || l[len(l)-1]/w <= 15 {
			break
		}
	}
	var cats []string
	var pts []plot.Point
	for lo := 0.0; len(l) > 0 && lo <= l[len(l)-1]; lo += width {
		n := 0
		for _, v := range l {
			if v >= lo && v < lo+width {
				n++
			}
		}
		cats = append(cats, fmt.Sprintf("%s-%s", plot.Label(lo), plot.Label(lo+width)))
		pts = append(pts, plot.Point{Y: float64(n), Lo: float64(n), Hi: float64(n)})
	}
	return plot.Bars{Title: fmt.Sprintf("Network programming latency, %s Services: API write to map (ms)", thousands(r.Services)),
		YLabel: "changes", Categories: cats, Series: []plot.Series{{Name: "changes", Points: pts}}}
}

// programmingChart puts the time to program everything, and one change,
// beside nft's.
func programmingChart(r Result) plot.Line {
	load := plot.Series{Name: "nft -f, all services"}
	upd := plot.Series{Name: "nft -f, one service (p50)"}
	for _, n := range r.NFT {
		if n.NotRun != "" {
			continue
		}
		load.Points = append(load.Points, plot.Point{X: float64(n.Services), Y: n.LoadSeconds, Lo: n.LoadSeconds, Hi: n.LoadSeconds})
		upd.Points = append(upd.Points, plot.Point{X: float64(n.Services), Y: n.UpdateMs.P50 / 1e3, Lo: n.UpdateMs.Min / 1e3, Hi: n.UpdateMs.Max / 1e3})
	}
	x := float64(r.Services)
	ready := plot.Series{Name: "agent: exec to ready", Points: []plot.Point{{X: x, Y: r.Sync.ReadySeconds, Lo: r.Sync.ReadySeconds, Hi: r.Sync.ReadySeconds}}}
	ch := plot.Series{Name: "agent: one change (p50, min-max)", Points: []plot.Point{{X: x, Y: r.Changes.Latency.P50 / 1e3,
		Lo: r.Changes.Latency.Min / 1e3, Hi: r.Changes.Latency.Max / 1e3}}}
	return plot.Line{Title: "Programming all services, and one change", XLabel: "services", YLabel: "seconds", LogX: true, LogY: true,
		Series: []plot.Series{load, upd, ready, ch}}
}

// appendChart links a chart scenarios.Write did not draw (a bar chart).
func appendChart(dir, file string) error {
	f, err := os.OpenFile(filepath.Join(dir, "README.md"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(f, "\n![%s](%s)\n", file, file)
	return errors.Join(err, f.Close())
}

func body(r Result) string {
	var b strings.Builder
	fmt.Fprintf(&b, "A kube-apiserver %s and etcd %s (`harness/kubeapi`) run in a netns of their own. %s ClusterIP Services, each with one EndpointSlice of %d ready endpoints, are created by %d parallel clients. "+
		"Then `servicepath agent` (the binary built from this commit, a process of its own, forked inside that netns, in a child cgroup its socket hooks attach to, on its own bpffs mount, maps sized for the load, default sync periods) starts against it. "+
		"Ready is `/readyz` answering 200, which it does once the first full sync is done; caches is the agent's own log line saying its informers listed everything. "+
		"The maps are then read back from the pinned maps, every Service's frontend and its backends.\n\n",
		kubeapi.KubernetesVersion, kubeapi.EtcdVersion, thousands(r.Services), endpointsPer, r.Load.Workers)
	fmt.Fprintf(&b, "| phase | figure |\n|---|---|\n")
	fmt.Fprintf(&b, "| load: %s Services + %s EndpointSlices | %.1f s, %.0f objects/s%s |\n", thousands(r.Services), thousands(r.Services), r.Load.Seconds, r.Load.ObjectsPerSec,
		map[bool]string{true: " (stopped by the load budget)", false: ""}[r.Load.Truncated])
	fmt.Fprintf(&b, "| agent exec to datapath loaded (its `agent started` line) | %.2f s |\n", r.Sync.LoadedSeconds)
	fmt.Fprintf(&b, "| agent exec to informer caches complete (`caches synced`) | %.2f s |\n", r.Sync.CachesSeconds)
	fmt.Fprintf(&b, "| agent exec to ready (first full sync done) | %.2f s |\n", r.Sync.ReadySeconds)
	fmt.Fprintf(&b, "| syncs by then, their total time (agent metric) | %.0f, %.2f s |\n", r.Sync.Syncs, r.Sync.SyncSeconds)
	fmt.Fprintf(&b, "| programmed (agent metric): Services, frontends, backends | %.0f, %.0f, %.0f |\n", r.Sync.Programmed, r.Sync.Frontends, r.Sync.Backends)
	fmt.Fprintf(&b, "| Services wrong in the pinned maps | %d (read in %.1f s) |\n", r.Sync.WrongInMaps, r.Sync.VerifySeconds)
	fmt.Fprintf(&b, "| agent VmRSS / VmHWM after the first sync | %.0f / %.0f MiB |\n", float64(r.Memory.AfterSyncRSSKiB)/1024, float64(r.Memory.AfterSyncHWMKiB)/1024)
	fmt.Fprintf(&b, "| agent VmRSS / VmHWM after the changes | %.0f / %.0f MiB |\n\n", float64(r.Memory.AfterChangesRSSKiB)/1024, float64(r.Memory.AfterChangesHWMKiB)/1024)
	b.WriteString("RSS is the agent process's own (`/proc/PID/status`); the BPF maps live in kernel memory and are not in it.\n\n")

	fmt.Fprintf(&b, "**Network programming.** %d endpoint changes, %.1f per second, each to a different Service: one endpoint of its slice replaced by a new address, the slice annotated with `endpoints.kubernetes.io/last-change-trigger-time` as the EndpointSlice controller does. "+
		"Latency runs from just before the Update call to the moment the pinned map holds the new backend on the Service's frontend (the maps are read every %d ms). "+
		"The agent's own `servicepath_network_programming_duration_seconds` (trigger time to the end of the sync that programmed it, kube-proxy's buckets) is the cross-check.\n\n",
		r.Changes.Sent, r.Changes.RatePerSec, pollEvery.Milliseconds())
	c := r.Changes
	b.WriteString("| measure | n | p50 ms | p90 ms | p99 ms | max ms | mean ms |\n|---|---|---|---|---|---|---|\n")
	fmt.Fprintf(&b, "| API write to map (observed) | %d | %.1f | %.1f | %.1f | %.1f | %.1f |\n", c.Observed, c.Latency.P50, c.Latency.P90, c.Latency.P99, c.Latency.Max, c.DirectMeanMs)
	fmt.Fprintf(&b, "| agent metric (from its buckets) | %.0f | %.0f | %.0f | %.0f | | %.1f |\n", c.Metric.Count, c.Metric.P50Ms, c.Metric.P90Ms, c.Metric.P99Ms, c.Metric.MeanMs)
	fmt.Fprintf(&b, "| the Update call | %d | %.1f | %.1f | %.1f | %.1f | |\n\n", c.Sent, c.APICall.P50, c.APICall.P90, c.APICall.P99, c.APICall.Max)
	fmt.Fprintf(&b, "The agent ran %.0f syncs meanwhile, %.1f ms each on average; syncs are at least `--min-sync-period` (1 s) apart and coalesce what arrived meanwhile, so most of a change's latency is waiting for its sync, and every 30 s a full comparison of every Service with the maps runs.\n\n",
		c.Syncs, c.SyncMeanMs)

	b.WriteString("**nftables baseline.** kube-proxy's binary is not built on this machine: these are the rules `harness/kubeproxy` rebuilds in kube-proxy's nftables layout (3 endpoints per service), applied with `nft -f` in a fresh netns per size, " +
		"not kube-proxy's own process (which also lists, diffs and writes them from its informers). Load is the whole ruleset at once, as kube-proxy's first sync writes it; an update is one service's chains and elements, as its partial syncs write them.\n\n")
	b.WriteString("| services | load s | update p50 ms | p90 ms | max ms | updates |\n|---|---|---|---|---|---|\n")
	for _, n := range r.NFT {
		if n.NotRun != "" {
			fmt.Fprintf(&b, "| %s | not run: %s | | | | |\n", thousands(n.Services), n.NotRun)
			continue
		}
		fmt.Fprintf(&b, "| %s | %.2f | %.1f | %.1f | %.1f | %d |\n", thousands(n.Services), n.LoadSeconds, n.UpdateMs.P50, n.UpdateMs.P90, n.UpdateMs.Max, n.Updates)
	}
	b.WriteString("\nThe nft update is the kernel's apply of one service's change; the agent's figure is the whole path from the API write through the watch, the coalescing wait and the sync to the map.\n")
	return b.String()
}
