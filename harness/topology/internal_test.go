package topology

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/servicepath/servicepath/harness/testenv"
)

// Close undoes a topology that New abandoned halfway.
func TestClosePartial(t *testing.T) {
	testenv.RequireRoot(t)
	topo := &Topology{}
	// Two pods with one name (which validate rejects) fail at the second
	// pod's netns, after the node and first pod are fully plugged.
	prefix := fmt.Sprintf("partial-%d", os.Getpid())
	err := topo.build(prefix, Spec{Pods: []PodSpec{{Name: "ok"}, {Name: "ok"}}})
	closeErr := topo.Close()
	if err == nil {
		t.Fatal("building two pods with one name succeeded")
	}
	if len(topo.owned) != 2 {
		t.Fatalf("want node and first pod netns built before failing, got %d: %v", len(topo.owned), err)
	}
	if closeErr != nil {
		t.Fatal(closeErr)
	}
	for _, o := range topo.owned {
		if _, err := os.Stat(filepath.Join(netnsDir, o.name)); !os.IsNotExist(err) {
			t.Errorf("netns %s left behind: %v", o.name, err)
		}
	}
}

func TestHostIfName(t *testing.T) {
	seen := map[string]bool{}
	for i := range MaxPods {
		n := hostIfName(i, "a-very-long-pod-name")
		if len(n) > 15 || seen[n] {
			t.Fatalf("hostIfName(%d) = %q: too long or repeated", i, n)
		}
		seen[n] = true
	}
}
