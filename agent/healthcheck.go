package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/record"

	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/k8s"
)

// serviceHealth serves spec.healthCheckNodePort for every LoadBalancer
// Service with externalTrafficPolicy Local, as kube-proxy does
// (pkg/proxy/healthcheck/service_health.go): the cloud's load balancer
// probes it on every node and sends traffic only to the nodes that answer
// 200, those with a ready endpoint of the Service.
type serviceHealth struct {
	log      *slog.Logger
	recorder record.EventRecorder
	node     string
	// proxyHealthy is /healthz's verdict without the node's eligibility.
	proxyHealthy func() bool
	listen       func(port uint16) (net.Listener, error)
	ports        *prometheus.GaugeVec

	mu sync.RWMutex
	// want is what the translated Services ask for; open what is served.
	want map[string]healthCheck
	open map[string]*healthServer
	// failed is the port each Service could not bind, reported once.
	failed map[string]uint16
}

type healthCheck struct {
	svc   *corev1.Service
	port  uint16
	local int // ready endpoints on this node
}

type healthServer struct {
	port  uint16
	local int
	srv   *http.Server
}

func newServiceHealth(log *slog.Logger, recorder record.EventRecorder, node string, reg prometheus.Registerer,
	proxyHealthy func() bool) *serviceHealth {
	h := &serviceHealth{
		log: log, recorder: recorder, node: node, proxyHealthy: proxyHealthy,
		listen: func(port uint16) (net.Listener, error) {
			// Every address of the node, both families, as kube-proxy.
			return net.Listen("tcp", net.JoinHostPort("", strconv.Itoa(int(port))))
		},
		ports: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "servicepath_health_check_node_ports",
			Help: "healthCheckNodePorts of externalTrafficPolicy Local Services: served, or failed (the port could not be bound).",
		}, []string{"state"}),
		want: map[string]healthCheck{}, open: map[string]*healthServer{}, failed: map[string]uint16{},
	}
	reg.MustRegister(h.ports)
	return h
}

// set records what a translated Service asks for: a health check port
// when it is a LoadBalancer with externalTrafficPolicy Local, with the
// count of its distinct ready endpoint addresses on this node, which the
// translation kept on its external frontends.
func (h *serviceHealth) set(svc *corev1.Service, res k8s.Result) {
	name := k8s.ServiceName(svc)
	h.mu.Lock()
	defer h.mu.Unlock()
	if svc.Spec.Type != corev1.ServiceTypeLoadBalancer || svc.Spec.ExternalTrafficPolicy != corev1.ServiceExternalTrafficPolicyLocal ||
		svc.Spec.HealthCheckNodePort <= 0 || svc.Spec.HealthCheckNodePort > 65535 || len(res.Skipped) > 0 {
		delete(h.want, name)
		return
	}
	local := map[netip.Addr]bool{}
	for _, s := range res.Services {
		if !s.ExternalLocal {
			continue
		}
		for _, b := range s.Backends {
			if b.State == service.Active {
				local[b.Addr] = true
			}
		}
	}
	h.want[name] = healthCheck{svc: svc, port: uint16(svc.Spec.HealthCheckNodePort), local: len(local)}
}

// remove forgets a Service the API no longer has.
func (h *serviceHealth) remove(name string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.want, name)
}

// sync opens and closes ports to match what the Services ask for. A port
// that cannot be bound is logged, sent as an Event and counted, once,
// and tried again on the next sync; it never fails the sync, whose
// frontends are fine.
func (h *serviceHealth) sync() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for name, o := range h.open {
		if w, ok := h.want[name]; !ok || w.port != o.port {
			h.log.Info("closing health check", "service", name, "port", o.port)
			o.srv.Close()
			delete(h.open, name)
		}
	}
	for name, port := range h.failed {
		if w, ok := h.want[name]; !ok || w.port != port {
			delete(h.failed, name)
		}
	}
	for name, w := range h.want {
		if o, ok := h.open[name]; ok {
			o.local = w.local
			continue
		}
		ln, err := h.listen(w.port)
		if err != nil {
			if h.failed[name] != w.port {
				h.failed[name] = w.port
				msg := fmt.Sprintf("node %s failed to start healthcheck %q on port %d: %v", h.node, name, w.port, err)
				h.log.Error("health check port not served", "service", name, "port", w.port, "err", err)
				h.recorder.Event(w.svc, corev1.EventTypeWarning, "FailedToStartServiceHealthcheck", msg)
			}
			continue
		}
		delete(h.failed, name)
		h.log.Info("opening health check", "service", name, "port", w.port)
		o := &healthServer{port: w.port, local: w.local}
		o.srv = &http.Server{Handler: h.handler(name, w.svc), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := o.srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
				h.log.Error("health check closed", "service", name, "port", o.port, "err", err)
			}
		}()
		h.open[name] = o
	}
	h.ports.WithLabelValues("served").Set(float64(len(h.open)))
	h.ports.WithLabelValues("failed").Set(float64(len(h.failed)))
}

// close stops serving every port.
func (h *serviceHealth) close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for name, o := range h.open {
		o.srv.Close()
		delete(h.open, name)
	}
}

// handler answers any path as kube-proxy's hcHandler: the same headers,
// and the same JSON, byte for byte.
func (h *serviceHealth) handler(name string, svc *corev1.Service) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		h.mu.RLock()
		var count int
		if o := h.open[name]; o != nil {
			count = o.local
		}
		h.mu.RUnlock()
		healthy := h.proxyHealthy()
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("X-Load-Balancing-Endpoint-Weight", strconv.Itoa(count))
		if count != 0 && healthy {
			w.WriteHeader(http.StatusOK)
		} else {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		fmt.Fprintf(w, "{\n\t\"service\": {\n\t\t\"namespace\": %q,\n\t\t\"name\": %q\n\t},\n\t\"localEndpoints\": %d,\n\t\"serviceProxyHealthy\": %v\n}",
			svc.Namespace, svc.Name, count, healthy)
	})
}
