// Package bandwidth proves the Bandwidth Manager (bpf/lib/edt.h): a rated
// pod's packets get departure times at its rate on the node device, and
// fq holds them until then; nothing else is touched.
package bandwidth

import (
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/packet"
)

// Aggregates of the rows: a rated pod's, and one with the aggregate bit
// but no rate.
const (
	rated   = maps.EDTAggregateBit | 1
	unrated = maps.EDTAggregateBit | 2
	// bytesPerSec is 8 Mbit/s.
	bytesPerSec = 1_000_000
)

var (
	pod4    = netip.MustParseAddrPort("10.244.0.5:40000")
	remote4 = netip.MustParseAddrPort("198.51.100.7:80")
	pod6    = netip.MustParseAddrPort("[fd00:244::5]:40000")
	remote6 = netip.MustParseAddrPort("[2001:db8:7::7]:80")
)

// Mono is CLOCK_MONOTONIC in ns, bpf_ktime_get_ns's clock.
func Mono() uint64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		panic(err)
	}
	return uint64(ts.Nano())
}

// delay is how long a frame takes at bytesPerSec.
func delay(frame []byte) uint64 { return uint64(len(frame)) * 1e9 / bytesPerSec }

func putRate(agg uint32, tLast uint64) func(e *inject.Env) error {
	return func(e *inject.Env) error {
		return e.DP.Maps.EDTRates.Put(agg, maps.EDTRate{BytesPerSec: bytesPerSec, TLast: tLast})
	}
}

func tLast(t testing.TB, e *inject.Env, agg uint32) uint64 {
	var r maps.EDTRate
	require.NoError(t, e.DP.Maps.EDTRates.Lookup(agg, &r), "rate of aggregate %#x", agg)
	return r.TLast
}

// Fixtures are the node device's egress rows, IPv4 and IPv6. from_pod's
// tag (skb->queue_mapping) is not in what BPF_PROG_TEST_RUN gives back, so
// the tag is proved end to end (TestEgressBandwidthHolds), and these rows
// start from tagged packets.
func Fixtures() []inject.Fixture {
	var out []inject.Fixture
	for _, fam := range []struct {
		name        string
		pod, remote netip.AddrPort
	}{{"ipv4", pod4, remote4}, {"ipv6", pod6, remote6}} {
		frame := packet.TCP(fam.pod, fam.remote, packet.ACK, make([]byte, 1000), packet.Opts{})
		out = append(out, familyFixtures(fam.name, frame)...)
	}
	return out
}

func familyFixtures(fam string, frame []byte) []inject.Fixture {
	const ahead = uint64(50 * time.Millisecond)
	// Each row's clock readings, taken as it runs.
	var before, base uint64
	now := func() uint64 { before = Mono(); return before }
	// clockStartsNow checks the pod's t_last is the program's now.
	clockStartsNow := func(t testing.TB, e *inject.Env) {
		after := Mono()
		last := tLast(t, e, rated)
		assert.True(t, last >= before && last <= after, "t_last %d is the program's now, within [%d, %d]", last, before, after)
	}
	// busy is a pod whose last packet leaves a little from now.
	busy := func(e *inject.Env) error {
		base = Mono() + ahead
		return putRate(rated, base)(e)
	}
	return []inject.Fixture{{
		Name:   fam + "-untagged-keeps-its-departure-time",
		Hook:   inject.ToNetdev,
		Input:  frame,
		Setup:  putRate(rated, 0),
		SKB:    func() inject.SKB { return inject.SKB{Tstamp: now() + ahead} },
		Tstamp: func() uint64 { return before + ahead },
		Check: func(t testing.TB, e *inject.Env) {
			assert.Zero(t, tLast(t, e, rated), "no aggregate's clock moved")
		},
	}, {
		Name:   fam + "-rx-queue-is-no-aggregate",
		Hook:   inject.ToNetdev,
		Input:  frame,
		Setup:  putRate(rated&^maps.EDTAggregateBit, 0),
		SKB:    func() inject.SKB { return inject.SKB{Queue: uint16(rated &^ maps.EDTAggregateBit)} },
		Tstamp: func() uint64 { return 0 },
		Check: func(t testing.TB, e *inject.Env) {
			assert.Zero(t, tLast(t, e, rated&^maps.EDTAggregateBit), "a recorded rx queue is not read as an aggregate")
		},
	}, {
		Name:   fam + "-aggregate-without-rate-leaves-now",
		Hook:   inject.ToNetdev,
		Input:  frame,
		SKB:    func() inject.SKB { return inject.SKB{Queue: unrated} },
		Tstamp: func() uint64 { return 0 },
	}, {
		Name:   fam + "-idle-pod-leaves-now-and-starts-its-clock",
		Hook:   inject.ToNetdev,
		Input:  frame,
		Setup:  putRate(rated, 0),
		SKB:    func() inject.SKB { now(); return inject.SKB{Queue: rated} },
		Tstamp: func() uint64 { return 0 },
		Check:  clockStartsNow,
	}, {
		Name:   fam + "-busy-pod-paced-behind-its-last-packet",
		Hook:   inject.ToNetdev,
		Input:  frame,
		Setup:  busy,
		SKB:    func() inject.SKB { return inject.SKB{Queue: rated} },
		Tstamp: func() uint64 { return base + delay(frame) },
		Check: func(t testing.TB, e *inject.Env) {
			assert.Equal(t, base+delay(frame), tLast(t, e, rated), "t_last is the packet's departure")
		},
	}, {
		Name:   fam + "-later-pacing-of-the-pod-kept",
		Hook:   inject.ToNetdev,
		Input:  frame,
		Setup:  busy,
		SKB:    func() inject.SKB { return inject.SKB{Queue: rated, Tstamp: base + uint64(time.Second)} },
		Tstamp: func() uint64 { return base + uint64(time.Second) },
		Check: func(t testing.TB, e *inject.Env) {
			assert.Equal(t, base+uint64(time.Second), tLast(t, e, rated), "t_last follows the later departure")
		},
	}, {
		Name:   fam + "-receive-timestamp-is-no-departure-time",
		Hook:   inject.ToNetdev,
		Input:  frame,
		Setup:  putRate(rated, 0),
		SKB:    func() inject.SKB { return inject.SKB{Queue: rated, Tstamp: now() + uint64(1000*time.Hour)} },
		Tstamp: func() uint64 { return 0 },
		Check:  clockStartsNow,
	}, {
		Name:  fam + "-past-the-horizon-dropped",
		Hook:  inject.ToNetdev,
		Input: frame,
		Setup: func(e *inject.Env) error {
			// Past the 2 s horizon by more than an emulated guest takes
			// from here to the program's clock reading.
			base = Mono() + uint64(3*time.Second)
			return putRate(rated, base)(e)
		},
		SKB:      func() inject.SKB { return inject.SKB{Queue: rated} },
		Verdict:  inject.Shot,
		Counters: inject.CountersOf("edt_horizon_drop", 1),
		Check: func(t testing.TB, e *inject.Env) {
			assert.Equal(t, base, tLast(t, e, rated), "a dropped packet takes no time")
		},
	}}
}
