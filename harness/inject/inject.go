// Package inject runs packets through the datapath's programs with
// BPF_PROG_TEST_RUN. Fixture tables (name, map setup, input, expected
// verdict, expected output) run as tests with Run and, unchanged, as
// ns/packet benchmarks with Bench.
package inject

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/metrics"
	"github.com/servicepath/servicepath/datapath/service"
)

// Verdict is a tc program's return code.
type Verdict uint32

const (
	OK       Verdict = 0 // TC_ACT_OK
	Shot     Verdict = 2 // TC_ACT_SHOT
	Redirect Verdict = 7 // TC_ACT_REDIRECT
)

func (v Verdict) String() string {
	switch v {
	case OK:
		return "TC_ACT_OK"
	case Shot:
		return "TC_ACT_SHOT"
	case Redirect:
		return "TC_ACT_REDIRECT"
	}
	return fmt.Sprintf("verdict(%d)", uint32(v))
}

// Hook names the program a packet is injected into.
type Hook int

const (
	// FromPod is tc ingress of the pod's host-side device.
	FromPod Hook = iota
	// ToPod is tc egress of the pod's host-side device.
	ToPod
)

func (h Hook) String() string {
	if h == ToPod {
		return "to-pod"
	}
	return "from-pod"
}

// Env is a loaded, unpinned datapath with a service manager over its maps.
type Env struct {
	DP       *loader.Datapath
	Services *service.Manager
}

// NewEnv loads the datapath with cfg (pinning ignored).
func NewEnv(cfg loader.Config) (*Env, error) {
	cfg.PinPath = ""
	dp, err := loader.Load(cfg)
	if err != nil {
		return nil, err
	}
	env := &Env{DP: dp}
	if err := env.Reset(); err != nil {
		dp.Close()
		return nil, err
	}
	return env, nil
}

// Close unloads the datapath.
func (e *Env) Close() error { return e.DP.Close() }

func clearMap(m *ebpf.Map) error {
	var keys [][]byte
	var k []byte
	it := m.Iterate()
	var v []byte
	for it.Next(&k, &v) {
		keys = append(keys, append([]byte(nil), k...))
	}
	if err := it.Err(); err != nil {
		return err
	}
	for _, k := range keys {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return err
		}
	}
	return nil
}

// Reset empties every map and zeroes the counters, so each fixture starts
// from nothing.
func (e *Env) Reset() error {
	m := e.DP.Maps
	for _, mp := range []*ebpf.Map{m.Services, m.Backends, m.SvcMeta, m.CT, m.Frags, m.Affinity, m.SockRevNAT} {
		if err := clearMap(mp); err != nil {
			return fmt.Errorf("reset %s: %w", mp, err)
		}
	}
	zeros := make([]uint64, ebpf.MustPossibleCPU())
	for i := range metrics.Names {
		if err := m.Metrics.Put(uint32(i), zeros); err != nil {
			return fmt.Errorf("reset counters: %w", err)
		}
	}
	mgr, err := service.NewManager(m)
	if err != nil {
		return err
	}
	e.Services = mgr
	return nil
}

func (e *Env) prog(h Hook) *ebpf.Program {
	if h == ToPod {
		return e.DP.ToPod
	}
	return e.DP.FromPod
}

// Inject runs one packet through the hook and returns the verdict and
// the packet as the program left it.
func (e *Env) Inject(h Hook, pkt []byte) (Verdict, []byte, error) {
	// Room for programs that grow the packet (ICMP replies).
	opts := &ebpf.RunOptions{Data: pkt, DataOut: make([]byte, len(pkt)+512)}
	ret, err := e.prog(h).Run(opts)
	if err != nil {
		return 0, nil, fmt.Errorf("run %s: %w", h, err)
	}
	return Verdict(ret), opts.DataOut, nil
}

// Counters returns the per-reason counters summed over CPUs.
func (e *Env) Counters() (map[string]uint64, error) {
	return metrics.Read(e.DP.Maps.Metrics)
}

// CTEntries counts conntrack entries, for fixtures that check creation.
func (e *Env) CTEntries() (int, error) {
	n := 0
	var k maps.CTKey
	var v maps.CTEntry
	it := e.DP.Maps.CT.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	return n, it.Err()
}

// flowState is the content of the maps packets change (conntrack and
// fragment tracking), to put back after a timed run.
type flowState map[*ebpf.Map]map[string][]byte

func snapshotFlows(e *Env) (flowState, error) {
	st := flowState{}
	for _, m := range []*ebpf.Map{e.DP.Maps.CT, e.DP.Maps.Frags} {
		entries := map[string][]byte{}
		var k, v []byte
		it := m.Iterate()
		for it.Next(&k, &v) {
			entries[string(k)] = append([]byte(nil), v...)
		}
		if err := it.Err(); err != nil {
			return nil, err
		}
		st[m] = entries
	}
	return st, nil
}

func (st flowState) restore() error {
	for m, entries := range st {
		var stale [][]byte
		var k, v []byte
		it := m.Iterate()
		for it.Next(&k, &v) {
			if want, ok := entries[string(k)]; !ok {
				stale = append(stale, append([]byte(nil), k...))
			} else if string(want) != string(v) {
				if err := m.Put(k, want); err != nil {
					return err
				}
			}
		}
		if err := it.Err(); err != nil {
			return err
		}
		for _, k := range stale {
			if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return err
			}
		}
		for k, v := range entries {
			if err := m.Update([]byte(k), v, ebpf.UpdateNoExist); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
				return err
			}
		}
	}
	return nil
}
