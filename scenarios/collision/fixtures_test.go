package collision

import (
	"flag"
	"testing"

	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/testenv"
)

var bugs = flag.Bool("scenario.bugs", false, "run the rows of datapath bugs not fixed yet (they fail)")

func TestCollisionFixtures(t *testing.T) {
	testenv.RequireRoot(t)
	inject.Run(t, Fixtures())
}

func TestKnownDatapathBugs(t *testing.T) {
	if !*bugs {
		t.Skip("rows of known datapath bugs (scenarios/README.md): run with -scenario.bugs to see them fail")
	}
	testenv.RequireRoot(t)
	inject.Run(t, KnownBugs())
}
