package loader

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/servicepath/servicepath/datapath/maps"
)

// SockDestroyer holds the socket iterators that destroy sockets of removed
// backends. It is loaded on demand: it needs bpf_sock_destroy (Linux 6.5+),
// which the rest of the datapath does not.
type SockDestroyer struct {
	TCP, UDP *ebpf.Program
	// Targets is the sp_sock_destroy map the iterators consult.
	Targets *ebpf.Map
	objs    SockDestroyObjects
}

// LoadSockDestroyer loads the iterators against m's maps. A kernel without
// the kfunc yields an error wrapping ebpf.ErrNotSupported.
func LoadSockDestroyer(m *maps.Maps) (*SockDestroyer, error) {
	spec, err := LoadSockDestroy()
	if err != nil {
		return nil, fmt.Errorf("read BPF object: %w", err)
	}
	for _, ms := range spec.Maps {
		ms.Pinning = ebpf.PinNone
	}
	if m.SockCtx == nil {
		return nil, fmt.Errorf("no %s map: `servicepath load` again", maps.SockCtxName)
	}
	// The hooks' own maps: the iterators read what the hooks wrote, in the
	// socket's storage first, so they work whatever loader.SockState.
	opts := &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{
		maps.SockRevName: m.SockRevNAT,
		maps.SockCtxName: m.SockCtx,
		maps.MetricsName: m.Metrics,
	}}
	var d SockDestroyer
	if err := spec.LoadAndAssign(&d.objs, opts); err != nil {
		return nil, fmt.Errorf("load socket iterators (bpf_sock_destroy needs Linux 6.5+): %w", err)
	}
	d.TCP, d.UDP, d.Targets = d.objs.SpDestroyTcp, d.objs.SpDestroyUdp, d.objs.SpSockDestroy
	return &d, nil
}

// Close releases the programs.
func (d *SockDestroyer) Close() error { return d.objs.Close() }
