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
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/servicepath/servicepath/cmd/internal/demo"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/kubeapi"
)

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

func run(bin, manifest string, n int) error {
	if _, _, err := kubeapi.Assets(); err != nil {
		return err
	}
	bed, err := demo.Start("agentdemo", bin, manifest)
	if err != nil {
		return err
	}
	defer bed.Close()
	topo, dir, bpffs := bed.Topo, bed.Dir, bed.BPFFS

	// The API server listens on the node's 127.0.0.1, where the agent runs;
	// this process talks to it through sockets made in that namespace.
	dialNode := func(ctx context.Context, network, addr string) (c net.Conn, err error) {
		err = topo.Node.Do(func() error {
			c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}
	demo.Step("starting etcd and kube-apiserver " + kubeapi.KubernetesVersion + " in the node's network namespace")
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

	demo.Step("creating " + manifest + " through the API")
	ctx := context.Background()
	for _, svc := range bed.Objects.Services {
		if _, err := client.CoreV1().Services(svc.Namespace).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("create Service %s: %w", svc.Name, err)
		}
		fmt.Printf("  Service %s/%s\n", svc.Namespace, svc.Name)
	}
	for _, es := range bed.Objects.EndpointSlices {
		if _, err := client.DiscoveryV1().EndpointSlices(es.Namespace).Create(ctx, es, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("create EndpointSlice %s: %w", es.Name, err)
		}
		fmt.Printf("  EndpointSlice %s/%s (%s)\n", es.Namespace, es.Name, es.AddressType)
	}

	demo.Step("starting servicepath agent in the node's network namespace")
	args := []string{"agent", "--kubeconfig", api.Kubeconfig, "--node-name", "node-1", "--bpffs", bpffs,
		"--device", strings.Join(bed.Devices, ","), "--healthz-bind-address", "127.0.0.1:10256",
		"--metrics-bind-address", "127.0.0.1:10249"}
	fmt.Printf("$ servicepath %s\n", strings.Join(args, " "))
	logPath := filepath.Join(dir, "agent.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logFile.Close()
	agent := exec.Command("ip", append([]string{"netns", "exec", topo.Node.Name, bed.Bin}, args...)...)
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
		exec.Command("ip", "netns", "exec", topo.Node.Name, bed.Bin, "unload", "--bpffs", bpffs).Run()
	}()
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: dialNode}}
	if err := waitHealthy(hc, agentDone, logPath); err != nil {
		return err
	}
	fmt.Println("  /readyz: 200 (first full sync done)")
	if err := bed.SP("services", "--bpffs", bpffs); err != nil {
		return err
	}

	failed := demo.Exchanges(bed.Client, bed.Services, demo.Backends, n)

	demo.Step("marking backend-3 not ready through the API")
	if err := setReady(ctx, client, bed.Objects.EndpointSlices, demo.Backends[2], false); err != nil {
		return err
	}
	if err := waitBackends(bed, bed.Services, len(demo.Backends)-1); err != nil {
		return err
	}
	if err := bed.SP("services", "--bpffs", bpffs); err != nil {
		return err
	}
	failed = demo.Exchanges(bed.Client, bed.Services, demo.Backends[:2], n) || failed

	demo.Step("agent metrics")
	if err := showMetrics(hc); err != nil {
		return err
	}
	if failed {
		return errors.New("some exchanges failed or were not spread uniformly (see above)")
	}
	fmt.Println("\ndemo passed: the agent programmed the API's Services, and followed a readiness change")
	return nil
}

func waitHealthy(hc *http.Client, agentDone <-chan error, logPath string) error {
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if resp, err := hc.Get("http://127.0.0.1:10256/readyz"); err == nil {
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
func waitBackends(bed *demo.Bed, services []service.Service, max int) error {
	names := map[string]bool{}
	for _, s := range services {
		names[s.Name] = true
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		out, err := exec.Command("ip", "netns", "exec", bed.Topo.Node.Name, bed.Bin, "services", "--bpffs", bed.BPFFS, "-o", "json").Output()
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

func showMetrics(hc *http.Client) error {
	resp, err := hc.Get("http://127.0.0.1:10249/metrics")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		for _, p := range []string{"servicepath_sync_errors_total", "servicepath_service_applies_total", "servicepath_frontends_programmed",
			"servicepath_services_programmed", "servicepath_backends_programmed", "servicepath_sync_duration_seconds_count",
			`servicepath_datapath_packets_total{reason="lb_new"}`, `servicepath_map_pressure{map="sp_services"}`} {
			if strings.HasPrefix(line, p+" ") || strings.Contains(p, "{") && strings.HasPrefix(line, p) {
				fmt.Println("  " + line)
			}
		}
	}
	return sc.Err()
}
