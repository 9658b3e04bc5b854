package main

import (
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"sort"
	"strings"

	"github.com/spf13/pflag"

	"github.com/servicepath/servicepath/datapath/attach"
	"github.com/servicepath/servicepath/datapath/maps"
)

type statusJSON struct {
	BPFFS string `json:"bpffs"`
	// Links are the attachments, pinned links and tc filters:
	// "<device>-<hook>", "cgroup-<inode>-<hook>".
	Links     []string                `json:"links"`
	Services  int                     `json:"services"`
	Frontends int                     `json:"frontends"`
	Backends  map[string]int          `json:"backends"` // by state
	Conntrack map[string]zonePressure `json:"conntrack"`
	// FullestMap is the map nearest its size, as a share of it.
	FullestMap  string  `json:"fullestMap"`
	FullestFill float64 `json:"fullestFill"`
}

// cmdStatus is the one-screen answer to "is servicepath working here".
func cmdStatus(fs *pflag.FlagSet, o output) func() error {
	return checked(addShowFlags(fs), func(so *showOptions) error {
		mgr, m, err := openManager(so.bpffs)
		if err != nil {
			return err
		}
		defer m.Close()
		st := statusJSON{BPFFS: so.bpffs, Links: []string{}, Backends: map[string]int{}}
		entries, err := os.ReadDir(linkDir(so.bpffs))
		if err != nil && !os.IsNotExist(err) {
			return err
		}
		for _, e := range entries {
			st.Links = append(st.Links, e.Name())
		}
		filters, err := attach.TCHooks()
		if err != nil {
			return fmt.Errorf("list tc filters: %w", err)
		}
		st.Links = append(st.Links, filters...)
		sort.Strings(st.Links)
		names := map[string]bool{}
		backends := map[uint32]string{} // by backend ID: one backend, many frontends
		for _, s := range mgr.List() {
			names[s.Name] = true
			st.Frontends++
			for i, b := range s.Backends {
				backends[s.BackendIDs[i]] = b.State.String()
			}
		}
		for _, state := range backends {
			st.Backends[state]++
		}
		st.Services = len(names)
		occ, err := maps.Occupancy(m)
		if err != nil {
			return err
		}
		for name, u := range occ {
			if fill := float64(u.Entries) / float64(u.MaxEntries); u.MaxEntries > 0 && fill >= st.FullestFill {
				if fill > st.FullestFill || name < st.FullestMap {
					st.FullestMap, st.FullestFill = name, fill
				}
			}
		}
		if st.Conntrack, err = ctPressureLines(nil, m, nil); err != nil {
			return err
		}
		if so.structured() {
			return so.write(o.out, st)
		}
		fmt.Fprintf(o.out, "loaded:     %s\n", st.BPFFS)
		fmt.Fprintf(o.out, "attached:   %s\n", summariseLinks(st.Links))
		var states []string
		for state, n := range st.Backends {
			states = append(states, fmt.Sprintf("%d %s", n, state))
		}
		sort.Strings(states)
		fmt.Fprintf(o.out, "services:   %d (%d frontends), backends: %s\n", st.Services, st.Frontends, dash(strings.Join(states, ", ")))
		var zones []string
		var zoneNames []string
		for z := range st.Conntrack {
			zoneNames = append(zoneNames, z)
		}
		sort.Strings(zoneNames)
		for _, z := range zoneNames {
			p := st.Conntrack[z]
			zones = append(zones, fmt.Sprintf("%s %d/%d", z, p.Entries, p.MaxEntries))
		}
		fmt.Fprintf(o.out, "conntrack:  %s\n", strings.Join(zones, ", "))
		fmt.Fprintf(o.out, "fullest:    %s at %.1f%%\n", dash(st.FullestMap), 100*st.FullestFill)
		return nil
	})
}

// summariseLinks counts the attachments by kind.
func summariseLinks(links []string) string {
	if len(links) == 0 {
		return "nothing (load attaches with --device, --node-device, --cgroup)"
	}
	var devices, cgroups int
	devs := map[string]bool{}
	for _, l := range links {
		if strings.HasPrefix(l, "cgroup-") {
			cgroups++
			continue
		}
		devices++
		if i := strings.LastIndex(l, "-"); i > 0 {
			devs[strings.TrimSuffix(l[:i], "-xdp")] = true
		}
	}
	return fmt.Sprintf("%d device hooks on %d devices, %d socket hooks", devices, len(devs), cgroups)
}

type versionJSON struct {
	Version   string `json:"version"`
	Commit    string `json:"commit,omitempty"`
	Time      string `json:"commitTime,omitempty"`
	Modified  bool   `json:"modified,omitempty"`
	GoVersion string `json:"goVersion"`
	Platform  string `json:"platform"`
}

// cmdVersion reports what the Go toolchain stamped into the binary.
func cmdVersion(fs *pflag.FlagSet, o output) func() error {
	so := &showOptions{}
	addOutputFlag(fs, so)
	return func() error {
		if err := so.check(); err != nil {
			return err
		}
		v := versionJSON{Version: "(unknown)", GoVersion: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
		if bi, ok := debug.ReadBuildInfo(); ok {
			v.Version = bi.Main.Version
			for _, s := range bi.Settings {
				switch s.Key {
				case "vcs.revision":
					v.Commit = s.Value
				case "vcs.time":
					v.Time = s.Value
				case "vcs.modified":
					v.Modified = s.Value == "true"
				}
			}
		}
		if so.structured() {
			return so.write(o.out, v)
		}
		line := "servicepath " + v.Version
		if v.Commit != "" {
			line += " commit " + v.Commit
			if v.Modified {
				line += " (modified)"
			}
		}
		fmt.Fprintf(o.out, "%s, %s %s\n", line, v.GoVersion, v.Platform)
		return nil
	}
}
