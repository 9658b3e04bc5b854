package service

import (
	"fmt"
	"net/netip"

	"github.com/servicepath/servicepath/datapath/maps"
)

// Manager programs services into the datapath maps. All of its state is
// read back from the (pinned) maps, so a new process continues where the
// last one stopped. Not safe for concurrent use.
type Manager struct {
	m       *maps.Maps
	removed []Removed
	// changes counts frontends written or removed: an Apply of what the
	// maps already hold writes nothing and counts nothing. changedOwners
	// names their owners until TakeChanged.
	changes       uint64
	changedOwners map[string]bool
	// batches counts the changes written batched (writeAll).
	batches   uint64
	frontends map[maps.ServiceKey]*frontend
	usedIDs   map[uint32]bool
	// slots counts service map entries in use (masters and slots), kept
	// as frontends change so no update walks every frontend.
	slots    int
	nextID   uint32
	maxIDs   uint32
	maxSlots uint32
	// svcIDs are the frontends' svc ids (sp_maglev and sp_src_ranges keys),
	// handed out from a cursor like backend ids, so an id is not reused
	// while a packet may still hold it.
	svcIDs    map[uint32]maps.ServiceKey
	nextSvcID uint32
	// tables and ranges count sp_maglev and sp_src_ranges entries in use.
	tables, ranges       int
	maxTables, maxRanges uint32
	// addrRefs counts the frontends of each address in sp_frontend_addrs.
	addrRefs map[maps.NodeAddrKey]int
	// maglevSize is the table size the loader gave sp_maglev (its value
	// size / 4), which is what the datapath reads with: no separate
	// setting can disagree with it.
	maglevSize int
}

type frontend struct {
	name, portName string
	affinity       uint32 // seconds
	flags          uint16
	// ids in slot order: active first, then terminating; count of them
	// take new flows (all when none is active).
	ids   []uint32
	count int
	// backends by id, as written to sp_backends.
	backends map[uint32]maps.Backend
	// svcID is 0 only for a frontend read from maps written before svc
	// ids existed; its next write gives it one.
	svcID uint32
	// ranges are the source ranges in sp_src_ranges, masked and sorted.
	ranges []netip.Prefix
	// hasTable says sp_maglev holds a table for svcID; tableKey names the
	// backends it was built from ("" when unknown: rewritten next time).
	hasTable bool
	tableKey string
}

func (f *frontend) slots() int { return len(f.ids) }

// NewManager reads the current state from m and finishes any update an
// earlier process left half done.
func NewManager(m *maps.Maps) (*Manager, error) {
	mgr := &Manager{
		m:         m,
		frontends: map[maps.ServiceKey]*frontend{},
		usedIDs:   map[uint32]bool{},
		nextID:    1,
		maxIDs:    m.Backends.MaxEntries(),
		maxSlots:  m.Services.MaxEntries(),
		svcIDs:    map[uint32]maps.ServiceKey{},
		nextSvcID: 1,
		addrRefs:  map[maps.NodeAddrKey]int{},

		changedOwners: map[string]bool{},
	}
	if m.Maglev != nil {
		mgr.maglevSize = int(m.Maglev.ValueSize() / 4)
		mgr.maxTables = m.Maglev.MaxEntries()
	}
	if m.SrcRanges != nil {
		mgr.maxRanges = m.SrcRanges.MaxEntries()
	}
	if err := mgr.load(); err != nil {
		return nil, fmt.Errorf("read service maps: %w", err)
	}
	return mgr, nil
}

func masterKey(k maps.ServiceKey) maps.ServiceKey {
	k.Slot = 0
	return k
}
