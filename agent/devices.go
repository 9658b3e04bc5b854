package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/netdev"
)

// DefaultPodDevices names the host-side veths of common CNIs: the
// reference ptp and bridge plugins (veth<hex>, also under kindnet and
// flannel), Calico (cali*), Cilium (lxc*), the AWS VPC CNI (eni*) and GKE
// (gke*). Only veths are taken, so bridges such as cni0 never match.
const DefaultPodDevices = "veth*,cali*,lxc*,eni*,gke*"

// DevicePattern selects devices by name: comma-separated globs (path.Match
// syntax), any of which may match. Globs, not regexps: they are what
// device names are written with elsewhere (iptables' veth+, Cilium's
// --devices), and a prefix is all a CNI's naming needs.
type DevicePattern []string

// ParseDevicePattern reads "veth*,cali*"; empty selects nothing.
func ParseDevicePattern(s string) (DevicePattern, error) {
	var p DevicePattern
	for _, g := range strings.Split(s, ",") {
		g = strings.TrimSpace(g)
		if g == "" {
			continue
		}
		if _, err := path.Match(g, ""); err != nil {
			return nil, fmt.Errorf("device pattern %q: %w", g, err)
		}
		p = append(p, g)
	}
	return p, nil
}

// Match says whether name is selected.
func (p DevicePattern) Match(name string) bool {
	for _, g := range p {
		if ok, _ := path.Match(g, name); ok {
			return true
		}
	}
	return false
}

// podDevices keeps FromPod and ToPod on every pod device of the netns it
// runs in: a veth, or the primary of a netkit pair, whose name matches the
// pattern and is no node device.
// It is used from one goroutine, on a thread in that netns.
type podDevices struct {
	cfg *PodNetwork
	log *slog.Logger
	// attached maps the ifindex of each device carrying the programs to
	// its name, which the pins are named by.
	attached map[int]string
}

// podPoints are where a pod device's programs go, from-pod first: a veth's
// tc hooks, or netkit's own slots, which run inside its xmit.
func podPoints(l netlink.Link) []attach.Point {
	if _, ok := l.(*netlink.Netkit); ok {
		return []attach.Point{attach.NetkitPeer, attach.NetkitPrimary}
	}
	return []attach.Point{attach.TCIngress, attach.TCEgress}
}

// allPoints are every point a pod device of any kind may have a pin for.
var allPoints = []attach.Point{attach.TCIngress, attach.TCEgress, attach.NetkitPeer, attach.NetkitPrimary}

// pinSuffixes are the endings of the pins of allPoints (attach.Attacher).
var pinSuffixes = []string{"-" + string(attach.Ingress), "-" + string(attach.Egress), "-" + string(attach.NetkitPeer), "-" + string(attach.NetkitPrimary)}

func (d *podDevices) prog(p attach.Point) *ebpf.Program {
	if p == attach.TCEgress || p == attach.NetkitPrimary {
		return d.cfg.ToPod
	}
	return d.cfg.FromPod
}

func (d *podDevices) selects(name string) bool {
	return d.cfg.Devices.Match(name) && !slices.Contains(d.cfg.NodeDevices, name)
}

func (d *podDevices) isPodDevice(l netlink.Link) bool {
	switch l := l.(type) {
	case *netlink.Veth:
	case *netlink.Netkit:
		if !l.IsPrimary() {
			return false // a pod's own end, in this netns too
		}
	default:
		return false
	}
	return d.selects(l.Attrs().Name)
}

// subscribe subscribes to link updates and only then lists the links, so
// that no device appearing or going in between is missed, and brings the
// programs in line with the list: on every pod device, off every device
// that went while nobody listened (pins a previous agent left included).
func (d *podDevices) subscribe(done <-chan struct{}) (<-chan netlink.LinkUpdate, error) {
	ch := make(chan netlink.LinkUpdate, 256)
	err := netlink.LinkSubscribeWithOptions(ch, done, netlink.LinkSubscribeOptions{
		ErrorCallback: func(err error) {
			select {
			case <-done: // the socket was closed on purpose
			default:
				d.log.Warn("link updates", "err", err)
			}
		},
	})
	if err != nil {
		return nil, fmt.Errorf("subscribe to link updates: %w", err)
	}
	links, err := listLinks()
	if err != nil {
		return nil, err
	}
	present := map[int]bool{}
	names := map[string]bool{}
	for _, l := range links {
		present[l.Attrs().Index] = true
		names[l.Attrs().Name] = true
		d.add(l)
	}
	for idx := range d.attached {
		if !present[idx] {
			d.remove(idx)
		}
	}
	d.removeStalePins(names)
	return ch, nil
}

// listLinks lists the links, again when the dump was interrupted by a
// change (the kernel then returns a partial list).
func listLinks() ([]netlink.Link, error) {
	for range 10 {
		links, err := netlink.LinkList()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			if err != nil {
				return nil, fmt.Errorf("list links: %w", err)
			}
			return links, nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil, fmt.Errorf("list links: %w", netlink.ErrDumpInterrupted)
}

// removeStalePins detaches the pinned links of selected devices that no
// longer exist: a device that went while no agent ran.
func (d *podDevices) removeStalePins(present map[string]bool) {
	entries, err := os.ReadDir(d.cfg.Attacher.LinkDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		d.log.Warn("read pinned links", "dir", d.cfg.Attacher.LinkDir, "err", err)
	}
	for _, e := range entries {
		for _, suffix := range pinSuffixes {
			dev, ok := strings.CutSuffix(e.Name(), suffix)
			if !ok || present[dev] || !d.selects(dev) {
				continue
			}
			if err := d.detach(dev); err != nil {
				d.log.Warn("remove the pins of a pod device that is gone", "device", dev, "err", err)
			}
		}
	}
}

// update applies one link update and says whether a pod device came,
// changed or went (the endpoints then need another look).
func (d *podDevices) update(u netlink.LinkUpdate) bool {
	idx := u.Link.Attrs().Index
	switch u.Header.Type {
	case unix.RTM_NEWLINK:
		return d.add(u.Link)
	case unix.RTM_DELLINK:
		if _, ok := d.attached[idx]; ok {
			d.remove(idx)
			return true
		}
	}
	return false
}

// add attaches to l if it is a pod device without the programs yet; true
// when l is (or was, before a rename) a pod device.
func (d *podDevices) add(l netlink.Link) bool {
	idx, name := l.Attrs().Index, l.Attrs().Name
	was := false
	if old, ok := d.attached[idx]; ok {
		if old == name {
			return true
		}
		d.remove(idx) // renamed: the pins carry the old name
		was = true
	}
	if !d.isPodDevice(l) {
		return was
	}
	points := podPoints(l)
	modes := make([]string, 0, len(points))
	for _, p := range points {
		used, err := d.cfg.Attacher.AttachPoint(d.prog(p), name, p)
		if err != nil {
			// Retried on the device's next update (it may be going).
			d.log.Warn("attach to pod device", "device", name, "err", errors.Join(err, d.detach(name)))
			return true
		}
		modes = append(modes, fmt.Sprintf("%s %s", p, used))
	}
	d.attached[idx] = name
	d.log.Info("attached to pod device", "device", name, "hooks", strings.Join(modes, ", "))
	if d.cfg.BigTCP {
		b, err := netdev.SetBigTCP(name, netdev.BigTCPSize)
		if err != nil {
			d.log.Warn("big tcp on pod device", "device", name, "err", err)
		} else {
			d.log.Info("big tcp on pod device", "device", name, "limits", b.String(), "refused", fmt.Sprint(b.Refused))
		}
	}
	return true
}

// detach removes the programs from every point name may have had them
// at: a device gone or renamed is of no known kind any more.
func (d *podDevices) detach(name string) error {
	var errs []error
	for _, p := range allPoints {
		errs = append(errs, d.cfg.Attacher.DetachPoint(name, p))
	}
	return errors.Join(errs...)
}

func (d *podDevices) remove(idx int) {
	name := d.attached[idx]
	delete(d.attached, idx)
	if err := d.detach(name); err != nil {
		d.log.Warn("detach from pod device", "device", name, "err", err)
		return
	}
	d.log.Info("detached from pod device", "device", name)
}

// peerMAC is the MAC of the other end of the veth l, the pod's own device.
// That end lives in the pod's netns, which l names by its netns id
// (IFLA_LINK_NETNSID); the kernel answers for it given that id as
// IFLA_TARGET_NETNSID (4.20+), which vishvananda/netlink has no call for.
func peerMAC(l netlink.Link) (net.HardwareAddr, error) {
	a := l.Attrs()
	if a.ParentIndex == 0 {
		return nil, fmt.Errorf("veth %s: peer unknown", a.Name)
	}
	if a.NetNsID < 0 { // the peer is in this netns
		p, err := netlink.LinkByIndex(a.ParentIndex)
		if err != nil {
			return nil, fmt.Errorf("peer of %s: %w", a.Name, err)
		}
		return p.Attrs().HardwareAddr, nil
	}
	req := nl.NewNetlinkRequest(unix.RTM_GETLINK, unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Index = int32(a.ParentIndex)
	req.AddData(msg)
	req.AddData(nl.NewRtAttr(unix.IFLA_TARGET_NETNSID, nl.Uint32Attr(uint32(a.NetNsID))))
	msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWLINK)
	if err != nil {
		return nil, fmt.Errorf("peer of %s in netns id %d: %w", a.Name, a.NetNsID, err)
	}
	if len(msgs) == 0 {
		return nil, fmt.Errorf("peer of %s in netns id %d: no answer", a.Name, a.NetNsID)
	}
	p, err := netlink.LinkDeserialize(nil, msgs[0])
	if err != nil {
		return nil, fmt.Errorf("peer of %s: %w", a.Name, err)
	}
	return p.Attrs().HardwareAddr, nil
}

// AutoNodeDevices is the --node-device value that asks for DetectNodeDevices.
const AutoNodeDevices = "auto"

// DetectNodeDevices names the devices of this netns that hold a default
// route (any family, every nexthop of a multipath one): the node's ways
// out, where NodePort and the other north-south traffic arrive.
func DetectNodeDevices() ([]string, error) {
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	var idxs []int
	for _, r := range routes {
		if r.Dst != nil {
			if ones, _ := r.Dst.Mask.Size(); ones != 0 {
				continue // not a default route
			}
		}
		if r.LinkIndex > 0 {
			idxs = append(idxs, r.LinkIndex)
		}
		for _, nh := range r.MultiPath {
			idxs = append(idxs, nh.LinkIndex)
		}
	}
	var names []string
	for _, idx := range idxs {
		l, err := netlink.LinkByIndex(idx)
		if err != nil {
			return nil, fmt.Errorf("device of a default route: %w", err)
		}
		if n := l.Attrs().Name; !slices.Contains(names, n) {
			names = append(names, n)
		}
	}
	if len(names) == 0 {
		return nil, errors.New("no default route to find the node devices by: name them")
	}
	slices.Sort(names)
	return names, nil
}
