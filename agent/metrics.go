package agent

import (
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/metrics"
)

// Metrics are the agent's Prometheus series, in a registry of their own so
// that several agents (tests) never clash.
type Metrics struct {
	Registry *prometheus.Registry

	SyncDuration       prometheus.Histogram
	Syncs              prometheus.Counter
	SyncErrors         prometheus.Counter
	ServiceApplies     prometheus.Counter
	ServicesProgrammed prometheus.Gauge
	BackendsProgrammed prometheus.Gauge
	UnsupportedPorts   prometheus.Counter
	InvalidServices    prometheus.Counter
}

func newMetrics(m *maps.Maps, log *slog.Logger) *Metrics {
	x := &Metrics{
		Registry: prometheus.NewRegistry(),
		SyncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "servicepath_sync_duration_seconds",
			Help:    "Time a sync of the API's state into the datapath maps took.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
		Syncs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "servicepath_syncs_total", Help: "Syncs run, coalescing every change seen since the one before."}),
		SyncErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "servicepath_sync_errors_total", Help: "Syncs that failed to program a Service; they are retried."}),
		ServiceApplies: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "servicepath_service_applies_total", Help: "Services whose frontends were written to or removed from the maps."}),
		ServicesProgrammed: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "servicepath_services_programmed", Help: "Frontends (cluster IP, port, protocol) in the datapath."}),
		BackendsProgrammed: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "servicepath_backends_programmed", Help: "Backends over all frontends in the datapath."}),
		UnsupportedPorts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "servicepath_unsupported_service_ports_total",
			Help: "Service ports reported because the datapath does not handle their protocol (SCTP)."}),
		InvalidServices: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "servicepath_invalid_services_total",
			Help: "Services (with their EndpointSlices) refused by translation; their frontends were left as they were."}),
	}
	x.Registry.MustRegister(x.SyncDuration, x.Syncs, x.SyncErrors, x.ServiceApplies, x.ServicesProgrammed,
		x.BackendsProgrammed, x.UnsupportedPorts, x.InvalidServices,
		&datapathCollector{m: m, log: log},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return x
}

// datapathCollector reads the BPF counters and map fill at scrape time.
type datapathCollector struct {
	m   *maps.Maps
	log *slog.Logger
}

var (
	packetsDesc = prometheus.NewDesc("servicepath_datapath_packets_total",
		"Packets by datapath verdict (see `servicepath stats`).", []string{"reason"}, nil)
	entriesDesc = prometheus.NewDesc("servicepath_map_entries", "Entries in a BPF map.", []string{"map"}, nil)
	maxDesc     = prometheus.NewDesc("servicepath_map_max_entries", "Capacity of a BPF map.", []string{"map"}, nil)
	pressure    = prometheus.NewDesc("servicepath_map_pressure", "Entries over capacity of a BPF map (0 to 1).", []string{"map"}, nil)
)

func (c *datapathCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{packetsDesc, entriesDesc, maxDesc, pressure} {
		ch <- d
	}
}

func (c *datapathCollector) Collect(ch chan<- prometheus.Metric) {
	counters, err := metrics.Read(c.m.Metrics)
	if err != nil {
		c.log.Error("read datapath counters", "err", err)
	}
	for name, v := range counters {
		ch <- prometheus.MustNewConstMetric(packetsDesc, prometheus.CounterValue, float64(v), name)
	}
	occ, err := maps.Occupancy(c.m)
	if err != nil {
		c.log.Error("count map entries", "err", err)
	}
	for name, u := range occ {
		ch <- prometheus.MustNewConstMetric(entriesDesc, prometheus.GaugeValue, float64(u.Entries), name)
		ch <- prometheus.MustNewConstMetric(maxDesc, prometheus.GaugeValue, float64(u.MaxEntries), name)
		ch <- prometheus.MustNewConstMetric(pressure, prometheus.GaugeValue, float64(u.Entries)/float64(u.MaxEntries), name)
	}
}
