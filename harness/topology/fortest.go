package topology

import (
	"errors"
	"testing"

	"github.com/servicepath/servicepath/harness/testenv"
)

// NewForTest builds spec for t, skipping t unless root, and tears the
// topology down when t ends. A device kind the kernel lacks follows
// testenv.RequireDriver: skipped outside vmtest, a failure in a vmtest
// kernel that should have it.
func NewForTest(t testing.TB, spec Spec) *Topology {
	t.Helper()
	testenv.RequireRoot(t)
	topo, err := New(spec)
	if errors.Is(err, ErrKindUnsupported) {
		driver, minKernel := spec.Kind.Driver()
		testenv.RequireDriver(t, driver, minKernel, err)
	}
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
