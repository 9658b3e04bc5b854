package agent

import (
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/metrics"
)

// Metrics are the agent's Prometheus series, in a registry of their own so
// that several agents (tests) never clash. The sync and change series are
// kube-proxy's (kubeproxy_sync_proxy_rules_*, kubeproxy_network_programming_*)
// under servicepath's prefix, so dashboards carry over.
type Metrics struct {
	Registry *prometheus.Registry

	SyncDuration           prometheus.Histogram
	SyncLastTimestamp      prometheus.Gauge
	SyncLastQueued         prometheus.Gauge
	SyncErrors             prometheus.Counter
	NetworkProgramming     prometheus.Histogram
	ServiceChanges         prometheus.Counter
	ServiceChangesPending  prometheus.Gauge
	EndpointChanges        prometheus.Counter
	EndpointChangesPending prometheus.Gauge
	ServiceApplies         prometheus.Counter
	ServicesProgrammed     prometheus.Gauge
	FrontendsProgrammed    prometheus.Gauge
	BackendsProgrammed     prometheus.Gauge
	UnsupportedPorts       prometheus.Counter
	InvalidServices        prometheus.Counter
}

// networkProgrammingBuckets are kube-proxy's: from 0.25 s to 10 min.
func networkProgrammingBuckets() []float64 {
	b := prometheus.LinearBuckets(0.25, 0.25, 2)
	b = append(b, prometheus.LinearBuckets(1, 1, 59)...)
	b = append(b, prometheus.LinearBuckets(60, 5, 12)...)
	return append(b, prometheus.LinearBuckets(300, 30, 10)...)
}

func newMetrics(m *maps.Maps, log *slog.Logger) *Metrics {
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
	}
	gauge := func(name, help string) prometheus.Gauge {
		return prometheus.NewGauge(prometheus.GaugeOpts{Name: name, Help: help})
	}
	x := &Metrics{
		Registry: prometheus.NewRegistry(),
		SyncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "servicepath_sync_duration_seconds",
			Help:    "Time a sync of the API's state into the datapath maps took; its count is the syncs run.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
		SyncLastTimestamp: gauge("servicepath_sync_last_timestamp_seconds", "When the last successful sync ended (Unix time)."),
		SyncLastQueued:    gauge("servicepath_sync_last_queued_timestamp_seconds", "When a change was last queued for a sync (Unix time)."),
		SyncErrors:        counter("servicepath_sync_errors_total", "Syncs that failed to program a Service; they are retried."),
		NetworkProgramming: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "servicepath_network_programming_duration_seconds",
			Help: "From an endpoints change (the EndpointSlice's endpoints.kubernetes.io/last-change-trigger-time) " +
				"to the sync that programmed it.",
			Buckets: networkProgrammingBuckets(),
		}),
		ServiceChanges:         counter("servicepath_service_changes_total", "Service changes seen."),
		ServiceChangesPending:  gauge("servicepath_service_changes_pending", "Services changed since the last sync took them."),
		EndpointChanges:        counter("servicepath_endpoint_changes_total", "EndpointSlice changes seen."),
		EndpointChangesPending: gauge("servicepath_endpoint_changes_pending", "Services whose EndpointSlices changed since the last sync took them."),
		ServiceApplies:         counter("servicepath_service_applies_total", "Services whose frontends were written to or removed from the maps."),
		ServicesProgrammed:     gauge("servicepath_services_programmed", "Services (and Pods' hostPorts) with frontends in the datapath."),
		FrontendsProgrammed:    gauge("servicepath_frontends_programmed", "Frontends (address, port, protocol) in the datapath."),
		BackendsProgrammed:     gauge("servicepath_backends_programmed", "Backends over all frontends in the datapath."),
		UnsupportedPorts: counter("servicepath_unsupported_service_ports_total",
			"Service ports reported because the datapath does not handle their protocol (SCTP)."),
		InvalidServices: counter("servicepath_invalid_services_total",
			"Services (with their EndpointSlices) refused by translation; their frontends were left as they were."),
	}
	x.Registry.MustRegister(x.SyncDuration, x.SyncLastTimestamp, x.SyncLastQueued, x.SyncErrors, x.NetworkProgramming,
		x.ServiceChanges, x.ServiceChangesPending, x.EndpointChanges, x.EndpointChangesPending, x.ServiceApplies,
		x.ServicesProgrammed, x.FrontendsProgrammed, x.BackendsProgrammed, x.UnsupportedPorts, x.InvalidServices,
		&datapathCollector{m: m, log: log},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return x
}

// datapathCollector reads the BPF counters at scrape time, and the maps'
// fill at most every occupancyMaxAge: counting a hash map's entries walks
// every key, too much for each scrape of a large map.
type datapathCollector struct {
	m   *maps.Maps
	log *slog.Logger

	mu    sync.Mutex
	occ   map[string]maps.Usage
	occAt time.Time
}

const occupancyMaxAge = 30 * time.Second

var (
	packetsDesc = prometheus.NewDesc("servicepath_datapath_packets_total",
		"Packets by datapath verdict (see `servicepath stats`).", []string{"reason"}, nil)
	socketDesc = prometheus.NewDesc("servicepath_socket_operations_total",
		"Socket calls (connect, sendmsg, recvmsg, getpeername, bind) seen by the socket hooks, and sockets destroyed, by outcome.",
		[]string{"reason"}, nil)
	snatRetriesDesc = prometheus.NewDesc("servicepath_snat_port_allocations_total",
		"SNAT ports allocated, by how many ports were tried and taken before a free one (exhaustion is a packet verdict, nat_exhausted).",
		[]string{"retries"}, nil)
	entriesDesc = prometheus.NewDesc("servicepath_map_entries", "Entries in a BPF map, counted at most every 30s.", []string{"map"}, nil)
	maxDesc     = prometheus.NewDesc("servicepath_map_max_entries", "Capacity of a BPF map.", []string{"map"}, nil)
	pressure    = prometheus.NewDesc("servicepath_map_pressure", "Entries over capacity of a BPF map (0 to 1), counted at most every 30s.", []string{"map"}, nil)
)

// snatRetries maps the datapath's retry-bucket counters to their label.
var snatRetries = map[string]string{
	"nat_retry_0": "0", "nat_retry_1": "1", "nat_retry_2_3": "2-3", "nat_retry_4_7": "4-7", "nat_retry_8_plus": "8+",
}

func (c *datapathCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{packetsDesc, socketDesc, snatRetriesDesc, entriesDesc, maxDesc, pressure} {
		ch <- d
	}
}

func (c *datapathCollector) Collect(ch chan<- prometheus.Metric) {
	counters, err := metrics.Read(c.m.Metrics)
	if err != nil {
		c.log.Error("read datapath counters", "err", err)
	}
	for name, v := range counters {
		switch {
		case snatRetries[name] != "":
			ch <- prometheus.MustNewConstMetric(snatRetriesDesc, prometheus.CounterValue, float64(v), snatRetries[name])
		case strings.HasPrefix(name, "sock_"):
			ch <- prometheus.MustNewConstMetric(socketDesc, prometheus.CounterValue, float64(v), name)
		default:
			ch <- prometheus.MustNewConstMetric(packetsDesc, prometheus.CounterValue, float64(v), name)
		}
	}
	for name, u := range c.occupancy() {
		ch <- prometheus.MustNewConstMetric(entriesDesc, prometheus.GaugeValue, float64(u.Entries), name)
		ch <- prometheus.MustNewConstMetric(maxDesc, prometheus.GaugeValue, float64(u.MaxEntries), name)
		ch <- prometheus.MustNewConstMetric(pressure, prometheus.GaugeValue, float64(u.Entries)/float64(u.MaxEntries), name)
	}
}

func (c *datapathCollector) occupancy() map[string]maps.Usage {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.occ == nil || time.Since(c.occAt) >= occupancyMaxAge {
		occ, err := maps.Occupancy(c.m)
		if err != nil {
			c.log.Error("count map entries", "err", err)
		}
		c.occ, c.occAt = occ, time.Now()
	}
	return c.occ
}
