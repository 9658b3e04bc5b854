package service_test

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/service"
)

// manyServices are n frontends of every kind of option, so a batched
// write meets all of them: Maglev, source ranges, affinity, terminating
// backends, IPv6, and frontends sharing an address. change varies them.
func manyServices(n int, change bool) ([]string, []service.Service) {
	var owners []string
	var out []service.Service
	for i := range n {
		name := fmt.Sprintf("ns/svc-%d", i)
		owners = append(owners, name)
		f := frontend(fmt.Sprintf("198.19.%d.%d", i/200, i%200+1), 80, service.TCP)
		if i%5 == 1 {
			f = frontend(fmt.Sprintf("fd00:5f::%x", i+1), 443, service.TCP)
		}
		if i%7 == 2 {
			f = kindFrontend(fmt.Sprintf("192.0.2.%d", i%200+1), uint16(1000+i), service.LoadBalancer)
		}
		backends := 1 + i%4
		if change && i%2 == 0 {
			backends = 1 + (i+1)%3
		}
		s := svc(name, f)
		for b := range backends {
			addr := fmt.Sprintf("10.%d.%d.%d", 1+b, i/250, i%250+1)
			if f.Addr.Is6() {
				addr = fmt.Sprintf("fd00:5e::%x:%x", b+1, i+1)
			}
			be := active(addr, 8080)
			if b == 3 {
				be.State = service.Terminating
			}
			s.Backends = append(s.Backends, be)
		}
		s.Maglev = i%3 == 0 != (change && i%4 == 0)
		if i%6 == 0 {
			s.Affinity = 3 * time.Hour
		}
		if f.Kind == service.LoadBalancer {
			s.SourceRanges = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
			if !change {
				s.SourceRanges = append(s.SourceRanges, netip.MustParsePrefix("172.16.0.0/12"))
			}
		}
		out = append(out, s)
	}
	return owners, out
}

// A change of many frontends is written batched, map by map; the maps end
// up byte for byte as one upsert after the other leaves them.
func TestBatchedApplyMatchesOneByOne(t *testing.T) {
	small := func(c *loader.Config) { c.ServiceMapSize, c.BackendMapSize = 4096, 2048 }
	batched, oneByOne := newEnv(t, small), newEnv(t, small)
	for _, change := range []bool{false, true} {
		owners, services := manyServices(150, change)
		before := service.Batches(batched.Services)
		require.NoError(t, batched.Services.Apply(owners, services), "apply %d services (change %v)", len(services), change)
		assert.Equal(t, before+1, service.Batches(batched.Services), "the change was written batched")
		for _, s := range services {
			require.NoError(t, oneByOne.Services.Upsert(s), "upsert %s", s.Frontend)
		}
		when := fmt.Sprintf("change %v", change)
		checkInvariants(t, readRaw(t, batched.DP.Maps), when)
		assert.Equal(t, takeSnapshot(t, oneByOne.DP.Maps), takeSnapshot(t, batched.DP.Maps), "%s: the maps as one by one leaves them", when)
		assert.Equal(t, oneByOne.Services.List(), batched.Services.List(), "%s: the managers agree", when)
	}
	mgr, err := service.NewManager(batched.DP.Maps)
	require.NoError(t, err, "restart")
	assert.Equal(t, batched.Services.List(), mgr.List(), "a restarted manager reads back what was batched")
}
