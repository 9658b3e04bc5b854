package bench

import (
	"testing"

	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/testenv"
	"github.com/servicepath/servicepath/suites/clusterip"
)

// BenchmarkClusterIPFixtures reports the BPF programs' own cost in
// ns/packet for every row of the ClusterIP fixture table.
func BenchmarkClusterIPFixtures(b *testing.B) {
	testenv.RequireRoot(b)
	inject.Bench(b, clusterip.Fixtures())
}
