package clusterip

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maglev"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/packet"
)

// maglevSvc is a TCP service whose new flows follow its Maglev table.
func (f Family) maglevSvc(backends ...service.Backend) service.Service {
	s := f.Service(service.TCP, backends...)
	s.Maglev = true
	return s
}

// lbSvc is a LoadBalancer frontend on the family's VIP, which pods reach
// through the pod device like any other.
func (f Family) lbSvc(ranges ...string) service.Service {
	s := f.Service(service.TCP, f.active(0))
	s.Frontend.Kind = service.LoadBalancer
	for _, r := range ranges {
		s.SourceRanges = append(s.SourceRanges, netip.MustParsePrefix(r))
	}
	return s
}

// missingBackend is an id no backend has.
const missingBackend = -1

// setTable overwrites the frontend's Maglev table: slot i names the
// backend pick(i) indexes in f.Backends, or no backend (missingBackend).
func setTable(f Family, pick func(slot, size int) int) func(e *inject.Env) error {
	return func(e *inject.Env) error {
		var master maps.ServiceValue
		addr, fam := maps.AddrFrom(f.VIP)
		k := maps.ServiceKey{Addr: addr, Port: maps.NewBE16(VIPPort), Proto: uint8(service.TCP), Family: fam}
		if err := e.DP.Maps.Services.Lookup(&k, &master); err != nil {
			return fmt.Errorf("read master: %w", err)
		}
		ids := map[netip.Addr]uint32{}
		for _, p := range e.Services.List() {
			for i, b := range p.Backends {
				ids[b.Addr] = p.BackendIDs[i]
			}
		}
		size := int(e.DP.Maps.Maglev.ValueSize() / 4)
		table := make([]byte, 4*size)
		for i := range size {
			id := uint32(0xfffffff0) // never allocated: ids stay within the backend map size
			if b := pick(i, size); b != missingBackend {
				if id = ids[f.Backends[b]]; id == 0 {
					return fmt.Errorf("backend %s not programmed", f.Backends[b])
				}
			}
			binary.NativeEndian.PutUint32(table[4*i:], id)
		}
		return e.DP.Maps.Maglev.Put(master.SvcID, table)
	}
}

// clientIn finds a client port whose flow to the VIP hashes into the
// table's slots [lo, hi) of size.
func (f Family) clientIn(lo, hi, size int) netip.AddrPort {
	for port := f.Client.Port(); ; port++ {
		c := netip.AddrPortFrom(f.Client.Addr(), port)
		if s := int(flowHash(c, f.vip(), service.TCP) % uint32(size)); s >= lo && s < hi {
			return c
		}
	}
}

// managerTableBackend is the backend a manager-built table of the given
// active backends names for the flow: maglev.Build over "addr:port",
// sorted, as datapath/service documents.
func managerTableBackend(backends []netip.AddrPort, client, vip netip.AddrPort, size int) netip.AddrPort {
	names := make([]string, len(backends))
	for i, b := range backends {
		names[i] = b.String()
	}
	slices.Sort(names)
	table, err := maglev.Build(names, size)
	if err != nil {
		panic(err)
	}
	return netip.MustParseAddrPort(names[table[flowHash(client, vip, service.TCP)%uint32(size)]])
}

// sameBackend checks that more new flows, from other client ports, all
// go where the fixture's flow went: a table naming one backend, not a
// random pick among three (which 30 flows would give away).
func sameBackend(f Family, want netip.AddrPort) func(t testing.TB, e *inject.Env) {
	return func(t testing.TB, e *inject.Env) {
		for i := range 30 {
			c := netip.AddrPortFrom(f.Client.Addr(), f.Client.Port()+uint16(100+i))
			v, out, err := e.Inject(inject.FromPod, packet.TCP(c, f.vip(), packet.SYN, nil, packet.Opts{}))
			require.NoError(t, err, "inject flow %d", i)
			require.Equal(t, inject.OK, v, "flow %d verdict", i)
			dst, _ := destination(out)
			assert.Equal(t, want.Addr(), dst, "flow %d from %s goes to the backend the table names", i, c)
		}
	}
}

func maglevFixtures(f Family) []inject.Fixture {
	name := func(s string) string { return f.Name + "/" + s }
	three := f.maglevSvc(f.active(0), f.active(1), f.active(2))
	syn := func(c netip.AddrPort) []byte { return packet.TCP(c, f.vip(), packet.SYN, nil, packet.Opts{}) }
	to := func(c, b netip.AddrPort) []byte { return packet.TCP(c, b, packet.SYN, nil, packet.Opts{}) }
	size := int(loader.DefaultConfig().MaglevTableSize)
	const small = 251

	// The one slot this flow hashes to names backend 1, every other slot
	// backend 0: only a hash equal to the Go mirror's reaches backend 1.
	onlyItsSlot := func(c netip.AddrPort) func(slot, size int) int {
		return func(slot, size int) int {
			if uint32(slot) == flowHash(c, f.vip(), service.TCP)%uint32(size) {
				return 1
			}
			return 0
		}
	}
	lower, upper := f.clientIn(0, size/2, size), f.clientIn(size/2, size, size)
	halves := func(slot, size int) int {
		if slot < size/2 {
			return 0
		}
		return 1
	}
	managed := []netip.AddrPort{f.backend(0), f.backend(1), f.backend(2)}

	return []inject.Fixture{
		{
			Name:     name("maglev-table-naming-one-backend-takes-every-flow"),
			Setup:    inject.Steps(inject.Upsert(three), setTable(f, func(int, int) int { return 2 })),
			Input:    syn(f.Client),
			Verdict:  inject.OK,
			Output:   to(f.Client, f.backend(2)),
			Counters: inject.CountersOf("lb_new", 1),
			Check:    sameBackend(f, f.backend(2)),
		},
		{
			Name:     name("maglev-go-and-c-flow-hash-agree"),
			Setup:    inject.Steps(inject.Upsert(three), setTable(f, onlyItsSlot(f.Client))),
			Input:    syn(f.Client),
			Verdict:  inject.OK,
			Output:   to(f.Client, f.backend(1)),
			Counters: inject.CountersOf("lb_new", 1),
		},
		{
			// The knob reaches the program: the slot is hash % 251.
			Name:     name("maglev-table-size-from-the-loader"),
			Config:   func(c *loader.Config) { c.MaglevTableSize = small },
			Setup:    inject.Steps(inject.Upsert(three), setTable(f, onlyItsSlot(f.Client))),
			Input:    syn(f.Client),
			Verdict:  inject.OK,
			Output:   to(f.Client, f.backend(1)),
			Counters: inject.CountersOf("lb_new", 1),
		},
		{
			Name:     name("maglev-flow-hashing-into-lower-half"),
			Setup:    inject.Steps(inject.Upsert(three), setTable(f, halves)),
			Input:    syn(lower),
			Verdict:  inject.OK,
			Output:   to(lower, f.backend(0)),
			Counters: inject.CountersOf("lb_new", 1),
		},
		{
			Name:     name("maglev-flow-hashing-into-upper-half"),
			Setup:    inject.Steps(inject.Upsert(three), setTable(f, halves)),
			Input:    syn(upper),
			Verdict:  inject.OK,
			Output:   to(upper, f.backend(1)),
			Counters: inject.CountersOf("lb_new", 1),
		},
		{
			// The manager's own table, predicted from the backends alone.
			Name:     name("maglev-manager-table-picks-predicted-backend"),
			Setup:    inject.Upsert(three),
			Input:    syn(f.Client),
			Verdict:  inject.OK,
			Output:   to(f.Client, managerTableBackend(managed, f.Client, f.vip(), size)),
			Counters: inject.CountersOf("lb_new", 1),
		},
		{
			Name:     name("maglev-table-naming-no-backend-falls-back-to-random"),
			Setup:    inject.Steps(inject.Upsert(f.maglevSvc(f.active(0))), setTable(f, func(int, int) int { return missingBackend })),
			Input:    syn(f.Client),
			Verdict:  inject.OK,
			Output:   to(f.Client, f.backend(0)),
			Counters: inject.CountersOf("lb_new", 1),
		},
		{
			// A table naming a backend that is terminating by now (as one
			// may while an update is under way) is not followed: the one
			// active backend takes the flow.
			Name: name("maglev-table-naming-terminating-backend-falls-back"),
			Setup: inject.Steps(inject.Upsert(f.maglevSvc(f.terminating(0), f.active(1))),
				setTable(f, func(int, int) int { return 0 })),
			Input:    syn(f.Client),
			Verdict:  inject.OK,
			Output:   to(f.Client, f.backend(1)),
			Counters: inject.CountersOf("lb_new", 1),
			Check:    sameBackend(f, f.backend(1)),
		},
	}
}

func sourceRangeFixtures(f Family) []inject.Fixture {
	name := func(s string) string { return f.Name + "/" + s }
	syn := packet.TCP(f.Client, f.vip(), packet.SYN, nil, packet.Opts{})
	in, out := "198.18.0.0/24", "203.0.113.0/24"
	if f.Client.Addr().Is6() {
		in, out = "fd00:5e::/64", "2001:db8::/32"
	}
	return []inject.Fixture{
		{
			Name:     name("source-range-allowed-client-dnat"),
			Setup:    inject.Upsert(f.lbSvc(out, in)),
			Input:    syn,
			Verdict:  inject.OK,
			Output:   packet.TCP(f.Client, f.backend(0), packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("lb_new", 1),
		},
		{
			Name:     name("source-range-host-route-allows-client"),
			Setup:    inject.Upsert(f.lbSvc(netip.PrefixFrom(f.Client.Addr(), f.Client.Addr().BitLen()).String())),
			Input:    syn,
			Verdict:  inject.OK,
			Output:   packet.TCP(f.Client, f.backend(0), packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("lb_new", 1),
		},
		{
			Name:     name("source-range-denied-client-dropped"),
			Setup:    inject.Upsert(f.lbSvc(out)),
			Input:    syn,
			Verdict:  inject.Shot,
			Counters: inject.CountersOf("source_range_denied", 1),
			Check: func(t testing.TB, e *inject.Env) {
				n, err := e.CTEntries()
				require.NoError(t, err, "count conntrack entries")
				assert.Zero(t, n, "a denied client opens no flow")
			},
		},
		{
			Name:     name("no-source-ranges-lets-everyone-in"),
			Setup:    inject.Upsert(f.lbSvc()),
			Input:    syn,
			Verdict:  inject.OK,
			Output:   packet.TCP(f.Client, f.backend(0), packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("lb_new", 1),
		},
	}
}

// destination is where an IP frame is sent.
func destination(frame []byte) (netip.Addr, bool) {
	l3 := frame[14:]
	if l3[0]>>4 == 4 {
		return netip.AddrFromSlice(l3[16:20])
	}
	return netip.AddrFromSlice(l3[24:40])
}
