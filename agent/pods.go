package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/bandwidth"
	"github.com/servicepath/servicepath/datapath/endpoints"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/k8s"
)

// PodNetwork is what the agent does for the Pods of its node besides their
// hostPorts: the pod-side programs on their devices as the devices come
// and go, and sp_endpoints, which BPF host routing delivers to local pods
// by, equal to the pods.
type PodNetwork struct {
	// Devices selects the host-side pod devices (veths, and netkit
	// primaries, whose programs go in netkit's slots) by name; empty:
	// none, so nothing is attached and sp_endpoints stays empty.
	Devices DevicePattern
	// NodeDevices are never pod devices, whatever their names.
	NodeDevices []string
	// Attacher puts FromPod at tc ingress and ToPod at tc egress of each
	// pod device.
	Attacher       *attach.Attacher
	FromPod, ToPod *ebpf.Program
	// Endpoints is sp_endpoints (loader.Datapath.Endpoints). The agent owns
	// it: entries that are no pod's are removed.
	Endpoints *ebpf.Map
	// Do runs fn in the netns of the pod devices (tests); nil: the agent's.
	Do func(fn func() error) error
	// BigTCP raises each pod device's GSO/GRO limits to
	// netdev.BigTCPSize as it is attached to, as far as the kernel lets it.
	// Only the host side is the agent's: the pod's own end, which sets
	// what the pod sends, is the CNI's.
	BigTCP bool
	// Bandwidth, when set, holds each pod with a valid
	// kubernetes.io/egress-bandwidth to its rate off the node (fq must be
	// on the node devices: bandwidth.EnsureFQ). The agent owns its maps.
	Bandwidth *bandwidth.Manager
}

const (
	// podRetryMin is how soon an IP whose device is not there yet (the
	// CNI adds its route) is looked at again; doubled up to SyncPeriod.
	podRetryMin = 250 * time.Millisecond
	// resubscribeDelay spaces attempts to subscribe to link updates.
	resubscribeDelay = time.Second
)

// pods is the agent's view of its node's Pods.
type pods struct {
	cfg     *PodNetwork
	log     *slog.Logger
	node    string
	period  time.Duration
	factory informers.SharedInformerFactory
	lister  corelisters.PodLister
	index   cache.Indexer // by byPortIndex too
	synced  cache.InformerSynced
	devices *podDevices
	kick    chan struct{}
	// badRates are the refused egress-bandwidth annotations, by pod, as
	// of the last sync: each is logged once.
	badRates map[string]string
}

// newPods watches the Pods of node (spec.nodeName, so the API server sends
// no other node's) and calls changed with each one that changes.
func newPods(client kubernetes.Interface, cfg *PodNetwork, node string, period time.Duration, log *slog.Logger, changed func(any)) (*pods, error) {
	if node == "" {
		return nil, errors.New("pods: the agent needs its node's name")
	}
	p := &pods{
		cfg: cfg, log: log, node: node, period: period,
		devices:  &podDevices{cfg: cfg, log: log, attached: map[int]string{}},
		kick:     make(chan struct{}, 1),
		badRates: map[string]string{},
	}
	p.factory = informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", node).String()
		}))
	inf := p.factory.Core().V1().Pods()
	on := func(obj any) {
		changed(obj)
		p.signal()
	}
	if _, err := inf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    on,
		UpdateFunc: func(_, cur any) { on(cur) },
		DeleteFunc: on,
	}); err != nil {
		return nil, err
	}
	if err := inf.Informer().AddIndexers(cache.Indexers{byPortIndex: podHostPortIndex}); err != nil {
		return nil, err
	}
	p.lister, p.index, p.synced = inf.Lister(), inf.Informer().GetIndexer(), inf.Informer().HasSynced
	return p, nil
}

func (p *pods) signal() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// list is this node's Pods from the cache. The field selector already
// keeps other nodes' out; checked again, as a fake clientset ignores it.
func (p *pods) list() ([]*corev1.Pod, error) {
	all, err := p.lister.List(labels.Everything())
	if err != nil {
		return nil, err
	}
	out := all[:0:0]
	for _, pod := range all {
		if pod.Spec.NodeName == p.node {
			out = append(out, pod)
		}
	}
	return out, nil
}

// hostPorts is what a Pod's owner name ("pod:namespace/name") should have
// programmed: its hostPorts as k8s.TranslatePods makes them, nothing once
// the Pod is gone. ok is false when the translation was refused.
func (a *Agent) hostPorts(name string) (services []service.Service, ok bool) {
	if a.pods == nil {
		return nil, true
	}
	ns, n, _ := strings.Cut(strings.TrimPrefix(name, "pod:"), "/")
	pod, err := a.pods.lister.Pods(ns).Get(n)
	if apierrors.IsNotFound(err) {
		delete(a.reported, name)
		return nil, true
	}
	if err != nil {
		a.log.Error("read Pod from cache", "pod", name, "err", err)
		return nil, false
	}
	if pod.Spec.HostNetwork {
		return nil, true // its containers bind the hostPorts themselves
	}
	opts := k8s.Options{NodeName: a.cfg.NodeName}
	res, err := k8s.TranslatePods(opts, []*corev1.Pod{pod})
	var conflicts []string
	if err == nil {
		res.Services, conflicts = a.hostPortsWithoutClaimed(pod, opts, res.Services)
	}
	a.report(pod, name, "InvalidHostPort", res, conflicts, err)
	if err != nil {
		return nil, false
	}
	return res.Services, true
}

// run keeps the pod devices and sp_endpoints in line until ctx ends, in
// the pod devices' netns. sp_endpoints is left alone until the Pod cache
// is complete.
func (p *pods) run(ctx context.Context) error {
	do := p.cfg.Do
	if do == nil {
		do = func(fn func() error) error { return fn() }
	}
	return do(func() error {
		p.loop(ctx)
		return nil
	})
}

func (p *pods) loop(ctx context.Context) {
	var (
		updates <-chan netlink.LinkUpdate
		stop    chan struct{} // ends the current subscription
		retry   = time.NewTimer(0)
		backoff time.Duration
	)
	defer func() {
		if stop != nil {
			close(stop)
		}
	}()
	resync := time.NewTicker(p.period)
	defer resync.Stop()
	watching := len(p.cfg.Devices) > 0
	for {
		select {
		case <-ctx.Done():
			return
		case u, ok := <-updates:
			if !ok {
				p.log.Warn("link updates ended; subscribing again", "in", resubscribeDelay)
				updates = nil
				retry.Reset(resubscribeDelay)
				continue
			}
			changed := p.devices.update(u)
			// Take what else has arrived before looking at the pods.
			for more := true; more; {
				select {
				case u, ok := <-updates:
					if !ok {
						updates, more = nil, false
						retry.Reset(resubscribeDelay)
						break
					}
					changed = p.devices.update(u) || changed
				default:
					more = false
				}
			}
			if !changed {
				continue
			}
			backoff = 0
		case <-p.kick:
			backoff = 0
		case <-resync.C:
		case <-retry.C:
		}
		if watching && updates == nil {
			if stop != nil {
				close(stop)
			}
			stop = make(chan struct{})
			ch, err := p.devices.subscribe(stop)
			if err != nil {
				p.log.Error("watch pod devices", "err", err, "retry in", resubscribeDelay)
				retry.Reset(resubscribeDelay)
			} else {
				updates = ch
			}
		}
		if !p.synced() {
			continue
		}
		waiting, err := p.syncEndpoints()
		if err != nil {
			p.log.Error("sync sp_endpoints", "err", err)
		}
		if waiting > 0 || err != nil {
			backoff = min(max(2*backoff, podRetryMin), p.period)
			p.log.Debug("pod IPs wait for their device", "ips", waiting, "retry in", backoff)
			retry.Reset(backoff)
		}
	}
}

// endpointOf is what sp_endpoints should say of ip: the pod device its
// route leaves by, if that device carries the programs.
func (p *pods) endpointOf(ip netip.Addr, devs map[int]*endpoints.Endpoint) (*endpoints.Endpoint, error) {
	routes, err := netlink.RouteGet(ip.AsSlice())
	if err != nil {
		return nil, fmt.Errorf("route to %s: %w", ip, err)
	}
	if len(routes) == 0 {
		return nil, fmt.Errorf("no route to %s", ip)
	}
	idx := routes[0].LinkIndex
	if ep, ok := devs[idx]; ok {
		return ep, nil
	}
	if _, ok := p.devices.attached[idx]; !ok {
		return nil, fmt.Errorf("%s is routed by ifindex %d, no pod device (yet)", ip, idx)
	}
	l, err := netlink.LinkByIndex(idx)
	if err != nil {
		return nil, fmt.Errorf("device of %s: %w", ip, err)
	}
	ep := &endpoints.Endpoint{Ifindex: idx, NodeMAC: l.Attrs().HardwareAddr}
	// from-pod runs at a veth's tc ingress, where bpf_redirect_peer is
	// allowed; netkit's runs inside its xmit.
	if l.Type() == "veth" {
		ep.Flags = endpoints.TCIngress
	}
	if ep.MAC, err = peerMAC(l); err != nil {
		// bpf_redirect_peer, the way into a veth pod, needs no MAC: the
		// pod's frames then carry a zero destination. netkit in L3 mode
		// has none.
		p.log.Debug("pod MAC unknown", "device", l.Attrs().Name, "err", err)
	}
	devs[idx] = ep
	return ep, nil
}

// podIPs are the IPs of a pod that has its own network and a sandbox that
// may still run: Pending ones too, whose init containers use the network.
func podIPs(pod *corev1.Pod) []netip.Addr {
	if pod.Spec.HostNetwork || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return nil
	}
	ips := pod.Status.PodIPs
	if len(ips) == 0 && pod.Status.PodIP != "" {
		ips = []corev1.PodIP{{IP: pod.Status.PodIP}}
	}
	var out []netip.Addr
	for _, ip := range ips {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			out = append(out, a.Unmap())
		}
	}
	return out
}

// syncEndpoints makes sp_endpoints hold exactly the node's pod IPs that
// are routed through a pod device, and returns how many IPs are not yet.
func (p *pods) syncEndpoints() (waiting int, err error) {
	all, err := p.list()
	if err != nil {
		return 0, err
	}
	want := map[endpoints.Key]bool{}
	rates := map[int]uint64{}
	devs := map[int]*endpoints.Endpoint{}
	bad := map[string]string{}
	defer func() { p.badRates = bad }()
	var errs []error
	for _, pod := range all {
		rate := p.egressRate(pod, bad)
		for _, ip := range podIPs(pod) {
			ep, err := p.endpointOf(ip, devs)
			if err != nil {
				waiting++
				p.log.Debug("pod IP not registered", "pod", pod.Namespace+"/"+pod.Name, "reason", err)
				continue
			}
			if rate > 0 {
				rates[ep.Ifindex] = rate
			}
			want[endpoints.KeyOf(ip)] = true
			e := *ep
			e.Addrs = []netip.Addr{ip}
			if err := endpoints.Upsert(p.cfg.Endpoints, e); err != nil {
				errs = append(errs, fmt.Errorf("pod %s/%s: %w", pod.Namespace, pod.Name, err))
			}
		}
	}
	var stale []endpoints.Key
	var k endpoints.Key
	var v endpoints.Info
	it := p.cfg.Endpoints.Iterate()
	for it.Next(&k, &v) {
		if !want[k] {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		errs = append(errs, fmt.Errorf("read sp_endpoints: %w", err))
	}
	for _, k := range stale {
		if err := p.cfg.Endpoints.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("remove a gone pod's endpoint: %w", err))
		}
	}
	if p.cfg.Bandwidth != nil {
		errs = append(errs, p.cfg.Bandwidth.Sync(rates))
	}
	return waiting, errors.Join(errs...)
}

// egressRate is pod's egress limit in bit/s, 0 for none: also when the
// annotation is invalid, which is logged once per value (bad collects
// this sync's invalid ones, p.badRates holds the last sync's).
func (p *pods) egressRate(pod *corev1.Pod, bad map[string]string) uint64 {
	if p.cfg.Bandwidth == nil {
		return 0
	}
	rate, err := podEgressBandwidth(pod)
	if err == nil {
		return rate
	}
	name, v := pod.Namespace+"/"+pod.Name, pod.Annotations[EgressBandwidthAnnotation]
	if last, ok := p.badRates[name]; !ok || last != v {
		p.log.Warn("egress bandwidth not limited", "pod", name, "err", err)
	}
	bad[name] = v
	return 0
}
