package service

import (
	"slices"
	"sort"
	"time"

	"github.com/servicepath/servicepath/datapath/maps"
)

// Programmed is a frontend as the maps hold it.
type Programmed struct {
	Service
	// BackendIDs parallels Service.Backends.
	BackendIDs []uint32
}

// List returns every programmed frontend, sorted by name then frontend.
func (mgr *Manager) List() []Programmed {
	var out []Programmed
	for k, f := range mgr.frontends {
		s := Programmed{Service: Service{
			Name:         f.name,
			PortName:     f.portName,
			Frontend:     frontendOf(k, f.flags),
			Affinity:     time.Duration(f.affinity) * time.Second,
			SourceRanges: slices.Clone(f.ranges),
		}}
		fromFlags(&s.Service, f.flags)
		for _, id := range f.ids {
			b := f.backends[id]
			// The state as given, not the slot: with the fallback a
			// terminating backend can be counted for new flows.
			state := Active
			if b.State == maps.BackendTerminating {
				state = Terminating
			}
			s.Backends = append(s.Backends, Backend{Addr: b.Addr.Netip(b.Family), Port: b.Port.Uint16(), State: state})
			s.BackendIDs = append(s.BackendIDs, id)
		}
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.Name != b.Name {
			return a.Name < b.Name
		}
		if c := a.Frontend.Addr.Compare(b.Frontend.Addr); c != 0 {
			return c < 0
		}
		if a.Frontend.Port != b.Frontend.Port {
			return a.Frontend.Port < b.Frontend.Port
		}
		return a.Frontend.Protocol < b.Frontend.Protocol
	})
	return out
}

// Owners returns the names owning frontends, each once, in no order:
// what a caller needs to find stale owners without List's copies.
func (mgr *Manager) Owners() []string {
	seen := map[string]bool{}
	var out []string
	for _, f := range mgr.frontends {
		if !seen[f.name] {
			seen[f.name] = true
			out = append(out, f.name)
		}
	}
	return out
}

// Totals counts the owners, frontends and backend slots programmed, for
// gauges set after every sync.
func (mgr *Manager) Totals() (owners, frontends, backends int) {
	seen := map[string]bool{}
	for _, f := range mgr.frontends {
		seen[f.name] = true
		backends += len(f.ids)
	}
	return len(seen), len(mgr.frontends), backends
}
