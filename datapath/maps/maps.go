package maps

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
)

// Names of the pinned maps, as declared in bpf/lib.
const (
	ServicesName = "sp_services"
	BackendsName = "sp_backends"
	SvcMetaName  = "sp_svc_meta"
	CTName       = "sp_ct"
	FragsName    = "sp_frags"
	MetricsName  = "sp_metrics"
)

// Maps are the handles user space programs.
type Maps struct {
	Services *ebpf.Map
	Backends *ebpf.Map
	SvcMeta  *ebpf.Map
	CT       *ebpf.Map
	Frags    *ebpf.Map
	Metrics  *ebpf.Map
}

// OpenPinned opens the maps a `servicepath load` pinned under dir.
func OpenPinned(dir string) (*Maps, error) {
	var m Maps
	for _, x := range []struct {
		name string
		dst  **ebpf.Map
	}{
		{ServicesName, &m.Services},
		{BackendsName, &m.Backends},
		{SvcMetaName, &m.SvcMeta},
		{CTName, &m.CT},
		{FragsName, &m.Frags},
		{MetricsName, &m.Metrics},
	} {
		mp, err := ebpf.LoadPinnedMap(filepath.Join(dir, x.name), nil)
		if err != nil {
			m.Close()
			if errors.Is(err, os.ErrNotExist) {
				return nil, fmt.Errorf("map %s not pinned under %s: run `servicepath load --bpffs %s` first", x.name, dir, dir)
			}
			return nil, fmt.Errorf("open pinned map %s: %w", x.name, err)
		}
		*x.dst = mp
	}
	return &m, nil
}

// Close releases the handles; pinned maps stay.
func (m *Maps) Close() error {
	var errs []error
	for _, mp := range []*ebpf.Map{m.Services, m.Backends, m.SvcMeta, m.CT, m.Frags, m.Metrics} {
		if mp != nil {
			errs = append(errs, mp.Close())
		}
	}
	return errors.Join(errs...)
}
