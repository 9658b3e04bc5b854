package inject

import (
	"fmt"

	"github.com/servicepath/servicepath/datapath/service"
)

// Steps chains a fixture's setup actions.
func Steps(fns ...func(e *Env) error) func(e *Env) error {
	return func(e *Env) error {
		for _, fn := range fns {
			if err := fn(e); err != nil {
				return err
			}
		}
		return nil
	}
}

// Upsert programs s.
func Upsert(s service.Service) func(e *Env) error {
	return func(e *Env) error { return e.Services.Upsert(s) }
}

// Send injects an earlier packet of a flow on dev (nil: loopback) and
// insists it was not dropped.
func Send(dev *Device, h Hook, pkt []byte) func(e *Env) error {
	return func(e *Env) error {
		v, _, err := e.InjectOn(dev, h, pkt)
		if err == nil && v.Dropped() {
			err = fmt.Errorf("setup packet into %s dropped", h)
		}
		return err
	}
}
