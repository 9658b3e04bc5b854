// Package collision replays clients that reuse 5-tuples against a
// service (port reuse after close, after an RST, TIME_WAIT reuse, two
// clients masqueraded to one address) through the per-packet path, whose
// conntrack is keyed by the 5-tuple. The packet table pins down each exact
// sequence; the real-socket runs measure resets, failures and the spread
// over backends.
package collision

import (
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/ct"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/packet"
	"github.com/servicepath/servicepath/suites/clusterip"
)

var (
	f       = clusterip.V4
	client  = f.Client
	vipAP   = netip.AddrPortFrom(f.VIP, clusterip.VIPPort)
	b0, b1  = netip.AddrPortFrom(f.Backends[0], clusterip.BackendPort), netip.AddrPortFrom(f.Backends[1], clusterip.BackendPort)
	payload = []byte("collision")
)

func svc(proto service.Protocol, backends ...service.Backend) service.Service {
	return f.Service(proto, backends...)
}

func active(a netip.AddrPort) service.Backend { return service.Backend{Addr: a.Addr(), Port: a.Port()} }
func terminating(a netip.AddrPort) service.Backend {
	b := active(a)
	b.State = service.Terminating
	return b
}

func fwd(flags packet.TCPFlags) []byte { return packet.TCP(client, vipAP, flags, nil, packet.Opts{}) }
func rev(from netip.AddrPort, flags packet.TCPFlags) []byte {
	return packet.TCP(from, client, flags, nil, packet.Opts{FromHost: true})
}

type step struct {
	hook inject.Hook
	pkt  []byte
}

// seq injects packets in order, then runs more setup.
func seq(steps []step, then ...func(*inject.Env) error) func(*inject.Env) error {
	return func(e *inject.Env) error {
		for _, s := range steps {
			if _, _, err := e.Inject(s.hook, s.pkt); err != nil {
				return err
			}
		}
		for _, fn := range then {
			if err := fn(e); err != nil {
				return err
			}
		}
		return nil
	}
}

func chain(fns ...func(*inject.Env) error) func(*inject.Env) error {
	return func(e *inject.Env) error {
		for _, fn := range fns {
			if err := fn(e); err != nil {
				return err
			}
		}
		return nil
	}
}

// handshake is a flow to b0: SYN, SYN-ACK, ACK.
var handshake = []step{{inject.FromPod, fwd(packet.SYN)}, {inject.ToPod, rev(b0, packet.SYNACK)}, {inject.FromPod, fwd(packet.ACK)}}

func with(a []step, b ...step) []step { return append(append([]step(nil), a...), b...) }

// moveToB1 leaves b0 terminating and b1 the only backend new flows get.
var moveToB1 = inject.Upsert(svc(service.TCP, terminating(b0), active(b1)))

// expireAll moves every CT entry's expiry into the past, as an idle flow
// past its lifetime that no GC pass has deleted yet.
func expireAll(e *inject.Env) error {
	now, err := ct.Now()
	if err != nil {
		return err
	}
	var k maps.CTKey
	var v maps.CTEntry
	var keys []maps.CTKey
	var vals []maps.CTEntry
	it := e.DP.Maps.CT.Iterate()
	for it.Next(&k, &v) {
		v.Expires = now - uint64(time.Second)
		keys, vals = append(keys, k), append(vals, v)
	}
	if err := it.Err(); err != nil {
		return err
	}
	for i := range keys {
		if err := e.DP.Maps.CT.Put(&keys[i], &vals[i]); err != nil {
			return err
		}
	}
	return nil
}

// Fixtures are the exact reuse sequences, run by TestCollisionFixtures.
func Fixtures() []inject.Fixture {
	start := inject.Upsert(svc(service.TCP, active(b0)))
	return []inject.Fixture{
		{
			// Server closes first (server TIME_WAIT), the client's port is free
			// at once: the next connection from it is a new flow.
			Name: "port-reuse-after-server-close-reselects",
			Setup: chain(start, seq(with(handshake,
				step{inject.ToPod, rev(b0, packet.FINACK)}, step{inject.FromPod, fwd(packet.FINACK)}, step{inject.ToPod, rev(b0, packet.ACK)}),
				moveToB1)),
			Input:    fwd(packet.SYN),
			Verdict:  inject.OK,
			Output:   packet.TCP(client, b1, packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("ct_reopen", 1, "lb_new", 1),
		},
		{
			// Client closes first and reuses its port from TIME_WAIT
			// (tcp_tw_reuse): the final ACK was seen.
			Name: "time-wait-reuse-after-client-close-reselects",
			Setup: chain(start, seq(with(handshake,
				step{inject.FromPod, fwd(packet.FINACK)}, step{inject.ToPod, rev(b0, packet.FINACK)}, step{inject.FromPod, fwd(packet.ACK)}),
				moveToB1)),
			Input:    fwd(packet.SYN),
			Verdict:  inject.OK,
			Output:   packet.TCP(client, b1, packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("ct_reopen", 1, "lb_new", 1),
		},
		{
			Name:     "port-reuse-after-rst-reselects",
			Setup:    chain(start, seq(with(handshake, step{inject.FromPod, fwd(packet.RSTACK)}), moveToB1)),
			Input:    fwd(packet.SYN),
			Verdict:  inject.OK,
			Output:   packet.TCP(client, b1, packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("ct_reopen", 1, "lb_new", 1),
		},
		{
			// A retransmitted SYN of a flow still opening stays on its backend.
			Name:     "syn-retransmit-keeps-backend",
			Setup:    chain(start, seq([]step{{inject.FromPod, fwd(packet.SYN)}}, inject.Upsert(svc(service.TCP, active(b0), active(b1))))),
			Input:    fwd(packet.SYN),
			Verdict:  inject.OK,
			Output:   packet.TCP(client, b0, packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("lb_established", 1),
		},
		{
			// A direct connection reusing a translated tuple: the old flow is
			// forgotten so the direct flow's replies are not rewritten.
			Name:     "direct-connection-on-translated-tuple-forgets-flow",
			Setup:    chain(start, seq(handshake)),
			Input:    packet.TCP(client, b0, packet.SYN, nil, packet.Opts{}),
			Verdict:  inject.OK,
			Counters: inject.CountersOf("pass", 1, "ct_tuple_reused", 1),
			Check: func(t testing.TB, e *inject.Env) {
				v, out, err := e.Inject(inject.ToPod, rev(b0, packet.SYNACK))
				require.NoError(t, err, "inject the backend's SYN-ACK")
				assert.Equal(t, inject.OK, v, "SYN-ACK passes")
				assert.Equal(t, rev(b0, packet.SYNACK), out, "the direct flow's SYN-ACK keeps the backend's source")
			},
		},
		// Found by this scenario: closes seen only on the reply side and
		// expiry without GC used to leave the tuple on its old backend.
		{
			// A UDP flow idle past its 60 s lifetime is a new flow, whether
			// or not GC has deleted its entries yet, so it must not go to a
			// terminating backend.
			Name: "expired-udp-flow-not-yet-collected-is-a-new-flow",
			Setup: chain(inject.Upsert(svc(service.UDP, active(b0))),
				seq([]step{{inject.FromPod, packet.UDP(client, vipAP, payload, packet.Opts{})}}),
				inject.Upsert(svc(service.UDP, terminating(b0), active(b1))), expireAll),
			Input:    packet.UDP(client, vipAP, payload, packet.Opts{}),
			Verdict:  inject.OK,
			Output:   packet.UDP(client, b1, payload, packet.Opts{}),
			Counters: inject.CountersOf("ct_reopen", 1, "lb_new", 1),
		},
		{
			// The backend reset the flow (a reply RST): the client's port is
			// free at once, and the next SYN on it (the same client, or a second
			// one masqueraded to its address) is a new connection. The RST is
			// recorded on the flow entry, which decides.
			Name:     "backend-rst-then-port-reuse-reselects",
			Setup:    chain(inject.Upsert(svc(service.TCP, active(b0))), seq(with(handshake, step{inject.ToPod, rev(b0, packet.RSTACK)}), moveToB1)),
			Input:    fwd(packet.SYN),
			Verdict:  inject.OK,
			Output:   packet.TCP(client, b1, packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("ct_reopen", 1, "lb_new", 1),
		},
		{
			// The same for TCP: a bare SYN on an expired (idle past its
			// lifetime) established entry is a new connection.
			Name: "syn-on-expired-established-flow-is-a-new-flow",
			Setup: chain(inject.Upsert(svc(service.TCP, active(b0))), seq(handshake),
				inject.Upsert(svc(service.TCP, terminating(b0), active(b1))), expireAll),
			Input:    fwd(packet.SYN),
			Verdict:  inject.OK,
			Output:   packet.TCP(client, b1, packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("ct_reopen", 1, "lb_new", 1),
		},
		{
			// Client closed first and its final ACK was not seen (lost, or the
			// client reused the port from TIME_WAIT before sending it): the
			// backend's FIN, seen only on the reply side, closed the flow.
			Name: "time-wait-reuse-before-final-ack-reselects",
			Setup: chain(inject.Upsert(svc(service.TCP, active(b0))), seq(with(handshake,
				step{inject.FromPod, fwd(packet.FINACK)}, step{inject.ToPod, rev(b0, packet.FINACK)})), moveToB1),
			Input:    fwd(packet.SYN),
			Verdict:  inject.OK,
			Output:   packet.TCP(client, b1, packet.SYN, nil, packet.Opts{}),
			Counters: inject.CountersOf("ct_reopen", 1, "lb_new", 1),
		},
	}
}
