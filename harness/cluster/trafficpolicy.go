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

// ExerciseTrafficPolicies is kube-proxy's traffic policies as the client
// pod sees them on a node with no backend of the service's own. As an
// externalTrafficPolicy Local LoadBalancer IP (port 80, TCP and UDP),
// vip answers from every backend: in-cluster clients take the frontend's
// in-cluster entry. As an internalTrafficPolicy Local cluster IP (TCP on
// port 81), it does not answer; the error is returned for the caller to
// check how.
func (c *Cluster) ExerciseTrafficPolicies(t *testing.T, vip netip.Addr, n int) error {
	const timeout = 3 * time.Second
	lb := service.Frontend{Addr: vip, Port: 80, Kind: service.LoadBalancer}
	var all []service.Backend
	for _, b := range Backends {
		all = append(all, c.Backend(b, vip, service.Active))
	}
	for _, proto := range []service.Protocol{service.TCP, service.UDP} {
		ext := service.Service{Name: "default/etp-local", Frontend: lb, ExternalLocal: true}
		ext.Frontend.Protocol = proto
		in := service.Service{Name: "default/etp-local", Frontend: ext.Frontend, Backends: all}
		in.Frontend.InCluster = true
		for _, s := range []service.Service{ext, in} {
			require.NoError(t, c.Services.Upsert(s), "program %s", s.Frontend)
			t.Cleanup(func() { assert.NoError(t, c.Services.Delete(s.Frontend), "remove %s", s.Frontend) })
		}
	}
	dst := netip.AddrPortFrom(vip, lb.Port)
	tally, err := traffic.Run(n, func(i int) (traffic.Reply, error) {
		if i%2 == 0 {
			return traffic.TCPExchange(c.Client, dst, fmt.Appendf(nil, "tcp %d", i), timeout)
		}
		r, err := traffic.UDPExchange(c.Client, dst, fmt.Appendf(nil, "udp %d", i), timeout)
		if err == nil && r.Peer != dst {
			err = fmt.Errorf("UDP reply from %s, not %s", r.Peer, dst)
		}
		return r, err
	})
	require.NoError(t, err, "the client pod reaches %s, externalTrafficPolicy Local without local backends (answered so far: %v)", dst, tally)
	assert.Greater(t, len(tally), 1, "several of the service's backends answered: %v", tally)

	local := service.Service{Name: "default/itp-local", Frontend: service.Frontend{Addr: vip, Port: 81, Protocol: service.TCP},
		InternalLocal: true}
	require.NoError(t, c.Services.Upsert(local), "program %s", local.Frontend)
	t.Cleanup(func() { assert.NoError(t, c.Services.Delete(local.Frontend), "remove %s", local.Frontend) })
	_, err = traffic.TCPExchange(c.Client, netip.AddrPortFrom(vip, local.Frontend.Port), []byte("itp"), time.Second)
	require.Error(t, err, "internalTrafficPolicy Local without local backends answers nothing")
	return err
}
