package service_test

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/inject"
)

// synthetic is n ClusterIP services of three backends each, as the
// connection benchmark programs them.
func synthetic(n int) ([]string, []service.Service) {
	owners := make([]string, n)
	services := make([]service.Service, n)
	vip := netip.MustParseAddr("10.96.0.1")
	for i := range services {
		owners[i] = fmt.Sprintf("bench/svc-%d", i)
		s := service.Service{Name: owners[i], Frontend: service.Frontend{Addr: vip, Port: 80, Protocol: service.TCP}}
		for b := range 3 {
			s.Backends = append(s.Backends, service.Backend{Addr: netip.AddrFrom4([4]byte{10, 244, byte(b), 2}), Port: 8080})
		}
		services[i] = s
		vip = vip.Next()
	}
	return owners, services
}

// BenchmarkFullSync is a full sync of n services into empty maps, as a
// starting agent makes it; one service's update at n is BenchmarkUpsert.
func BenchmarkFullSync(b *testing.B) {
	for _, n := range []int{10_000, 100_000} {
		b.Run(fmt.Sprintf("services=%d", n), func(b *testing.B) {
			env := newEnv(b, func(c *loader.Config) {
				c.ServiceMapSize, c.BackendMapSize = uint32(4*n+1024), uint32(4*n+1024)
			})
			owners, services := synthetic(n)
			for b.Loop() {
				b.StopTimer()
				require.NoError(b, env.Reset(), "empty the maps")
				b.StartTimer()
				require.NoError(b, env.Services.Apply(owners, services), "full sync")
			}
			b.ReportMetric(float64(b.Elapsed().Milliseconds())/float64(b.N), "ms/sync")
		})
	}
}

// BenchmarkResync applies n unchanged services again, as an agent's
// periodic full sync does: it must cost no write and little time, since
// changes arriving meanwhile wait for it.
func BenchmarkResync(b *testing.B) {
	env, owners, services := programmed(b, 100_000)
	for b.Loop() {
		require.NoError(b, env.Services.Apply(owners, services), "resync")
	}
	b.ReportMetric(float64(b.Elapsed().Milliseconds())/float64(b.N), "ms/sync")
}

// BenchmarkUpsert changes one service's backends with n others programmed.
func BenchmarkUpsert(b *testing.B) {
	const n = 100_000
	env, _, services := programmed(b, n)
	s := services[n/2]
	for i := 0; b.Loop(); i++ {
		s.Backends = services[n/2].Backends[:2+i%2]
		require.NoError(b, env.Services.Upsert(s), "update one service")
	}
}

// programmed is an environment holding n synthetic services.
func programmed(b *testing.B, n int) (*inject.Env, []string, []service.Service) {
	e := newEnv(b, func(c *loader.Config) {
		c.ServiceMapSize, c.BackendMapSize = uint32(4*n+1024), uint32(4*n+1024)
	})
	owners, services := synthetic(n)
	require.NoError(b, e.Services.Apply(owners, services), "full sync")
	return e, owners, services
}
