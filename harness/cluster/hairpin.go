package cluster

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/traffic"
)

// ExerciseHairpin is Kubernetes' "pods hairpin back to themselves through
// services" story, whichever layer balances: the first backend pod reaches
// the service vip (TCP on 80, UDP on 53) with itself as the only backend,
// then as one of all three. Every exchange must be answered, with the VIP
// as the peer. It returns how many exchanges the pod answered itself.
func (c *Cluster) ExerciseHairpin(t *testing.T, vip netip.Addr, n int) int {
	const timeout = 3 * time.Second
	self := Backends[0]
	pod := c.Topo.Pod(self)
	tcp, udp := netip.AddrPortFrom(vip, 80), netip.AddrPortFrom(vip, 53)
	exchange := func(i int) (traffic.Reply, error) {
		var r traffic.Reply
		var err error
		want := udp
		switch i % 3 {
		case 0:
			r, err = traffic.TCPExchange(pod, tcp, fmt.Appendf(nil, "tcp %d", i), timeout)
			want = tcp
		case 1:
			r, err = traffic.UDPExchange(pod, udp, fmt.Appendf(nil, "udp %d", i), timeout)
		default:
			r, err = traffic.ConnectedUDPExchange(pod, udp, fmt.Appendf(nil, "cudp %d", i), timeout)
		}
		if err == nil && r.Peer != want {
			err = fmt.Errorf("answered by %s from %s, not the VIP %s", r.Identity, r.Peer, want)
		}
		return r, err
	}
	program := func(names ...string) {
		c.Program(t, vip, tcp.Port(), service.TCP, names...)
		c.Program(t, vip, udp.Port(), service.UDP, names...)
	}

	program(self)
	tally, err := traffic.Run(n, exchange)
	require.NoError(t, err, "%s through %s, itself the only backend (answered so far: %v)", self, vip, tally)
	assert.Equal(t, n, tally[self], "%s answered every exchange itself: %v", self, tally)

	program(Backends...)
	tally, err = traffic.Run(n, exchange)
	require.NoError(t, err, "%s through %s, itself one of %d backends (answered so far: %v)", self, vip, len(Backends), tally)
	assert.Positive(t, tally[self], "%s was chosen for some exchanges: %v", self, tally)
	assert.Less(t, tally[self], n, "the other backends were chosen too: %v", tally)
	return n + tally[self]
}
