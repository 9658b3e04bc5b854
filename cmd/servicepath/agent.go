package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/pflag"
	"github.com/vishvananda/netlink"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"

	"github.com/servicepath/servicepath/agent"
	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/bandwidth"
	"github.com/servicepath/servicepath/datapath/ct"
	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/service"
)

func cmdAgent(fs *pflag.FlagSet, o output) func() error {
	lo := addLoadFlags(fs)
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig file (default: the in-cluster config of the pod)")
	apiServer := fs.String("k8s-api-server", "", "API server as host:port or https://host[:port], in place of the in-cluster `kubernetes` "+
		"Service that nothing translates before the agent runs, or of the kubeconfig's server (default: $"+envAPIServer+")")
	nodeName := fs.String("node-name", "", "this node's name, for internalTrafficPolicy Local (default: $NODE_NAME, else the hostname)")
	minSync := fs.Duration("min-sync-period", time.Second, "least time between syncs; changes meanwhile are coalesced")
	syncPeriod := fs.Duration("sync-period", 30*time.Second, "interval of the full comparison of the API with the maps")
	healthzAddr := fs.String("healthz-bind-address", "0.0.0.0:10256", "address of /livez (liveness), /readyz (readiness) and kube-proxy's /healthz (empty: off)")
	metricsAddr := fs.String("metrics-bind-address", "127.0.0.1:10249", "address of /metrics (empty: off)")
	gcInterval := fs.Duration("ct-gc-interval", 30*time.Second, "interval between conntrack GC passes when calm, shortened under pressure, per zone (0: off)")
	podDevices := fs.String("pod-device-pattern", agent.DefaultPodDevices, "host-side pod devices (veths, netkit primaries) attached to as they appear, and BPF host routing delivers to: comma-separated globs, none of them a node device (empty: none)")
	bandwidthManager := fs.Bool("bandwidth-manager", false, "Bandwidth Manager: hold each pod with a kubernetes.io/egress-bandwidth annotation to that rate off the node, by EDT on the node devices, which get the fq qdisc (the kernel must have sch_fq); traffic between pods of a node is not limited")
	bandwidthBBR := fs.Bool("bandwidth-bbr", false, "with --bandwidth-manager: make BBR the host netns' default TCP congestion control, which pods started afterwards inherit (running pods keep theirs; the kernel must have tcp_bbr)")
	verbosity := fs.IntP("v", "v", 0, "log verbosity, as kube-proxy's --v: 0 info; client-go's messages at their own levels; 4 and up every Service programmed and every pod device event")
	return func() error {
		pattern, err := agent.ParseDevicePattern(*podDevices)
		if err != nil {
			return fmt.Errorf("--pod-device-pattern: %w", err)
		}
		if *bandwidthBBR && !*bandwidthManager {
			return errors.New("--bandwidth-bbr needs --bandwidth-manager")
		}
		mode, err := attach.ParseMode(lo.mode)
		if err != nil {
			return err
		}
		name, err := resolveNodeName(*nodeName)
		if err != nil {
			return err
		}
		restCfg, err := kubeClientConfig(*kubeconfig, apiServerFlag(*apiServer))
		if err != nil {
			return err
		}
		restCfg.UserAgent = "servicepath-agent/" + name
		client, err := kubernetes.NewForConfig(restCfg)
		if err != nil {
			return err
		}
		log, err := newLogger(o.errOut, *verbosity)
		if err != nil {
			return err
		}

		if len(lo.netdevs) == 1 && lo.netdevs[0] == agent.AutoNodeDevices {
			if lo.netdevs, err = agent.DetectNodeDevices(); err != nil {
				return fmt.Errorf("--node-device %s: %w", agent.AutoNodeDevices, err)
			}
			fmt.Fprintf(o.out, "node devices (holding a default route): %s\n", strings.Join(lo.netdevs, ","))
		}
		dp, lock, err := loadDatapath(lo, o)
		if err != nil {
			return err
		}
		defer lock.Release()
		defer dp.Close()
		var bw *bandwidth.Manager
		if *bandwidthManager {
			if bw, err = startBandwidthManager(dp, lo.netdevs, o); err != nil {
				return fmt.Errorf("--bandwidth-manager: %w", err)
			}
		}
		if *bandwidthBBR {
			if err := bandwidth.EnableBBR(); err != nil {
				return fmt.Errorf("--bandwidth-bbr: %w", err)
			}
			fmt.Fprintln(o.out, "tcp congestion control bbr for pods started from now on")
		}
		a, err := agent.New(client, dp.Maps, agent.Config{
			NodeName: name, MinSyncPeriod: *minSync, SyncPeriod: *syncPeriod, Logger: log,
			OnRemoved: func(removed []service.Removed) error {
				return destroyStaleSockets(o, lo.bpffs, dp.Maps, removed)
			},
			Pods: &agent.PodNetwork{
				Devices: pattern, NodeDevices: lo.netdevs,
				Attacher: &attach.Attacher{LinkDir: linkDir(lo.bpffs), Mode: mode},
				FromPod:  dp.FromPod, ToPod: dp.ToPod, Endpoints: dp.Endpoints, BigTCP: lo.bigTCP,
				Bandwidth: bw,
			},
		})
		if err != nil {
			return err
		}

		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		errc := make(chan error, 3)
		serve := func(addr, what string, h http.Handler) error {
			if addr == "" {
				return nil
			}
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				return err
			}
			srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
			go func() { <-ctx.Done(); srv.Close() }()
			go func() {
				if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
					errc <- fmt.Errorf("serve %s: %w", what, err)
				}
			}()
			log.Info("serving", "what", what, "address", ln.Addr().String())
			return nil
		}
		if err := serve(*healthzAddr, "/livez /readyz /healthz", a.HealthHandler()); err != nil {
			return err
		}
		metricsMux := http.NewServeMux()
		metricsMux.Handle("/metrics", promhttp.HandlerFor(a.Metrics.Registry, promhttp.HandlerOpts{}))
		if err := serve(*metricsAddr, "/metrics", metricsMux); err != nil {
			return err
		}
		if *gcInterval > 0 {
			go gcLoop(ctx, dp.Maps, *gcInterval, log)
		}
		log.Info("agent started", "node", name, "api", restCfg.Host)
		go func() { errc <- a.Run(ctx) }()
		select {
		case err := <-errc:
			return err
		case <-ctx.Done():
			log.Info("stopping; the datapath keeps its state for the next agent")
			return nil
		}
	}
}

// resolveNodeName applies the Downward API convention, then the hostname.
func resolveNodeName(flagValue string) (string, error) {
	if flagValue != "" {
		return flagValue, nil
	}
	if n := os.Getenv("NODE_NAME"); n != "" {
		return n, nil
	}
	return os.Hostname()
}

// gcLoop deletes expired conntrack entries and their SNAT mappings, as
// `servicepath gc --interval`: one collector and pacer per zone. A failed
// pass is logged and the loop starts over after an interval.
func gcLoop(ctx context.Context, m *maps.Maps, interval time.Duration, log *slog.Logger) {
	loop := &ct.Loop{Maps: m, Base: interval, Report: func(p ct.LoopPass) {
		log.Debug("conntrack gc", "zone", p.Zone, "scanned", p.Result.Scanned, "deleted", p.Result.Deleted,
			"orphans", p.Result.Orphans, "snat", p.NAT, "next", p.Decision.Interval, "pressure", p.Decision.Pressure)
	}}
	for {
		err := loop.Run(ctx)
		if ctx.Err() != nil {
			return
		}
		log.Error("conntrack gc", "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(interval):
		}
	}
}

// newLogger is the agent's structured log at verbosity v, as slog level
// -v (the mapping logr uses, so --v=4 is slog's debug), with klog's output,
// client-go's, bridged into it at the same verbosity.
func newLogger(w io.Writer, v int) (*slog.Logger, error) {
	log := slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.Level(-v)}))
	kfs := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(kfs)
	if err := kfs.Set("v", strconv.Itoa(v)); err != nil {
		return nil, fmt.Errorf("--v=%d: %w", v, err)
	}
	klog.SetSlogLogger(log)
	return log, nil
}

// startBandwidthManager puts fq on every node device, which EDT needs to
// hold packets, and takes the rate maps over.
func startBandwidthManager(dp *loader.Datapath, netdevs []string, o output) (*bandwidth.Manager, error) {
	if len(netdevs) == 0 {
		return nil, errors.New("no node device (--node-device) to enforce rates on")
	}
	for _, dev := range netdevs {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return nil, fmt.Errorf("node device %s: %w", dev, err)
		}
		if err := bandwidth.EnsureFQ(l); err != nil {
			return nil, err
		}
		fmt.Fprintf(o.out, "fq on %s (bandwidth manager)\n", dev)
	}
	return bandwidth.NewManager(dp.Maps)
}
