package bandwidth

import (
	"testing"

	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/testenv"
)

func TestFixtures(t *testing.T) {
	testenv.RequireRoot(t)
	inject.Run(t, Fixtures())
}
