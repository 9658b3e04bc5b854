package ct

import (
	"context"
	"fmt"
	"time"

	"github.com/cilium/ebpf"

	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/metrics"
)

// Zone names.
const (
	// ZoneEastWest is sp_ct with zones on: the pod devices' flows
	// (ClusterIP, and NodePorts reached from pods).
	ZoneEastWest = "ew"
	// ZoneNorthSouth is sp_ct_ns: the node devices' flows (NodePort,
	// ExternalIP, LoadBalancer from outside; DSR flows learned).
	ZoneNorthSouth = "ns"
	// ZoneShared is sp_ct with zones off: both.
	ZoneShared = "shared"
)

// Zone is one conntrack map and the flows it tracks.
type Zone struct {
	Name    string
	MapName string // as pinned
	Map     *ebpf.Map
	// NorthSouth says the map holds the north-south flows, whose SNAT
	// mappings GCNAT deletes with them.
	NorthSouth bool
}

// Zones are the conntrack maps of a datapath: east-west and north-south,
// or the one shared map.
func Zones(m *maps.Maps) []Zone {
	if m.CTNS == nil {
		return []Zone{{ZoneShared, maps.CTName, m.CT, true}}
	}
	return []Zone{{ZoneEastWest, maps.CTName, m.CT, false}, {ZoneNorthSouth, maps.CTNSName, m.CTNS, true}}
}

// DumpZones returns every entry of every zone, each naming its zone.
func DumpZones(m *maps.Maps) ([]Entry, error) {
	var out []Entry
	for _, z := range Zones(m) {
		entries, err := Dump(z.Map)
		if err != nil {
			return nil, fmt.Errorf("zone %s: %w", z.Name, err)
		}
		for i := range entries {
			entries[i].Zone = z.Name
		}
		out = append(out, entries...)
	}
	return out, nil
}

// Loop garbage-collects every zone with a collector and a pacer of its
// own, so a flood in one zone does not delay the other's passes, and
// deletes SNAT mappings (GCNAT) after each pass over the north-south
// flows.
type Loop struct {
	Maps *maps.Maps
	// Base is the calm interval; Min the shortest under pressure (0:
	// DefaultPacer's).
	Base, Min time.Duration
	// Fixed walks each zone whole every Base instead of pacing.
	Fixed bool
	// Report, when set, sees every pass.
	Report func(LoopPass)
}

// LoopPass is what one pass over one zone did and decided.
type LoopPass struct {
	Zone   string
	Result PassResult
	// NorthSouth passes are followed by GCNAT, which deleted NAT SNAT
	// entries.
	NorthSouth bool
	NAT        int
	Signals    Signals
	Decision   Decision
	Took       time.Duration
}

type zoneGC struct {
	Zone
	c    *Collector
	p    *Pacer
	prev map[string]uint64
	d    Decision
	due  time.Time
}

// Run runs passes until ctx ends (nil) or a pass fails. The first pass
// of each zone reads it whole.
func (l *Loop) Run(ctx context.Context) error {
	prev, err := metrics.Read(l.Maps.Metrics)
	if err != nil {
		return err
	}
	var zs []*zoneGC
	for _, z := range Zones(l.Maps) {
		p := DefaultPacer(l.Base)
		if l.Min > 0 {
			p.Min = l.Min
		}
		zs = append(zs, &zoneGC{Zone: z, c: NewCollector(z.Map), p: p, prev: prev, d: Decision{Interval: l.Base}, due: time.Now()})
	}
	for {
		z := zs[0]
		for _, o := range zs[1:] {
			if o.due.Before(z.due) {
				z = o
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Until(z.due)):
		}
		pass, err := l.pass(z)
		if err != nil {
			return fmt.Errorf("gc of zone %s: %w", z.Name, err)
		}
		if l.Report != nil {
			l.Report(pass)
		}
	}
}

func (l *Loop) pass(z *zoneGC) (LoopPass, error) {
	now, err := Now()
	if err != nil {
		return LoopPass{}, err
	}
	start := time.Now()
	out := LoopPass{Zone: z.Name, NorthSouth: z.NorthSouth}
	if out.Result, err = z.c.Pass(now, z.d.Budget); err != nil {
		return out, err
	}
	if z.NorthSouth {
		if out.NAT, err = GCNAT(l.Maps, now); err != nil {
			return out, err
		}
	}
	out.Took = time.Since(start)
	cur, err := metrics.Read(l.Maps.Metrics)
	if err != nil {
		return out, err
	}
	out.Signals = z.c.Signals(z.prev, cur, out.Result, z.NorthSouth)
	z.prev = cur
	if l.Fixed {
		z.d = Decision{Interval: l.Base}
	} else {
		z.d = z.p.Next(out.Signals)
	}
	out.Decision = z.d
	z.due = time.Now().Add(z.d.Interval)
	return out, nil
}

// Signals turns two counter readings around a pass into the pacer's
// input. lb_new and ct_create_failed count both zones together: each
// zone's pacer sees all of them, so a flood in one zone can speed the
// other's passes, never slow them. nat_exhausted goes to the zone holding
// the north-south flows (northSouth), whose passes free SNAT ports.
func (c *Collector) Signals(prev, cur map[string]uint64, res PassResult, northSouth bool) Signals {
	maxEntries := int(c.m.MaxEntries())
	s := Signals{
		NewFlows:     cur["lb_new"] - prev["lb_new"],
		CreateFailed: cur["ct_create_failed"] - prev["ct_create_failed"],
		MaxEntries:   maxEntries,
		Last:         res,
		Fill:         -1,
	}
	if northSouth {
		s.NATExhausted = cur["nat_exhausted"] - prev["nat_exhausted"]
	}
	if e := c.Estimate(0); e >= 0 && maxEntries > 0 {
		s.Fill = float64(e) / float64(maxEntries)
	}
	return s
}
