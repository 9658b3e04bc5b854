package ct

import (
	"errors"
	"fmt"
	"time"

	"github.com/cilium/ebpf"

	"github.com/servicepath/servicepath/datapath/maps"
)

// Collector garbage-collects the CT map a slice at a time. Each Pass reads
// at most a budget of entries with BPF_MAP_LOOKUP_BATCH, starting where the
// previous pass stopped (a hash map's batch cursor is a bucket index, so it
// stays valid while the datapath inserts and the LRU evicts), and deletes
// what expired with one BPF_MAP_DELETE_BATCH. A flow's two entries go
// together: an expired entry whose partner is alive stays (the datapath
// refreshes only the flow entry on replies), and deleting an entry takes
// its expired partner with it even when the partner lies outside the slice.
//
// Unexpired entries whose partner is missing (orphans) are counted: the
// datapath writes and GC deletes the two together, so an orphan means the
// LRU evicted one half of a live flow (or the datapath forgot a reused
// tuple, ct_tuple_reused). It is the eviction signal user space can see.
type Collector struct {
	m      *ebpf.Map
	cursor ebpf.MapBatchCursor
	keys   []maps.CTKey
	vals   []maps.CTEntry

	sweepSeen int // entries seen so far in the current sweep
	// LastSweep is the number of entries the last complete sweep saw
	// (-1 before one completed): the occupancy estimate's base.
	LastSweep int
	// deletedSince counts deletions since the last sweep completed,
	// sweepDeleted those of the current sweep (in halves).
	deletedSince, sweepDeleted int
}

// chunk is the batch size: large enough for any hash bucket (the kernel
// answers ENOSPC when one does not fit) and small enough to stay in cache.
const chunk = 1024

// NewCollector starts at the beginning of m.
func NewCollector(m *ebpf.Map) *Collector {
	return &Collector{m: m, LastSweep: -1, keys: make([]maps.CTKey, chunk), vals: make([]maps.CTEntry, chunk)}
}

// PassResult says what one pass did.
type PassResult struct {
	Scanned int
	Deleted int
	// Orphans are unexpired entries whose partner is gone.
	Orphans int
	// Expired entries kept because their partner is alive.
	KeptForPartner int
	// Wrapped is set when the pass reached the end of the map: a sweep of
	// the whole map completed.
	Wrapped bool
	// BatchCalls counts lookup syscalls, Lookups single partner lookups.
	BatchCalls, Lookups int
}

// Pass scans up to budget entries (at least one batch; <= 0 means the
// whole map) from where the last pass stopped and deletes the expired
// pairs among them.
func (c *Collector) Pass(now uint64, budget int) (PassResult, error) {
	var res PassResult
	fromStart := c.sweepSeen == 0
	seen := map[maps.CTKey]maps.CTEntry{}
	var order []maps.CTKey
	for budget <= 0 || res.Scanned < budget {
		n, err := c.m.BatchLookup(&c.cursor, c.keys, c.vals, nil)
		res.BatchCalls++
		for i := range n {
			seen[c.keys[i]] = c.vals[i]
			order = append(order, c.keys[i])
		}
		res.Scanned += n
		c.sweepSeen += n
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			res.Wrapped = true
			c.cursor = ebpf.MapBatchCursor{}
			break
		}
		if err != nil {
			return res, fmt.Errorf("batch lookup conntrack: %w", err)
		}
	}

	whole := fromStart && res.Wrapped
	scanned := make(map[maps.CTKey]struct{}, len(order))
	for _, k := range order {
		scanned[k] = struct{}{}
	}
	// partner returns the other entry of k's flow: from this pass when it
	// was read here, else from the map.
	partner := func(k maps.CTKey, v maps.CTEntry) (maps.CTKey, maps.CTEntry, bool) {
		pk := pairKey(k, v)
		if pv, ok := seen[pk]; ok {
			return pk, pv, true
		}
		if whole {
			// The pass read the whole map: a partner not read is gone (or
			// was written during the walk, a race a lookup-then-delete GC
			// always has).
			return pk, maps.CTEntry{}, false
		}
		var pv maps.CTEntry
		res.Lookups++
		if err := c.m.Lookup(&pk, &pv); err != nil {
			return pk, pv, false
		}
		seen[pk] = pv
		return pk, pv, true
	}

	del := map[maps.CTKey]bool{}
	var doomed []maps.CTKey
	doom := func(k maps.CTKey) {
		if !del[k] {
			del[k] = true
			doomed = append(doomed, k)
		}
	}
	for _, k := range order {
		v := seen[k]
		pk, pv, ok := partner(k, v)
		switch {
		case v.Expires > now:
			if !ok {
				res.Orphans++
			}
		case ok && pv.Expires > now:
			res.KeptForPartner++
		default:
			doom(k)
			if ok {
				doom(pk)
			}
		}
	}
	deleted, err := c.deleteAll(doomed)
	res.Deleted = deleted
	c.deletedSince += deleted
	// A partner deleted outside the slice was read by an earlier pass of
	// this sweep or will not be read by a later one: count half of them.
	for _, k := range doomed {
		if _, read := scanned[k]; read {
			c.sweepDeleted += 2
		} else {
			c.sweepDeleted++
		}
	}
	if res.Wrapped {
		// What the sweep read, less what it deleted.
		c.LastSweep = max(c.sweepSeen-c.sweepDeleted/2, 0)
		c.sweepSeen, c.sweepDeleted, c.deletedSince = 0, 0, 0
	}
	return res, err
}

// deleteAll deletes keys in batches; keys the datapath removed meanwhile
// are skipped.
func (c *Collector) deleteAll(keys []maps.CTKey) (int, error) {
	deleted := 0
	for len(keys) > 0 {
		n, err := c.m.BatchDelete(keys, nil)
		deleted += n
		switch {
		case err == nil:
			return deleted, nil
		case errors.Is(err, ebpf.ErrKeyNotExist):
			keys = keys[n+1:] // gone already: skip it
		default:
			return deleted, fmt.Errorf("batch delete conntrack: %w", err)
		}
	}
	return deleted, nil
}

// Estimate is the occupancy estimate without a walk: the last complete
// sweep's count, plus two entries per new flow the datapath counted since
// (newFlows), less what GC deleted since. Before a sweep completed it is
// -1.
func (c *Collector) Estimate(newFlows uint64) int {
	if c.LastSweep < 0 {
		return -1
	}
	e := c.LastSweep + 2*int(newFlows) - c.deletedSince
	if max := int(c.m.MaxEntries()); e > max {
		e = max
	}
	return max(e, 0)
}

// GCResult says what one full pass did.
type GCResult struct {
	Scanned int
	Deleted int
}

// GC deletes every expired pair in one sweep of the whole map.
func GC(m *ebpf.Map, now uint64) (GCResult, error) {
	res, err := NewCollector(m).Pass(now, 0)
	return GCResult{Scanned: res.Scanned, Deleted: res.Deleted}, err
}

// Signals are the datapath's pressure signals between two GC passes.
type Signals struct {
	// Fill is estimated entries over capacity (negative: unknown).
	Fill float64
	// NewFlows and CreateFailed are the growth of lb_new and
	// ct_create_failed since the previous pass.
	NewFlows, CreateFailed uint64
	// MaxEntries is the map's capacity.
	MaxEntries int
	// Last is the previous pass.
	Last PassResult
}

// Pacer chooses the next GC interval and budget from Signals. Calm: the
// base interval, and a budget that sweeps the map once every SweepPasses
// passes. Under pressure (fill at or above HighFill, insertions failing,
// orphans seen, a pass finding many expired entries, or new flows that
// would fill the map before the next pass) the interval quarters down to
// Min and the budget covers the whole map; calm again, the interval
// doubles back up to Base.
type Pacer struct {
	Base, Min   time.Duration
	SweepPasses int
	HighFill    float64
	// MinBudget is the smallest slice a pass reads.
	MinBudget int

	interval time.Duration
}

// DefaultPacer paces around base.
func DefaultPacer(base time.Duration) *Pacer {
	return &Pacer{Base: base, Min: max(base/32, 250*time.Millisecond), SweepPasses: 4, HighFill: 0.75, MinBudget: 4096}
}

// Decision is what the pacer chose and why.
type Decision struct {
	Interval time.Duration
	Budget   int // entries; 0 means the whole map
	Pressure string
}

// Next decides after a pass.
func (p *Pacer) Next(s Signals) Decision {
	if p.interval == 0 {
		p.interval = p.Base
	}
	reason := ""
	switch {
	case s.CreateFailed > 0:
		reason = fmt.Sprintf("%d conntrack insertions failed", s.CreateFailed)
	case s.Last.Orphans > 0:
		reason = fmt.Sprintf("%d orphaned entries (LRU evictions)", s.Last.Orphans)
	case s.Fill >= p.HighFill:
		reason = fmt.Sprintf("fill %.0f%%", 100*s.Fill)
	case s.Fill >= 0 && s.MaxEntries > 0 && s.Fill+float64(2*s.NewFlows)/float64(s.MaxEntries) >= 1:
		reason = fmt.Sprintf("%d new flows would fill the map", s.NewFlows)
	case s.Last.Scanned >= 64 && s.Last.Deleted*4 >= s.Last.Scanned:
		reason = fmt.Sprintf("%d of %d scanned had expired", s.Last.Deleted, s.Last.Scanned)
	}
	if reason != "" {
		p.interval = max(p.interval/4, p.Min)
		return Decision{Interval: p.interval, Budget: 0, Pressure: reason}
	}
	p.interval = min(p.interval*2, p.Base)
	budget := p.MinBudget
	if s.Fill > 0 && s.MaxEntries > 0 {
		budget = max(budget, int(s.Fill*float64(s.MaxEntries))/max(p.SweepPasses, 1))
	}
	return Decision{Interval: p.interval, Budget: budget}
}

// Pressure is the CT map's fill as one walk sees it.
type Pressure struct {
	Entries    int `json:"entries"`
	MaxEntries int `json:"maxEntries"`
	// Expired entries wait for GC.
	Expired int `json:"expired"`
	// Orphans are unexpired entries whose partner is gone: evictions (or
	// reused tuples) the LRU does not otherwise report.
	Orphans int `json:"orphans"`
}

// ReadPressure walks the map once, in batches, pairing entries in memory.
func ReadPressure(m *ebpf.Map, now uint64) (Pressure, error) {
	p := Pressure{MaxEntries: int(m.MaxEntries())}
	all := map[maps.CTKey]maps.CTEntry{}
	var cursor ebpf.MapBatchCursor
	keys, vals := make([]maps.CTKey, chunk), make([]maps.CTEntry, chunk)
	for {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		for i := range n {
			all[keys[i]] = vals[i]
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		}
		if err != nil {
			return p, fmt.Errorf("batch lookup conntrack: %w", err)
		}
	}
	p.Entries = len(all)
	for k, v := range all {
		if v.Expires <= now {
			p.Expired++
		} else if _, ok := all[pairKey(k, v)]; !ok {
			p.Orphans++
		}
	}
	return p, nil
}
