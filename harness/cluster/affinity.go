package cluster

import (
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/traffic"
)

// ExerciseAffinity is the sessionAffinity: ClientIP story, whichever layer
// balances: a client's connections stick to one backend within the
// timeout, and the first one after it expires is chosen afresh.
func (c *Cluster) ExerciseAffinity(t *testing.T, vip netip.Addr) {
	const timeout = 1 * time.Second
	s := service.Service{Name: "default/sticky", Frontend: service.Frontend{Addr: vip, Port: 80, Protocol: service.TCP},
		Affinity: timeout}
	for _, n := range Backends {
		s.Backends = append(s.Backends, service.Backend{Addr: c.Addr(n, vip), Port: BackendPort})
	}
	require.NoError(t, c.Services.Upsert(s), "program a service with affinity")
	dst := netip.AddrPortFrom(vip, 80)
	before := c.Counters(t)["affinity_hit"]

	// Without affinity 20 connections would all land on one of three
	// backends once in 3^19.
	tally, err := traffic.Run(20, func(int) (traffic.Reply, error) {
		return traffic.TCPExchange(c.Client, dst, []byte("sticky"), 3*time.Second)
	})
	require.NoError(t, err, "connections within the timeout")
	assert.Len(t, tally, 1, "every connection of the client went to one backend: %v", tally)

	hits := c.Counters(t)["affinity_hit"]
	assert.Equal(t, uint64(19), hits-before, "all but the first were affinity hits")

	// The timeout itself is what is under test, so wait it out.
	time.Sleep(timeout + 500*time.Millisecond)
	_, err = traffic.TCPExchange(c.Client, dst, []byte("later"), 3*time.Second)
	require.NoError(t, err, "connection after the timeout")
	assert.Equal(t, hits, c.Counters(t)["affinity_hit"], "after the timeout the backend is chosen afresh, not by affinity")
}
