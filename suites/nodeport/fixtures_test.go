package nodeport

import (
	"testing"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/testenv"
)

func TestFixtures(t *testing.T) {
	testenv.RequireRoot(t)
	inject.Run(t, NewBed(t).Fixtures())
}

func TestXDPFixtures(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireBuiltFeature(t, "the XDP node-device program", loader.XDPMinKernel, loader.ProbeXDP())
	b := NewBed(t)
	inject.Run(t, b.XDPFixtures(t))
}
