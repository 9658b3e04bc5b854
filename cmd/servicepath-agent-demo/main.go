// Command servicepath-agent-demo is `make demo` with a control plane: a
// real kube-apiserver and etcd run in the demo node's network namespace,
// the demo manifest's Service and EndpointSlices are created through the
// API, and `servicepath agent` programs the datapath from it. Real TCP and
// UDP exchanges then go through the VIPs, a backend is marked not ready
// through the API, and the next exchanges show it left alone.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/servicepath/servicepath/datapath/mounts"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/kubeapi"
	"github.com/servicepath/servicepath/harness/stats"
	"github.com/servicepath/servicepath/harness/topology"
	"github.com/servicepath/servicepath/harness/traffic"
	"github.com/servicepath/servicepath/k8s"
)

var backends = []string{"backend-1", "backend-2", "backend-3"}

func main() {
	bin := flag.String("servicepath", "bin/servicepath", "the servicepath binary")
	manifest := flag.String("manifest", "deploy/examples/demo.yaml", "Services and EndpointSlices to create through the API (endpoints: the demo pods)")
	n := flag.Int("n", 1000, "exchanges per frontend, before and after the change")
	flag.Parse()
	if err := run(*bin, *manifest, *n); err != nil {
		fmt.Fprintf(os.Stderr, "demo failed: %v\n", err)
		os.Exit(1)
	}
}

func step(s string) { fmt.Printf("\n== %s\n", s) }

func run(bin, manifest string, n int) error {
	if os.Geteuid() != 0 {
		return errors.New("needs root: it creates network namespaces and loads BPF programs")
	}
	if _, _, err := kubeapi.Assets(); err != nil {
		return err
	}
	bin, err := filepath.Abs(bin)
	if err != nil {
		return err
	}
	objs, err := k8s.ReadManifests(manifest)
	if err != nil {
		return err
	}
	res, err := k8s.Translate(objs.Services, objs.EndpointSlices)
	if err != nil {
		return err
	}

	step("building a node with a client pod and three backend pods")
	topo, err := topology.New(topology.Spec{Name: "agentdemo", Pods: []topology.PodSpec{
		{Name: "client"}, {Name: backends[0]}, {Name: backends[1]}, {Name: backends[2]},
	}})
	if err != nil {
		return err
	}
	defer topo.Close()
	var devices []string
	for _, p := range topo.Pods {
		fmt.Printf("  %-10s %-14s %-14s host device %s\n", p.Name, p.IPv4, p.IPv6, p.HostIf)
		devices = append(devices, p.HostIf)
	}
	ports := map[uint16]bool{}
	for _, s := range res.Services {
		for _, b := range s.Backends {
			ports[b.Port] = true
		}
	}
	for _, name := range backends {
		for port := range ports {
			srv, err := traffic.Serve(topo.Pod(name), name, port)
			if err != nil {
				return err
			}
			defer srv.Close()
		}
	}

	dir, err := os.MkdirTemp("", "servicepath-agent-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	// Mounted in the host mount namespace: `ip netns exec` gives each
	// command a mount namespace of its own that dies with it.
	bpffs := filepath.Join(dir, "bpffs")
	if err := mounts.EnsureBPFFS(bpffs); err != nil {
		return err
	}
	defer unix.Unmount(bpffs, unix.MNT_DETACH)

	// The API server listens on the node's 127.0.0.1, where the agent runs;
	// this process talks to it through sockets made in that namespace.
	dialNode := func(ctx context.Context, network, addr string) (c net.Conn, err error) {
		err = topo.Node.Do(func() error {
			c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}
	step("starting etcd and kube-apiserver " + kubeapi.KubernetesVersion + " in the node's network namespace")
	apiDir := filepath.Join(dir, "kube")
	if err := os.Mkdir(apiDir, 0o700); err != nil {
		return err
	}
	api, err := kubeapi.Start(kubeapi.Options{Dir: apiDir, Netns: topo.Node.Name, Dial: dialNode,
		ServiceCIDRs: "198.19.0.0/16,fd00:5f::/108"})
	if err != nil {
		return err
	}
	defer api.Stop()
	client, err := api.Client()
	if err != nil {
		return err
	}
	fmt.Printf("  ready at %s (kubeconfig %s)\n", api.Config.Host, api.Kubeconfig)

	step("creating " + manifest + " through the API")
	ctx := context.Background()
	for _, svc := range objs.Services {
		if _, err := client.CoreV1().Services(svc.Namespace).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("create Service %s: %w", svc.Name, err)
		}
		fmt.Printf("  Service %s/%s\n", svc.Namespace, svc.Name)
	}
	for _, es := range objs.EndpointSlices {
		if _, err := client.DiscoveryV1().EndpointSlices(es.Namespace).Create(ctx, es, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("create EndpointSlice %s: %w", es.Name, err)
		}
		fmt.Printf("  EndpointSlice %s/%s (%s)\n", es.Namespace, es.Name, es.AddressType)
	}

	step("starting servicepath agent in the node's network namespace")
	args := []string{"agent", "--kubeconfig", api.Kubeconfig, "--node-name", "node-1", "--bpffs", bpffs,
		"--device", strings.Join(devices, ","), "--healthz-bind-address", "127.0.0.1:10256",
		"--metrics-bind-address", "127.0.0.1:10249"}
	fmt.Printf("$ servicepath %s\n", strings.Join(args, " "))
	logPath := filepath.Join(dir, "agent.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logFile.Close()
	agent := exec.Command("ip", append([]string{"netns", "exec", topo.Node.Name, bin}, args...)...)
	agent.Stdout, agent.Stderr = logFile, logFile
	agent.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := agent.Start(); err != nil {
		return err
	}
	agentDone := make(chan error, 1)
	go func() { agentDone <- agent.Wait() }()
	defer func() {
		agent.Process.Signal(syscall.SIGTERM)
		<-agentDone
		exec.Command("ip", "netns", "exec", topo.Node.Name, bin, "unload", "--bpffs", bpffs).Run()
	}()
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: dialNode}}
	if err := waitHealthy(hc, agentDone, logPath); err != nil {
		return err
	}
	fmt.Println("  /healthz: 200 (first full sync done)")
	if err := sp(topo, bin, "services", "--bpffs", bpffs); err != nil {
		return err
	}

	client2 := topo.Pod("client")
	failed := exchanges(client2, res.Services, backends, n)

	step("marking backend-3 not ready through the API")
	if err := setReady(ctx, client, objs.EndpointSlices, backends[2], false); err != nil {
		return err
	}
	if err := waitBackends(topo, bin, bpffs, res.Services, len(backends)-1); err != nil {
		return err
	}
	if err := sp(topo, bin, "services", "--bpffs", bpffs); err != nil {
		return err
	}
	failed = exchanges(client2, res.Services, backends[:2], n) || failed

	step("agent metrics")
	if err := showMetrics(hc); err != nil {
		return err
	}
	if failed {
		return errors.New("some exchanges failed or were not spread uniformly (see above)")
	}
	fmt.Println("\ndemo passed: the agent programmed the API's Services, and followed a readiness change")
	return nil
}

func sp(topo *topology.Topology, bin string, args ...string) error {
	fmt.Printf("\n$ servicepath %s\n", strings.Join(args, " "))
	cmd := exec.Command("ip", append([]string{"netns", "exec", topo.Node.Name, bin}, args...)...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	return cmd.Run()
}

func waitHealthy(hc *http.Client, agentDone <-chan error, logPath string) error {
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if resp, err := hc.Get("http://127.0.0.1:10256/healthz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case err := <-agentDone:
			log, _ := os.ReadFile(logPath)
			return fmt.Errorf("agent exited (%v):\n%s", err, log)
		case <-time.After(100 * time.Millisecond):
		}
	}
	log, _ := os.ReadFile(logPath)
	return fmt.Errorf("agent not healthy after 60s:\n%s", log)
}

// setReady flips the Ready condition of a pod's endpoints in every slice.
func setReady(ctx context.Context, c kubernetes.Interface, slices []*discoveryv1.EndpointSlice, pod string, ready bool) error {
	for _, es := range slices {
		cur, err := c.DiscoveryV1().EndpointSlices(es.Namespace).Get(ctx, es.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for i, ep := range cur.Endpoints {
			if ep.TargetRef != nil && ep.TargetRef.Name == pod {
				cur.Endpoints[i].Conditions = discoveryv1.EndpointConditions{Ready: &ready, Serving: &ready, Terminating: new(bool)}
				fmt.Printf("  EndpointSlice %s: %s ready=%t\n", cur.Name, ep.Addresses[0], ready)
			}
		}
		if _, err := c.DiscoveryV1().EndpointSlices(es.Namespace).Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
			return err
		}
	}
	return nil
}

// waitBackends waits until no frontend of services has more than max
// backends, reading what the datapath holds through `servicepath services`.
func waitBackends(topo *topology.Topology, bin, bpffs string, services []service.Service, max int) error {
	names := map[string]bool{}
	for _, s := range services {
		names[s.Name] = true
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		out, err := exec.Command("ip", "netns", "exec", topo.Node.Name, bin, "services", "--bpffs", bpffs, "-o", "json").Output()
		if err != nil {
			return err
		}
		var listed []struct {
			Name     string
			Backends []json.RawMessage
		}
		if err := json.Unmarshal(out, &listed); err != nil {
			return err
		}
		done := true
		for _, l := range listed {
			done = done && (!names[l.Name] || len(l.Backends) <= max)
		}
		if done {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return errors.New("the agent did not take the backend out within 30s")
}

// exchanges runs n exchanges through every frontend and prints the spread
// over want; it returns true when any failed or the spread is not uniform.
func exchanges(client *topology.Pod, services []service.Service, want []string, n int) (failed bool) {
	for _, s := range services {
		vip := netip.AddrPortFrom(s.Frontend.Addr, s.Frontend.Port)
		step(fmt.Sprintf("%d %s exchanges from the client pod to %s (%s)", n, s.Frontend.Protocol, vip, s.Name))
		tally, err := traffic.Run(n, func(i int) (traffic.Reply, error) {
			payload := []byte(fmt.Sprintf("agent demo %d", i))
			var r traffic.Reply
			var err error
			if s.Frontend.Protocol == service.UDP {
				r, err = traffic.UDPExchange(client, vip, payload, 3*time.Second)
			} else {
				r, err = traffic.TCPExchange(client, vip, payload, 3*time.Second)
			}
			if err == nil && r.Peer != vip {
				err = fmt.Errorf("reply from %s, not from the VIP", r.Peer)
			}
			return r, err
		})
		if err != nil {
			fmt.Printf("  FAILED: %v\n", err)
			failed = true
			continue
		}
		tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		for _, name := range backends {
			fmt.Fprintf(tw, "  %s\t%d\t%s\n", name, tally[name], strings.Repeat("#", tally[name]*40/n))
		}
		tw.Flush()
		counts := tally.Counts(want...)
		chi, df := stats.ChiSquareUniform(counts)
		crit := stats.ChiSquareCritical(df, stats.SpreadAlpha)
		others := n
		for _, c := range counts {
			others -= c
		}
		verdict := "uniform"
		if chi >= crit || others > 0 {
			verdict, failed = "NOT uniform over "+strings.Join(want, ", "), true
		}
		fmt.Printf("  every reply from %s; chi-square %.2f (%s: bound %.2f at alpha %g)\n", vip, chi, verdict, crit, stats.SpreadAlpha)
	}
	return failed
}

func showMetrics(hc *http.Client) error {
	resp, err := hc.Get("http://127.0.0.1:10249/metrics")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		for _, p := range []string{"servicepath_syncs_total", "servicepath_sync_errors_total", "servicepath_service_applies_total",
			"servicepath_services_programmed", "servicepath_backends_programmed", "servicepath_sync_duration_seconds_count",
			`servicepath_datapath_packets_total{reason="lb_new"}`, `servicepath_map_pressure{map="sp_services"}`} {
			if strings.HasPrefix(line, p+" ") || strings.Contains(p, "{") && strings.HasPrefix(line, p) {
				fmt.Println("  " + line)
			}
		}
	}
	return sc.Err()
}
