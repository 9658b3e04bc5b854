// Package loader loads servicepath's BPF objects with their runtime
// settings, pinning maps so that a restarted servicepath keeps its flows.
package loader

import (
	"errors"
	"fmt"
	"time"

	"github.com/cilium/ebpf"

	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/mounts"
)

// NoBackendAction is what a service without backends does to new flows.
type NoBackendAction uint32

const (
	// Reject answers with ICMP/ICMPv6 port unreachable, as kube-proxy does.
	Reject NoBackendAction = 0
	// Drop drops silently.
	Drop NoBackendAction = 1
)

// ParseNoBackendAction reads the CLI spelling.
func ParseNoBackendAction(s string) (NoBackendAction, error) {
	switch s {
	case "reject":
		return Reject, nil
	case "drop":
		return Drop, nil
	}
	return 0, fmt.Errorf("no-backend action %q: want reject or drop", s)
}

// Config holds load-time settings.
type Config struct {
	// PinPath is a directory on bpffs (mounted there if absent) where maps
	// are pinned and re-used by later loads. Empty: nothing is pinned.
	PinPath string

	ServiceMapSize uint32
	BackendMapSize uint32
	CTMapSize      uint32

	NoBackend NoBackendAction

	CTTCPSyn         time.Duration
	CTTCPEstablished time.Duration
	CTTCPClose       time.Duration
	CTNonTCP         time.Duration
}

// DefaultConfig has the sizes and Cilium's CT lifetimes.
func DefaultConfig() Config {
	return Config{
		ServiceMapSize:   65536,
		BackendMapSize:   65536,
		CTMapSize:        512 * 1024,
		NoBackend:        Reject,
		CTTCPSyn:         60 * time.Second,
		CTTCPEstablished: 6 * time.Hour,
		CTTCPClose:       10 * time.Second,
		CTNonTCP:         60 * time.Second,
	}
}

func (c Config) validate() error {
	for _, s := range []struct {
		name string
		v    uint32
	}{{"service map size", c.ServiceMapSize}, {"backend map size", c.BackendMapSize}, {"conntrack map size", c.CTMapSize}} {
		if s.v == 0 {
			return fmt.Errorf("%s must be > 0", s.name)
		}
	}
	if c.NoBackend != Reject && c.NoBackend != Drop {
		return fmt.Errorf("unknown no-backend action %d", c.NoBackend)
	}
	for _, l := range []struct {
		name string
		d    time.Duration
	}{{"TCP SYN lifetime", c.CTTCPSyn}, {"TCP established lifetime", c.CTTCPEstablished}, {"TCP close lifetime", c.CTTCPClose}, {"non-TCP lifetime", c.CTNonTCP}} {
		if l.d < time.Second || l.d > time.Duration(1<<32-1)*time.Second {
			return fmt.Errorf("%s %s out of range (1s to 2^32-1 s)", l.name, l.d)
		}
	}
	return nil
}

// Datapath is a loaded set of programs and their maps.
type Datapath struct {
	Maps     *maps.Maps
	FromPod  *ebpf.Program
	ToPod    *ebpf.Program
	objs     LxcObjects
	PinnedAt string
}

// Load verifies and loads the programs with cfg applied.
func Load(cfg Config) (*Datapath, error) {
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("load config: %w", err)
	}
	spec, err := LoadLxc()
	if err != nil {
		return nil, fmt.Errorf("read BPF object: %w", err)
	}
	spec.Maps[maps.ServicesName].MaxEntries = cfg.ServiceMapSize
	spec.Maps[maps.SvcMetaName].MaxEntries = cfg.ServiceMapSize
	spec.Maps[maps.BackendsName].MaxEntries = cfg.BackendMapSize
	spec.Maps[maps.CTName].MaxEntries = cfg.CTMapSize

	for name, v := range map[string]uint32{
		"cfg_no_backend_action":    uint32(cfg.NoBackend),
		"cfg_ct_tcp_syn_s":         uint32(cfg.CTTCPSyn / time.Second),
		"cfg_ct_tcp_established_s": uint32(cfg.CTTCPEstablished / time.Second),
		"cfg_ct_tcp_close_s":       uint32(cfg.CTTCPClose / time.Second),
		"cfg_ct_nontcp_s":          uint32(cfg.CTNonTCP / time.Second),
	} {
		if err := spec.Variables[name].Set(v); err != nil {
			return nil, fmt.Errorf("set %s: %w", name, err)
		}
	}

	var opts ebpf.CollectionOptions
	if cfg.PinPath == "" {
		for _, m := range spec.Maps {
			m.Pinning = ebpf.PinNone
		}
	} else {
		if err := mounts.EnsureBPFFS(cfg.PinPath); err != nil {
			return nil, err
		}
		opts.Maps.PinPath = cfg.PinPath
	}

	var dp Datapath
	if err := spec.LoadAndAssign(&dp.objs, &opts); err != nil {
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return nil, fmt.Errorf("maps pinned under %s were made with other sizes or an older layout: "+
				"load with the same sizes, or `servicepath unload` first (drops tracked flows): %w", cfg.PinPath, err)
		}
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("BPF verifier rejected the datapath: %+v", ve)
		}
		return nil, fmt.Errorf("load BPF objects: %w", err)
	}
	m := dp.objs.LxcMaps
	dp.Maps = &maps.Maps{
		Services: m.SpServices,
		Backends: m.SpBackends,
		SvcMeta:  m.SpSvcMeta,
		CT:       m.SpCt,
		Frags:    m.SpFrags,
		Metrics:  m.SpMetrics,
	}
	dp.FromPod = dp.objs.SpFromPod
	dp.ToPod = dp.objs.SpToPod
	dp.PinnedAt = cfg.PinPath
	return &dp, nil
}

// Close releases file descriptors; pinned maps and attached links stay.
func (d *Datapath) Close() error {
	return d.objs.Close()
}
