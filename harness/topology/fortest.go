package topology

import (
	"testing"

	"github.com/servicepath/servicepath/harness/testenv"
)

// NewForTest builds spec for t, skipping t unless root, and tears the
// topology down when t ends.
func NewForTest(t testing.TB, spec Spec) *Topology {
	t.Helper()
	testenv.RequireRoot(t)
	topo, err := New(spec)
	if err != nil {
		t.Fatalf("build topology: %v", err)
	}
	t.Cleanup(func() {
		if err := topo.Close(); err != nil {
			t.Errorf("close topology: %v", err)
		}
	})
	return topo
}
