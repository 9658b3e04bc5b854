package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/servicepath/servicepath/datapath/maps"
)

// toBeDeletedTaint is put on a node by the cluster autoscaler before it
// removes the node; kube-proxy's /healthz then fails, so that load
// balancers drain the node first.
const toBeDeletedTaint = "ToBeDeletedByClusterAutoscaler"

// health is what the healthz address serves, three questions apart:
//   - /livez: is the process worth keeping? The sync loop is not wedged
//     and the maps answer. A failing sync is no reason to restart.
//   - /readyz: has the first full sync programmed the API's state, and did
//     the last sync succeed?
//   - /healthz: kube-proxy's contract, which load balancers and the e2e
//     suite probe: no change pending longer than the timeout, and the node
//     not being deleted.
type health struct {
	timeout time.Duration
	// probe is a cheap operation on the maps: nil when they answer.
	probe func() error
	// node is this node from the informer's cache (nil: not there); the
	// func is nil when the agent has no node name to look for.
	node func() *corev1.Node

	mu      sync.Mutex
	synced  bool
	lastErr error
	// lastUpdated is when the last sync succeeded (or the loop started).
	lastUpdated time.Time
	// queued is the oldest change no sync has taken yet; inFlight the
	// oldest change the running or last failed sync took: both pending
	// until a sync succeeds.
	queued, inFlight time.Time
	// kicked is when the loop was asked for a sync it has not started;
	// syncStart when the running sync began. Either old means wedged.
	kicked, syncStart time.Time
}

func earliest(a, b time.Time) time.Time {
	if a.IsZero() || !b.IsZero() && b.Before(a) {
		return b
	}
	return a
}

// started is kube-proxy's Updated at the start of its sync loop: healthy
// for one timeout, however long the caches take.
func (h *health) started() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.lastUpdated = time.Now()
}

// changed records an informer change (kube-proxy's QueuedUpdate).
func (h *health) changed() {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := time.Now()
	h.queued = earliest(h.queued, now)
	h.kicked = earliest(h.kicked, now)
}

// kick records that a sync of everything was asked for.
func (h *health) kick() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.kicked = earliest(h.kicked, time.Now())
}

// syncing records that a sync took every change marked so far.
func (h *health) syncing() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.syncStart, h.kicked = time.Now(), time.Time{}
	h.inFlight, h.queued = earliest(h.inFlight, h.queued), time.Time{}
}

// record ends a sync; full says it covered every Service.
func (h *health) record(err error, full bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.syncStart = time.Time{}
	h.lastErr = err
	if err == nil {
		h.lastUpdated = time.Now()
		h.inFlight = time.Time{}
		h.synced = h.synced || full
	}
}

// Ready reports what /readyz serves, and why when not ready.
func (h *health) Ready() (bool, string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case !h.synced && h.lastErr != nil:
		return false, "first full sync failed: " + h.lastErr.Error()
	case !h.synced:
		return false, "first full sync not done"
	case h.lastErr != nil:
		return false, "last sync failed: " + h.lastErr.Error()
	}
	return true, ""
}

// Live reports what /livez serves: nil, or why the agent should restart.
func (h *health) Live() error {
	h.mu.Lock()
	now := time.Now()
	kicked, syncStart := h.kicked, h.syncStart
	h.mu.Unlock()
	switch {
	case !syncStart.IsZero() && now.Sub(syncStart) > h.timeout:
		return fmt.Errorf("a sync has been running for %s", now.Sub(syncStart).Round(time.Millisecond))
	case !kicked.IsZero() && now.Sub(kicked) > h.timeout:
		return fmt.Errorf("the sync loop has not taken changes queued %s ago", now.Sub(kicked).Round(time.Millisecond))
	}
	if err := h.probe(); err != nil {
		return fmt.Errorf("maps do not answer: %w", err)
	}
	return nil
}

// proxyHealth is kube-proxy's /healthz body (pkg/proxy/healthcheck): one
// proxier here serves both families, so both report the same.
type proxyHealth struct {
	LastUpdated  time.Time                         `json:"lastUpdated"`
	CurrentTime  time.Time                         `json:"currentTime"`
	NodeEligible *bool                             `json:"nodeEligible,omitempty"`
	Healthy      bool                              `json:"healthy"`
	Status       map[corev1.IPFamily]proxierHealth `json:"status,omitempty"`
}

type proxierHealth struct {
	LastUpdated time.Time `json:"lastUpdated"`
	Healthy     bool      `json:"healthy"`
}

// proxyHealth is kube-proxy's Health(): unhealthy when a change has been
// pending for longer than the timeout, whether its sync failed or never ran.
func (h *health) proxyHealth() proxyHealth {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := time.Now()
	pending := earliest(h.queued, h.inFlight)
	ph := proxierHealth{LastUpdated: h.lastUpdated, Healthy: pending.IsZero() || now.Sub(pending) < h.timeout}
	return proxyHealth{LastUpdated: h.lastUpdated, CurrentTime: now, Healthy: ph.Healthy,
		Status: map[corev1.IPFamily]proxierHealth{corev1.IPv4Protocol: ph, corev1.IPv6Protocol: ph}}
}

// nodeEligible is kube-proxy's: the node exists, is not being deleted and
// carries no autoscaler deletion taint. Nil without a node name.
func (h *health) nodeEligible() *bool {
	if h.node == nil {
		return nil
	}
	n := h.node()
	if n == nil || n.DeletionTimestamp != nil {
		return new(bool)
	}
	ok := true
	for _, t := range n.Spec.Taints {
		ok = ok && t.Key != toBeDeletedTaint
	}
	return &ok
}

func (h *health) serveHealthz(w http.ResponseWriter, _ *http.Request) {
	ph := h.proxyHealth()
	ph.NodeEligible = h.nodeEligible()
	healthy := ph.Healthy && (ph.NodeEligible == nil || *ph.NodeEligible)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	if healthy {
		// As kube-proxy: lastUpdated reads "recent" while healthy.
		ph.LastUpdated = ph.CurrentTime
		w.WriteHeader(http.StatusOK)
	} else {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	json.NewEncoder(w).Encode(ph)
}

// serveCheck answers a probe in the apiserver's style: "ok", or 503 and why.
func serveCheck(w http.ResponseWriter, err error) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	if err != nil {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintln(w, err)
		return
	}
	fmt.Fprintln(w, "ok")
}

func (h *health) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", h.serveHealthz)
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) { serveCheck(w, h.Live()) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		var err error
		if ok, why := h.Ready(); !ok {
			err = errors.New(why)
		}
		serveCheck(w, err)
	})
	return mux
}

// probeMaps looks a key up in the service map: a syscall on the map the
// datapath reads first, which fails only when the maps are unusable.
func probeMaps(m *maps.Maps) error {
	var v maps.ServiceValue
	if err := m.Services.Lookup(&maps.ServiceKey{}, &v); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("look up in %s: %w", maps.ServicesName, err)
	}
	return nil
}

// nodeLister watches this node alone, in the factory's informers, as
// kube-proxy's NodeManager does for /healthz and its topology labels.
func nodeLister(factory informers.SharedInformerFactory, name string) (cache.SharedIndexInformer, func() *corev1.Node) {
	informer := factory.InformerFor(&corev1.Node{}, func(c kubernetes.Interface, resync time.Duration) cache.SharedIndexInformer {
		return coreinformers.NewFilteredNodeInformer(c, resync, cache.Indexers{}, func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", name).String()
		})
	})
	lister := corelisters.NewNodeLister(informer.GetIndexer())
	return informer, func() *corev1.Node {
		n, err := lister.Get(name)
		if err != nil {
			return nil
		}
		return n
	}
}
