// Package bandwidth programs the Bandwidth Manager (bpf/lib/edt.h): pods'
// egress rates, which the node devices' tc egress enforces by earliest
// departure time, and the fq qdisc on those devices that holds each packet
// until then.
package bandwidth

import (
	"errors"
	"fmt"
	"maps"
	"sync"

	"github.com/cilium/ebpf"

	dpmaps "github.com/servicepath/servicepath/datapath/maps"
)

// maxAggregates is how many rated pods a node can have: aggregates are 15
// bits of skb->queue_mapping below EDT_AGGREGATE_BIT, and 0x7fff would make
// the kernel's "no queue" 0xffff.
const maxAggregates = 0x7ffe

// Manager owns sp_edt_pods and sp_edt_rates: it gives each rated pod
// device an aggregate and keeps the two maps in step.
type Manager struct {
	pods, rates *ebpf.Map

	mu sync.Mutex
	// limits by host-side ifindex: each pod's aggregate and rate.
	limits map[uint32]limit
}

type limit struct {
	aggregate  uint32
	bitsPerSec uint64
}

// NewManager takes over the maps as they are (pinned, from an agent
// before this one), so a restart keeps every pod's aggregate and pacing.
func NewManager(m *dpmaps.Maps) (*Manager, error) {
	mgr := &Manager{pods: m.EDTPods, rates: m.EDTRates, limits: map[uint32]limit{}}
	var ifindex uint32
	var pod dpmaps.EDTPod
	it := m.EDTPods.Iterate()
	for it.Next(&ifindex, &pod) {
		var rate dpmaps.EDTRate
		if err := m.EDTRates.Lookup(pod.Aggregate, &rate); err != nil {
			continue // Set or Sync writes it anew
		}
		mgr.limits[ifindex] = limit{pod.Aggregate, rate.BytesPerSec * 8}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", dpmaps.EDTPodsName, err)
	}
	return mgr, nil
}

// Rates are the programmed rates in bit/s by host-side ifindex.
func (m *Manager) Rates() map[int]uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make(map[int]uint64, len(m.limits))
	for idx, l := range m.limits {
		out[int(idx)] = l.bitsPerSec
	}
	return out
}

// Set limits what the pod behind host-side device ifindex sends off the
// node to bitsPerSec (at least 8).
func (m *Manager) Set(ifindex int, bitsPerSec uint64) error {
	if err := check(ifindex, bitsPerSec); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.set(uint32(ifindex), bitsPerSec)
}

func check(ifindex int, bitsPerSec uint64) error {
	if ifindex <= 0 {
		return fmt.Errorf("bandwidth: ifindex %d is no device", ifindex)
	}
	if bitsPerSec < 8 {
		return fmt.Errorf("bandwidth: rate %d bit/s of ifindex %d is below one byte per second", bitsPerSec, ifindex)
	}
	return nil
}

func (m *Manager) set(ifindex uint32, bitsPerSec uint64) error {
	old, known := m.limits[ifindex]
	if known && old.bitsPerSec == bitsPerSec {
		return nil
	}
	agg := old.aggregate
	if !known {
		var err error
		if agg, err = m.freeAggregate(); err != nil {
			return err
		}
	}
	// The rate before the tag: a tagged packet always finds its rate.
	// A change keeps t_last, so the pod's queue is not forgotten.
	rate := dpmaps.EDTRate{BytesPerSec: bitsPerSec / 8}
	var prev dpmaps.EDTRate
	if known && m.rates.Lookup(agg, &prev) == nil {
		rate.TLast = prev.TLast
	}
	if err := m.rates.Put(agg, rate); err != nil {
		return fmt.Errorf("bandwidth: rate of ifindex %d: %w", ifindex, err)
	}
	if !known {
		if err := m.pods.Put(ifindex, dpmaps.EDTPod{Aggregate: agg}); err != nil {
			_ = m.rates.Delete(agg)
			return fmt.Errorf("bandwidth: tag of ifindex %d: %w", ifindex, err)
		}
	}
	m.limits[ifindex] = limit{agg, bitsPerSec}
	return nil
}

func (m *Manager) freeAggregate() (uint32, error) {
	used := make(map[uint32]bool, len(m.limits))
	for _, l := range m.limits {
		used[l.aggregate] = true
	}
	for i := uint32(1); i <= maxAggregates; i++ {
		if a := i | dpmaps.EDTAggregateBit; !used[a] {
			return a, nil
		}
	}
	return 0, fmt.Errorf("bandwidth: all %d aggregates in use", maxAggregates)
}

// Delete lifts the limit of ifindex's pod.
func (m *Manager) Delete(ifindex int) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.delete(uint32(ifindex))
}

func (m *Manager) delete(ifindex uint32) error {
	l, ok := m.limits[ifindex]
	if !ok {
		return nil
	}
	// The tag before the rate, the reverse of set.
	if err := m.pods.Delete(ifindex); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("bandwidth: tag of ifindex %d: %w", ifindex, err)
	}
	if err := m.rates.Delete(l.aggregate); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("bandwidth: rate of ifindex %d: %w", ifindex, err)
	}
	delete(m.limits, ifindex)
	return nil
}

// Sync makes want (bit/s by host-side ifindex) the only limits: new and
// changed ones are set, the rest lifted.
func (m *Manager) Sync(want map[int]uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	var errs []error
	for idx := range maps.Clone(m.limits) {
		if _, ok := want[int(idx)]; !ok {
			errs = append(errs, m.delete(idx))
		}
	}
	for idx, r := range want {
		if err := check(idx, r); err != nil {
			errs = append(errs, err)
			continue
		}
		errs = append(errs, m.set(uint32(idx), r))
	}
	return errors.Join(errs...)
}
