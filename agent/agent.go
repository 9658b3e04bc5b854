// Package agent is servicepath as a kube-proxy replacement: it watches
// Services and EndpointSlices through shared informers and keeps the
// datapath's maps equal to what k8s.TranslateWith makes of them, in
// coalesced, rate-limited syncs, with liveness, readiness, kube-proxy's
// /healthz and Prometheus metrics.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/k8s"
)

// Config tunes the agent; zero values take kube-proxy's defaults.
type Config struct {
	// NodeName is this node, for traffic policies Local, topology hints
	// (with its Node's zone label, which the agent watches) and Events.
	NodeName string
	// MinSyncPeriod is the least time between two syncs: changes arriving
	// meanwhile are coalesced into the next one (kube-proxy: 1s).
	MinSyncPeriod time.Duration
	// SyncPeriod is how often everything is compared with the maps, which
	// undoes changes made behind the agent's back (kube-proxy: 30s).
	SyncPeriod time.Duration
	// HealthzTimeout is how long a change may stay unsynced before
	// /healthz fails, and a sync run before /livez does (kube-proxy: two
	// SyncPeriods).
	HealthzTimeout time.Duration
	// OnRemoved, when set, is given the backends each sync removed from
	// their frontends (to close the sockets still connected to them).
	OnRemoved func([]service.Removed) error
	// Pods, when set, has the agent watch its node's Pods: their hostPorts
	// are programmed, and the pod devices and sp_endpoints kept as
	// PodNetwork says. Nil: no Pod is watched.
	Pods   *PodNetwork
	Logger *slog.Logger
}

const (
	defaultMinSyncPeriod = time.Second
	defaultSyncPeriod    = 30 * time.Second
	maxRetryBackoff      = 30 * time.Second
	byServiceIndex       = "service"
)

// Agent keeps the datapath equal to the API's Services. Run it once.
type Agent struct {
	cfg     Config
	log     *slog.Logger
	mgr     *service.Manager
	health  health
	checks  *serviceHealth // healthCheckNodePorts
	Metrics *Metrics

	factory      informers.SharedInformerFactory
	services     corelisters.ServiceLister
	serviceIndex cache.Indexer // by byAddressIndex and byPortIndex too
	slices       cache.Indexer
	pods         *pods // nil without Config.Pods
	broadcaster  record.EventBroadcaster
	recorder     record.EventRecorder

	mu    sync.Mutex
	dirty map[string]bool // Services ("namespace/name") to sync
	full  bool            // sync every Service and every programmed owner
	kick  chan struct{}
	// pending is what the dirty Services are dirty for, for the change
	// metrics: their Service, their EndpointSlices, and the earliest
	// endpoints change trigger time among those slices.
	pending map[string]*pendingChange

	// reported is the problem last reported per Service, so that each is
	// logged and sent as an Event once, not on every sync.
	reported map[string]string
}

// New builds an agent over the datapath maps m; the service manager reads
// what they already hold, so a restarted agent only changes the difference.
func New(client kubernetes.Interface, m *maps.Maps, cfg Config) (*Agent, error) {
	cfg.MinSyncPeriod = cmpOr(cfg.MinSyncPeriod, defaultMinSyncPeriod)
	cfg.SyncPeriod = cmpOr(cfg.SyncPeriod, defaultSyncPeriod)
	cfg.HealthzTimeout = cmpOr(cfg.HealthzTimeout, 2*cfg.SyncPeriod)
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	mgr, err := service.NewManager(m)
	if err != nil {
		return nil, err
	}
	a := &Agent{
		cfg: cfg, log: cfg.Logger, mgr: mgr,
		Metrics:  newMetrics(m, cfg.Logger),
		dirty:    map[string]bool{},
		pending:  map[string]*pendingChange{},
		kick:     make(chan struct{}, 1),
		reported: map[string]string{},
	}
	// No informer resync: the agent's own full sync compares with the maps.
	a.factory = informers.NewSharedInformerFactory(client, 0)
	a.health = health{timeout: cfg.HealthzTimeout, probe: func() error { return probeMaps(m) }}
	if cfg.NodeName != "" {
		var nodes cache.SharedIndexInformer
		nodes, a.health.node = nodeLister(a.factory, cfg.NodeName)
		// Topology hints are chosen by the node's zone: as kube-proxy, a
		// change of it resyncs everything.
		if _, err := nodes.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc: func(any) { a.markAll() },
			UpdateFunc: func(old, cur any) {
				if from, to := zoneOf(old), zoneOf(cur); from != to {
					a.log.Info("node zone changed; resyncing every Service", "node", cfg.NodeName, "from", from, "to", to)
					a.markAll()
				}
			},
			DeleteFunc: func(any) { a.markAll() },
		}); err != nil {
			return nil, err
		}
	}
	svcInformer := a.factory.Core().V1().Services()
	sliceInformer := a.factory.Discovery().V1().EndpointSlices().Informer()
	if err := sliceInformer.AddIndexers(cache.Indexers{byServiceIndex: sliceOwnerIndex}); err != nil {
		return nil, err
	}
	if err := svcInformer.Informer().AddIndexers(cache.Indexers{byAddressIndex: serviceAddrIndex, byPortIndex: servicePortIndex}); err != nil {
		return nil, err
	}
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc: a.changed,
		UpdateFunc: func(old, cur any) {
			a.changed(old) // a slice may move to another Service
			a.changed(cur)
		},
		DeleteFunc: a.changed,
	}
	if _, err := svcInformer.Informer().AddEventHandler(handler); err != nil {
		return nil, err
	}
	if _, err := sliceInformer.AddEventHandler(handler); err != nil {
		return nil, err
	}
	a.services = svcInformer.Lister()
	a.serviceIndex = svcInformer.Informer().GetIndexer()
	a.slices = sliceInformer.GetIndexer()
	if cfg.Pods != nil {
		if a.pods, err = newPods(client, cfg.Pods, cfg.NodeName, cfg.SyncPeriod, cfg.Logger, a.changed); err != nil {
			return nil, err
		}
	}

	a.broadcaster = record.NewBroadcaster()
	a.broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	a.recorder = a.broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "servicepath", Host: cfg.NodeName})
	a.checks = newServiceHealth(a.log, a.recorder, cfg.NodeName, a.Metrics.Registry,
		func() bool { return a.health.proxyHealth().Healthy })
	return a, nil
}

func cmpOr(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

func sliceOwnerIndex(obj any) ([]string, error) {
	es, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return nil, fmt.Errorf("indexing %T as an EndpointSlice", obj)
	}
	if owner := k8s.SliceOwner(es); owner != "" {
		return []string{owner}, nil
	}
	return nil, nil
}

// HealthHandler serves /livez, /readyz and kube-proxy's /healthz (see
// health).
func (a *Agent) HealthHandler() http.Handler { return a.health.handler() }

// Ready is what /readyz serves: the first full sync done and the last sync
// successful, and why not when not.
func (a *Agent) Ready() (bool, string) { return a.health.Ready() }

// Run starts the informers, waits for their caches, then syncs until ctx
// ends. Nothing is removed from the maps before the caches are complete.
func (a *Agent) Run(ctx context.Context) error {
	defer a.broadcaster.Shutdown()
	defer a.checks.close()
	a.health.started()
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	factories := []informers.SharedInformerFactory{a.factory}
	if a.pods != nil {
		factories = append(factories, a.pods.factory)
		wg.Go(func() {
			if err := a.pods.run(ctx); err != nil {
				a.log.Error("pod devices and endpoints", "err", err)
			}
		})
	}
	defer func() {
		cancel()
		wg.Wait()
		for _, f := range factories {
			f.Shutdown()
		}
	}()
	for _, f := range factories {
		f.Start(ctx.Done())
	}
	for _, f := range factories {
		for typ, ok := range f.WaitForCacheSync(ctx.Done()) {
			if !ok {
				if ctx.Err() != nil {
					return nil
				}
				return fmt.Errorf("cache of %v never synced", typ)
			}
		}
	}
	a.log.Info("caches synced; first full sync")
	a.markAll()
	if a.pods != nil {
		a.pods.signal()
	}
	return a.loop(ctx)
}

func (a *Agent) signal() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// changed marks the Service an informer object belongs to.
func (a *Agent) changed(obj any) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	var name string
	var slice *discoveryv1.EndpointSlice
	switch o := obj.(type) {
	case *corev1.Service:
		name = k8s.ServiceName(o)
	case *discoveryv1.EndpointSlice:
		name, slice = k8s.SliceOwner(o), o
	case *corev1.Pod:
		name = k8s.PodName(o)
	}
	if name == "" {
		return
	}
	a.mu.Lock()
	a.dirty[name] = true
	// A frontend it held or claimed may change hands (conflicts.go).
	switch o := obj.(type) {
	case *corev1.Service:
		for _, other := range a.sharing(o) {
			a.dirty[k8s.ServiceName(other)] = true
		}
		for _, pod := range a.podsSharing(o) {
			a.dirty[k8s.PodName(pod)] = true
		}
	case *corev1.Pod:
		for _, svc := range a.servicesSharing(o) {
			a.dirty[k8s.ServiceName(svc)] = true
		}
	}
	if _, isPod := obj.(*corev1.Pod); !isPod {
		a.notePending(name, slice)
	}
	a.health.changed()
	a.mu.Unlock()
	a.Metrics.SyncLastQueued.SetToCurrentTime()
	a.signal()
}

type pendingChange struct {
	service, endpoints bool
	trigger            time.Time // zero: none known
}

// notePending counts a change of name's Service (slice nil) or of one of
// its EndpointSlices. a.mu is held.
func (a *Agent) notePending(name string, slice *discoveryv1.EndpointSlice) {
	if slice == nil {
		a.Metrics.ServiceChanges.Inc()
		a.addPending(name, pendingChange{service: true})
		return
	}
	a.Metrics.EndpointChanges.Inc()
	c := pendingChange{endpoints: true}
	// Set by the EndpointSlice controller when the change that led to this
	// slice happened (a Pod or the Service changing), as kube-proxy reads it
	// for its network programming latency.
	if t, err := time.Parse(time.RFC3339Nano, slice.Annotations[corev1.EndpointsLastChangeTriggerTime]); err == nil {
		c.trigger = t
	}
	a.addPending(name, c)
}

// addPending merges c into what name is pending for, keeping the earliest
// trigger time. a.mu is held.
func (a *Agent) addPending(name string, c pendingChange) {
	p := a.pending[name]
	if p == nil {
		p = &pendingChange{}
		a.pending[name] = p
	}
	p.service, p.endpoints = p.service || c.service, p.endpoints || c.endpoints
	if !c.trigger.IsZero() && (p.trigger.IsZero() || c.trigger.Before(p.trigger)) {
		p.trigger = c.trigger
	}
	a.setPendingGauges()
}

func (a *Agent) setPendingGauges() {
	var svcs, eps int
	for _, p := range a.pending {
		if p.service {
			svcs++
		}
		if p.endpoints {
			eps++
		}
	}
	a.Metrics.ServiceChangesPending.Set(float64(svcs))
	a.Metrics.EndpointChangesPending.Set(float64(eps))
}

func (a *Agent) markAll() {
	a.mu.Lock()
	a.full = true
	a.health.kick()
	a.mu.Unlock()
	a.signal()
}

func (a *Agent) loop(ctx context.Context) error {
	resync := time.NewTicker(a.cfg.SyncPeriod)
	defer resync.Stop()
	var last time.Time
	var backoff time.Duration
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-a.kick:
		case <-resync.C:
			a.markAll()
		}
		// Changes that arrive while waiting join this sync.
		if wait := a.cfg.MinSyncPeriod - time.Since(last); wait > 0 {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(wait):
			}
		}
		last = time.Now()
		if err := a.sync(); err != nil {
			backoff = min(max(2*backoff, a.cfg.MinSyncPeriod), maxRetryBackoff)
			a.log.Error("sync failed; retrying", "in", backoff, "err", err)
			time.AfterFunc(backoff, a.signal)
			continue
		}
		backoff = 0
	}
}

type change struct {
	name    string
	desired []service.Service
}

// sync programs every marked Service whose frontends differ from the maps.
// A Service is applied whole or not at all (the manager checks that it fits
// before writing); one that fails is marked again for the retry.
func (a *Agent) sync() error {
	start := time.Now()
	a.mu.Lock()
	keys, full, pending := a.dirty, a.full, a.pending
	a.dirty, a.full, a.pending = map[string]bool{}, false, map[string]*pendingChange{}
	a.setPendingGauges()
	a.health.syncing()
	a.mu.Unlock()

	if full {
		svcs, err := a.services.List(labels.Everything())
		if err != nil {
			return err
		}
		for _, svc := range svcs {
			keys[k8s.ServiceName(svc)] = true
		}
		if a.pods != nil {
			pods, err := a.pods.list()
			if err != nil {
				return err
			}
			for _, p := range pods {
				keys[k8s.PodName(p)] = true
			}
		}
		// Owners the API no longer has: stale, removed.
		for _, name := range a.mgr.Owners() {
			keys[name] = true
		}
	}

	// Removals first, so a cluster IP freed by one Service is free for the
	// Service given it in the same sync.
	var removals, updates []change
	for name := range keys {
		desired, ok := a.desired(name)
		if !ok {
			continue
		}
		if len(desired) == 0 {
			removals = append(removals, change{name, nil})
		} else {
			updates = append(updates, change{name, desired})
		}
	}
	byName := func(x, y change) int { return strings.Compare(x.name, y.name) }
	slices.SortFunc(removals, byName)
	slices.SortFunc(updates, byName)
	var failed []change
	var errs []error
	for _, cs := range [][]change{removals, updates} {
		failed = append(failed, a.apply(cs)...)
	}
	// A Service may have failed only for one applied after it, as a cluster
	// IP another Service gave up: once more alone, then it waits.
	for _, c := range failed {
		if err := a.mgr.Apply([]string{c.name}, c.desired); err != nil {
			errs = append(errs, fmt.Errorf("service %s: %w", c.name, err))
			a.mu.Lock()
			a.dirty[c.name] = true
			if p := pending[c.name]; p != nil {
				a.addPending(c.name, *p)
			}
			a.mu.Unlock()
			delete(pending, c.name)
		}
	}
	for _, name := range a.mgr.TakeChanged() {
		a.Metrics.ServiceApplies.Inc()
		a.log.Debug("programmed", "service", name)
	}

	if removed := a.mgr.TakeRemoved(); len(removed) > 0 && a.cfg.OnRemoved != nil {
		if err := a.cfg.OnRemoved(removed); err != nil {
			a.log.Error("close sockets of removed backends", "backends", len(removed), "err", err)
		}
	}
	now := time.Now()
	for _, p := range pending {
		if !p.trigger.IsZero() {
			a.Metrics.NetworkProgramming.Observe(now.Sub(p.trigger).Seconds())
		}
	}
	owners, frontends, backends := a.mgr.Totals()
	a.checks.sync()
	a.Metrics.ServicesProgrammed.Set(float64(owners))
	a.Metrics.FrontendsProgrammed.Set(float64(frontends))
	a.Metrics.BackendsProgrammed.Set(float64(backends))
	a.Metrics.SyncDuration.Observe(now.Sub(start).Seconds())
	err := errors.Join(errs...)
	if err == nil {
		a.Metrics.SyncLastTimestamp.Set(float64(now.UnixNano()) / 1e9)
	} else {
		a.Metrics.SyncErrors.Inc()
		if full {
			// The first full sync is what /readyz waits for: retry it whole.
			a.mu.Lock()
			a.full = true
			a.mu.Unlock()
		}
	}
	a.health.record(err, full)
	return err
}

// apply programs cs in one Apply, which the manager writes batched when it
// is big, and returns the changes that failed: a failing Apply is split in
// halves until each failing Service is alone, so one bad Service costs the
// rest a few more Applies, not one each. The manager writes only what
// differs from the maps, so an unchanged Service costs no map write.
func (a *Agent) apply(cs []change) (failed []change) {
	if len(cs) == 0 {
		return nil
	}
	names := make([]string, 0, len(cs))
	var desired []service.Service
	for _, c := range cs {
		names = append(names, c.name)
		desired = append(desired, c.desired...)
	}
	if err := a.mgr.Apply(names, desired); err == nil {
		return nil
	} else if len(cs) == 1 {
		a.log.Debug("apply failed", "service", cs[0].name, "err", err)
		return cs
	}
	half := len(cs) / 2
	return append(a.apply(cs[:half]), a.apply(cs[half:])...)
}

// desired translates one Service with its slices. ok is false when the
// translation was refused: the Service's frontends are then left alone.
func (a *Agent) desired(name string) (services []service.Service, ok bool) {
	if strings.HasPrefix(name, "pod:") {
		return a.hostPorts(name)
	}
	ns, n, _ := strings.Cut(name, "/")
	svc, err := a.services.Services(ns).Get(n)
	if apierrors.IsNotFound(err) {
		delete(a.reported, name)
		a.checks.remove(name)
		return nil, true
	}
	if err != nil {
		a.log.Error("read Service from cache", "service", name, "err", err)
		return nil, false
	}
	objs, err := a.slices.ByIndex(byServiceIndex, name)
	if err != nil {
		a.log.Error("read EndpointSlices from cache", "service", name, "err", err)
		return nil, false
	}
	eps := make([]*discoveryv1.EndpointSlice, 0, len(objs))
	for _, o := range objs {
		eps = append(eps, o.(*discoveryv1.EndpointSlice))
	}
	opts := k8s.Options{NodeName: a.cfg.NodeName}
	if a.health.node != nil {
		opts.Zone = zoneOf(a.health.node())
	}
	res, err := k8s.TranslateWith(opts, []*corev1.Service{svc}, eps)
	var conflicts []string
	if err == nil {
		res.Services, conflicts = a.withoutClaimed(svc, opts, res.Services)
	}
	a.report(svc, name, "InvalidService", res, conflicts, err)
	if err != nil {
		return nil, false
	}
	a.checks.set(svc, res)
	return res.Services, true
}

// zoneOf is a Node's topology.kubernetes.io/zone label, "" for none or
// no Node.
func zoneOf(obj any) string {
	if n, ok := obj.(*corev1.Node); ok && n != nil {
		return n.Labels[corev1.LabelTopologyZone]
	}
	return ""
}

// report logs the problems of obj (a Service, or a Pod's hostPorts), sends
// them as Events and counts them, once per change.
func (a *Agent) report(obj runtime.Object, name, invalid string, res k8s.Result, conflicts []string, err error) {
	msgs := append(slices.Clone(res.Unsupported), conflicts...)
	if err != nil {
		msgs = append(msgs, err.Error())
	}
	joined := strings.Join(msgs, "\n")
	if a.reported[name] == joined {
		return
	}
	a.reported[name] = joined
	for _, u := range res.Unsupported {
		a.log.Warn("port not programmed", "owner", name, "reason", u)
		a.recorder.Event(obj, corev1.EventTypeWarning, "UnsupportedProtocol", u)
		a.Metrics.UnsupportedPorts.Inc()
	}
	for _, c := range conflicts {
		a.log.Warn("frontend not programmed", "owner", name, "reason", c)
		a.recorder.Event(obj, corev1.EventTypeWarning, "FrontendInUse", c)
	}
	if err != nil {
		a.log.Error("not programmed; its frontends are left as they were", "owner", name, "err", err)
		a.recorder.Event(obj, corev1.EventTypeWarning, invalid, err.Error())
		a.Metrics.InvalidServices.Inc()
	}
}
