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
// what expired. A flow's two entries go together: an expired entry whose
// partner is alive stays (the datapath refreshes only the flow entry on
// replies), and deleting an entry takes its expired partner with it even
// when the partner lies outside the slice. Each is deleted with
// BPF_MAP_LOOKUP_AND_DELETE_ELEM, so only what was expired goes: a flow
// the datapath refreshed or reopened between the read and the delete is
// put back (takeExpired).
//
// Unexpired entries whose partner is missing (orphans) are counted (DSR
// flows learned on the backend's node have none by design): the
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
	// PutBack are entries taken for deletion that the datapath had
	// refreshed or reopened since the pass read them: written back.
	PutBack int
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

	// A flow's entries go together, and only as they are when taken: an
	// entry the datapath refreshed or reopened since it was read here puts
	// the pair back.
	del := map[maps.CTKey]bool{}
	var pairs [][]maps.CTKey
	doom := func(ks ...maps.CTKey) {
		var pair []maps.CTKey
		for _, k := range ks {
			if !del[k] {
				del[k] = true
				pair = append(pair, k)
			}
		}
		if len(pair) > 0 {
			pairs = append(pairs, pair)
		}
	}
	for _, k := range order {
		v := seen[k]
		if learned(k, v) {
			// No partner by design: it lives and goes alone.
			if v.Expires <= now {
				doom(k)
			}
			continue
		}
		pk, pv, ok := partner(k, v)
		switch {
		case v.Expires > now:
			if !ok {
				res.Orphans++
			}
		case ok && pv.Expires > now:
			res.KeptForPartner++
		case ok:
			doom(k, pk)
		default:
			doom(k)
		}
	}
	var err error
	for _, pair := range pairs {
		gone, back, terr := c.takeExpired(pair, now)
		if err = terr; err != nil {
			break
		}
		res.Deleted += len(gone)
		res.PutBack += back
		// A partner deleted outside the slice was read by an earlier pass
		// of this sweep or will not be read by a later one: count half of
		// them.
		for _, k := range gone {
			if _, read := scanned[k]; read {
				c.sweepDeleted += 2
			} else {
				c.sweepDeleted++
			}
		}
	}
	c.deletedSince += res.Deleted
	if res.Wrapped {
		// What the sweep read, less what it deleted.
		c.LastSweep = max(c.sweepSeen-c.sweepDeleted/2, 0)
		c.sweepSeen, c.sweepDeleted, c.deletedSince = 0, 0, 0
	}
	return res, err
}

// takeExpired deletes a flow's entries (one, or a pair) and returns the
// keys deleted. When, as taken, an entry is no longer expired (the
// datapath refreshed it, or reopened the tuple, since the pass read it),
// what was taken is put back instead (back counts it). Keys the datapath
// removed meanwhile are skipped.
func (c *Collector) takeExpired(keys []maps.CTKey, now uint64) (gone []maps.CTKey, back int, err error) {
	var taken []maps.CTKey
	var vals []maps.CTEntry
	live := false
	for _, k := range keys {
		var v maps.CTEntry
		ok, err := take(c.m, &k, &v)
		if err != nil {
			return taken, 0, fmt.Errorf("delete from conntrack: %w", err)
		}
		if ok {
			taken, vals = append(taken, k), append(vals, v)
			live = live || v.Expires > now
		}
	}
	if !live {
		return taken, 0, nil
	}
	for i := range taken {
		if err := putBack(c.m, &taken[i], &vals[i]); err != nil {
			return nil, i, fmt.Errorf("put back into conntrack: %w", err)
		}
	}
	return nil, len(taken), nil
}

// take deletes k and reads what it held at that moment (false: it was
// gone). Kernels without BPF_MAP_LOOKUP_AND_DELETE_ELEM for hash maps
// (before 5.14) read, then delete: what the datapath writes in between is
// lost.
func take(m *ebpf.Map, k, v any) (bool, error) {
	err := m.LookupAndDelete(k, v)
	if errors.Is(err, ebpf.ErrNotSupported) {
		if err = m.Lookup(k, v); err == nil {
			err = m.Delete(k)
		}
	}
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return false, nil
	}
	return err == nil, err
}

// putBack writes a taken entry back unless the datapath wrote the key
// anew since, whose entry is newer.
func putBack(m *ebpf.Map, k, v any) error {
	if err := m.Update(k, v, ebpf.UpdateNoExist); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
		return err
	}
	return nil
}

// learned says a flow entry was learned from DSR on the backend's node,
// where the client's service entry is the entry node's.
func learned(k maps.CTKey, v maps.CTEntry) bool {
	return k.Flags&maps.CTFlagService == 0 && v.State&maps.CTNSLearned != 0
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
	// ct_create_failed since the previous pass, NATExhausted that of
	// nat_exhausted (SNAT found no free port: flows gone but not yet
	// collected may hold them).
	NewFlows, CreateFailed, NATExhausted uint64
	// MaxEntries is the map's capacity.
	MaxEntries int
	// Last is the previous pass.
	Last PassResult
}

// Pacer chooses the next GC interval and budget from Signals. Calm: the
// base interval, and a budget that sweeps the map once every SweepPasses
// passes. Under pressure (fill at or above HighFill, insertions failing,
// SNAT ports exhausted, orphans seen, a pass finding many expired entries,
// or new flows that would fill the map before the next pass) the interval
// quarters down to Min and the budget covers the whole map; calm again,
// the interval doubles back up to Base.
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
	case s.NATExhausted > 0:
		reason = fmt.Sprintf("%d packets found no free SNAT port", s.NATExhausted)
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
		} else if _, ok := all[pairKey(k, v)]; !ok && !learned(k, v) {
			p.Orphans++
		}
	}
	return p, nil
}
