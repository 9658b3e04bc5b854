package maps

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
)

// Names of the pinned maps, as declared in bpf/lib.
const (
	ServicesName     = "sp_services"
	BackendsName     = "sp_backends"
	SvcMetaName      = "sp_svc_meta"
	CTName           = "sp_ct"
	CTNSName         = "sp_ct_ns"
	FragsName        = "sp_frags"
	MetricsName      = "sp_metrics"
	SockRevName      = "sp_sock_revnat"
	SockCtxName      = "sp_sock_ctx"
	AffinityName     = "sp_affinity"
	NodeAddrName     = "sp_node_addrs"
	MaglevName       = "sp_maglev"
	SrcRangeName     = "sp_src_ranges"
	FrontendAddrName = "sp_frontend_addrs"
	NATName          = "sp_nat"
	NetdevsName      = "sp_netdevs"
	EDTPodsName      = "sp_edt_pods"
	EDTRatesName     = "sp_edt_rates"
)

// Maps are the handles user space programs.
type Maps struct {
	Services *ebpf.Map
	Backends *ebpf.Map
	SvcMeta  *ebpf.Map
	CT       *ebpf.Map
	// CTNS is the north-south conntrack zone, the node-device programs'
	// sp_ct (loader.Config.CTNorthSouthMapSize); nil when zones are off
	// and CT holds every flow.
	CTNS    *ebpf.Map
	Frags   *ebpf.Map
	Metrics *ebpf.Map
	// SockRevNAT maps a socket's backend peer back to the VIP.
	SockRevNAT *ebpf.Map
	// SockCtx is the same per socket, in socket storage (SockCtx values);
	// it has no keys to walk, so Occupancy leaves it out.
	SockCtx *ebpf.Map
	// Affinity remembers each client's backend per service.
	Affinity *ebpf.Map
	// NodeAddrs holds the node's own addresses.
	NodeAddrs *ebpf.Map
	// Maglev holds each Maglev frontend's lookup table, by svc id.
	Maglev *ebpf.Map
	// SrcRanges holds loadBalancerSourceRanges, by svc id.
	SrcRanges *ebpf.Map
	// FrontendAddrs holds every frontend's address (NodeAddrKey keys), for
	// later fragments, which name no port.
	FrontendAddrs *ebpf.Map
	// NAT holds the SNAT mappings of north-south flows.
	NAT *ebpf.Map
	// Netdevs lists the node devices and the addresses SNAT uses on them.
	Netdevs *ebpf.Map
	// EDTPods tags rated pods' packets with their aggregate, by host-side
	// ifindex; EDTRates holds each aggregate's rate (datapath/bandwidth).
	EDTPods, EDTRates *ebpf.Map
}

// NorthSouthCT is the conntrack map north-south flows are in: the zone
// when zones are on, else the shared CT.
func (m *Maps) NorthSouthCT() *ebpf.Map {
	if m.CTNS != nil {
		return m.CTNS
	}
	return m.CT
}

type namedMap struct {
	name string
	dst  **ebpf.Map
}

// optional maps exist only with some load settings (sp_ct_ns: zones on).
var optional = map[string]bool{CTNSName: true}

// named lists every map with its pinned name, in one place for open,
// close and occupancy.
func (m *Maps) named() []namedMap {
	return []namedMap{
		{ServicesName, &m.Services},
		{BackendsName, &m.Backends},
		{SvcMetaName, &m.SvcMeta},
		{CTName, &m.CT},
		{CTNSName, &m.CTNS},
		{FragsName, &m.Frags},
		{MetricsName, &m.Metrics},
		{SockRevName, &m.SockRevNAT},
		{SockCtxName, &m.SockCtx},
		{AffinityName, &m.Affinity},
		{NodeAddrName, &m.NodeAddrs},
		{MaglevName, &m.Maglev},
		{SrcRangeName, &m.SrcRanges},
		{FrontendAddrName, &m.FrontendAddrs},
		{NATName, &m.NAT},
		{NetdevsName, &m.Netdevs},
		{EDTPodsName, &m.EDTPods},
		{EDTRatesName, &m.EDTRates},
	}
}

// FromObjects takes the handles out of a loader's maps, by pinned name;
// every map but the optional ones must be there.
func FromObjects(byName map[string]*ebpf.Map) (*Maps, error) {
	var m Maps
	for _, x := range m.named() {
		mp, ok := byName[x.name]
		if !ok && !optional[x.name] {
			return nil, fmt.Errorf("no map %s among the loaded objects", x.name)
		}
		*x.dst = mp
	}
	return &m, nil
}

// OpenPinned opens the maps a `servicepath load` pinned under dir.
func OpenPinned(dir string) (*Maps, error) {
	var m Maps
	for _, x := range m.named() {
		mp, err := ebpf.LoadPinnedMap(filepath.Join(dir, x.name), nil)
		if optional[x.name] && errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			m.Close()
			if errors.Is(err, os.ErrNotExist) {
				return nil, fmt.Errorf("map %s not pinned under %s: run `servicepath load --bpffs %s` first", x.name, dir, dir)
			}
			return nil, fmt.Errorf("open pinned map %s: %w", x.name, err)
		}
		*x.dst = mp
	}
	return &m, nil
}

// Close releases the handles; pinned maps stay.
func (m *Maps) Close() error {
	var errs []error
	for _, x := range m.named() {
		if *x.dst != nil {
			errs = append(errs, (*x.dst).Close())
		}
	}
	return errors.Join(errs...)
}

// Usage is a map's fill level.
type Usage struct {
	Entries    int
	MaxEntries uint32
}

// Occupancy counts the entries of each hash map by walking its keys.
func Occupancy(m *Maps) (map[string]Usage, error) {
	out := map[string]Usage{}
	for name, mp := range map[string]*ebpf.Map{
		ServicesName: m.Services, BackendsName: m.Backends, CTName: m.CT, CTNSName: m.CTNS, FragsName: m.Frags, SockRevName: m.SockRevNAT,
		AffinityName: m.Affinity, NATName: m.NAT, FrontendAddrName: m.FrontendAddrs, EDTPodsName: m.EDTPods,
	} {
		if mp == nil {
			continue
		}
		n := 0
		var k []byte
		var err error
		for k, err = nextKey(mp, nil); err == nil; k, err = nextKey(mp, k) {
			n++
		}
		if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil, fmt.Errorf("count %s: %w", name, err)
		}
		out[name] = Usage{Entries: n, MaxEntries: mp.MaxEntries()}
	}
	return out, nil
}

func nextKey(m *ebpf.Map, key []byte) ([]byte, error) {
	next := make([]byte, m.KeySize())
	var prev any
	if key != nil {
		prev = key
	}
	return next, m.NextKey(prev, &next)
}
