package ct

import (
	"encoding/binary"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/harness/testenv"
)

// lruOf makes an LRU hash map as the datapath's are, large enough that no
// write evicts: a CPU takes up to 128 free entries into a list of its own,
// so in a 64-entry map a write on a second CPU evicts the first CPU's
// entries (the 6.1 matrix run lost one so).
func lruOf[K, V any](t *testing.T) *ebpf.Map {
	t.Helper()
	testenv.RequireRoot(t)
	var k K
	var v V
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.LRUHash, KeySize: uint32(binary.Size(k)), ValueSize: uint32(binary.Size(v)), MaxEntries: 4096})
	require.NoError(t, err, "create a map")
	t.Cleanup(func() { m.Close() })
	return m
}

// A GC pass reads a pair expired; before it deletes them the datapath
// refreshes the flow (a late reply, or the tuple reopened). The pair
// stays, as it is now.
func TestTakeExpiredPutsBackAPairRefreshedSinceRead(t *testing.T) {
	m := lruOf[maps.CTKey, maps.CTEntry](t)
	now := uint64(time.Hour)
	svc := maps.CTKey{SPort: maps.NewBE16(1), DPort: maps.NewBE16(80), Proto: 6, Family: maps.IPv4, Flags: maps.CTFlagService}
	flow := maps.CTKey{SPort: maps.NewBE16(1), DPort: maps.NewBE16(8080), Proto: 6, Family: maps.IPv4}
	write := func(k maps.CTKey, exp uint64) {
		require.NoError(t, m.Put(&k, &maps.CTEntry{Expires: exp, BackendID: 1}), "write an entry")
	}
	c := NewCollector(m)

	write(svc, now-1)
	write(flow, now-1)
	gone, back, err := c.takeExpired([]maps.CTKey{svc, flow}, now)
	require.NoError(t, err)
	assert.Equal(t, []maps.CTKey{svc, flow}, gone, "an expired pair goes")
	assert.Zero(t, back)

	write(svc, now-1)
	write(flow, now+uint64(time.Minute)) // refreshed after the pass read it
	gone, back, err = c.takeExpired([]maps.CTKey{svc, flow}, now)
	require.NoError(t, err)
	assert.Empty(t, gone, "a pair refreshed since it was read stays")
	assert.Equal(t, 2, back, "both entries put back")
	var v maps.CTEntry
	require.NoError(t, m.Lookup(&svc, &v), "the service entry is back")
	require.NoError(t, m.Lookup(&flow, &v), "the flow entry is back")
	assert.Equal(t, now+uint64(time.Minute), v.Expires, "as the datapath last wrote it")
}

// GCNAT read a mapping stale; the datapath then rewrote it for a reopened
// flow. The new mapping stays.
func TestDeleteNATPutsBackAMappingRewrittenSinceRead(t *testing.T) {
	m := lruOf[maps.CTKey, maps.NATEntry](t)
	k := maps.CTKey{SPort: maps.NewBE16(40000), DPort: maps.NewBE16(8080), Proto: 17, Family: maps.IPv4, Flags: maps.NATFlagOut}
	read := maps.NATEntry{Port: maps.NewBE16(61000)}
	require.NoError(t, m.Put(&k, &read))
	n, err := deleteNAT(m, []staleMapping{{k, read}})
	require.NoError(t, err)
	assert.Equal(t, 1, n, "a mapping as read goes")

	rewritten := maps.NATEntry{Port: maps.NewBE16(61001)}
	require.NoError(t, m.Put(&k, &rewritten))
	n, err = deleteNAT(m, []staleMapping{{k, read}})
	require.NoError(t, err)
	assert.Zero(t, n, "a mapping rewritten since it was read stays")
	var v maps.NATEntry
	require.NoError(t, m.Lookup(&k, &v), "the mapping is back")
	assert.Equal(t, rewritten, v, "as the datapath wrote it")
}
