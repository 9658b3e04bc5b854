package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/pflag"
	"sigs.k8s.io/yaml"

	"github.com/servicepath/servicepath/datapath/ct"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/metrics"
	"github.com/servicepath/servicepath/datapath/service"
)

// showOptions are the flags of the read-only commands.
type showOptions struct {
	bpffs, format string
}

func addShowFlags(fs *pflag.FlagSet) *showOptions {
	so := &showOptions{}
	fs.StringVar(&so.bpffs, "bpffs", defaultBPFFS, "bpffs directory given to load")
	addOutputFlag(fs, so)
	return so
}

func addOutputFlag(fs *pflag.FlagSet, so *showOptions) {
	fs.StringVarP(&so.format, "output", "o", "table", "output format: table, json or yaml")
}

func (so *showOptions) check() error {
	switch so.format {
	case "table", "json", "yaml":
		return nil
	}
	return usagef("-o %q: want table, json or yaml", so.format)
}

// structured: the output is JSON or YAML, not a table.
func (so *showOptions) structured() bool { return so.format != "table" }

// write prints v as JSON or YAML, with the same field names.
func (so *showOptions) write(w io.Writer, v any) error {
	if so.format == "yaml" {
		b, err := yaml.Marshal(v)
		if err != nil {
			return err
		}
		_, err = w.Write(b)
		return err
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

type serviceJSON struct {
	Name     string `json:"name"`
	PortName string `json:"portName,omitempty"`
	Frontend string `json:"frontend"`
	Kind     string `json:"kind"`
	// InCluster: the entry this node's pods and the host use for an
	// externalTrafficPolicy Local frontend (service.Frontend.InCluster).
	InCluster bool   `json:"inCluster,omitempty"`
	Protocol  string `json:"protocol"`
	// AffinitySeconds is sessionAffinity ClientIP's timeout (0: none).
	AffinitySeconds int           `json:"affinitySeconds,omitempty"`
	Backends        []backendJSON `json:"backends"`
	// North-south options; absent when the defaults.
	ExternalLocal bool     `json:"externalLocal,omitempty"`
	InternalLocal bool     `json:"internalLocal,omitempty"`
	SourceRanges  []string `json:"sourceRanges,omitempty"`
	Maglev        bool     `json:"maglev,omitempty"`
	Mode          string   `json:"mode,omitempty"`
	Dispatch      string   `json:"dispatch,omitempty"`
}

type backendJSON struct {
	ID      uint32 `json:"id"`
	Address string `json:"address"`
	State   string `json:"state"`
}

func cmdServices(fs *pflag.FlagSet, o output) func() error {
	return checked(addShowFlags(fs), func(so *showOptions) error {
		mgr, m, err := openManager(so.bpffs)
		if err != nil {
			return err
		}
		defer m.Close()
		var out []serviceJSON
		for _, s := range mgr.List() {
			sj := serviceJSON{Name: s.Name, PortName: s.PortName, Protocol: s.Frontend.Protocol.String(),
				Frontend: netip.AddrPortFrom(s.Frontend.Addr, s.Frontend.Port).String(), Backends: []backendJSON{},
				Kind:            s.Frontend.Kind.String(),
				AffinitySeconds: int(s.Affinity / time.Second),
				InCluster:       s.Frontend.InCluster,
				ExternalLocal:   s.ExternalLocal, InternalLocal: s.InternalLocal, Maglev: s.Maglev}
			for _, r := range s.SourceRanges {
				sj.SourceRanges = append(sj.SourceRanges, r.String())
			}
			if s.Mode != service.SNAT {
				sj.Mode, sj.Dispatch = s.Mode.String(), s.Dispatch.String()
			}
			for i, b := range s.Backends {
				sj.Backends = append(sj.Backends, backendJSON{ID: s.BackendIDs[i], Address: b.String(), State: b.State.String()})
			}
			out = append(out, sj)
		}
		if so.structured() {
			if out == nil {
				out = []serviceJSON{}
			}
			return so.write(o.out, out)
		}
		tw := tabwriter.NewWriter(o.out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tPORT\tKIND\tFRONTEND\tPROTO\tAFFINITY\tBACKENDS")
		for _, s := range out {
			var bs []string
			for _, b := range s.Backends {
				e := fmt.Sprintf("%s#%d", b.Address, b.ID)
				if b.State != service.Active.String() {
					e += "(" + b.State + ")"
				}
				bs = append(bs, e)
			}
			if len(bs) == 0 {
				bs = []string{"<none>"}
			}
			affinity := "-"
			if s.AffinitySeconds > 0 {
				affinity = fmt.Sprintf("ClientIP %ds", s.AffinitySeconds)
			}
			kind := s.Kind
			if s.InCluster {
				kind += "(in-cluster)"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Name, dash(s.PortName), kind, s.Frontend, s.Protocol, affinity,
				strings.Join(bs, " "))
		}
		return tw.Flush()
	})
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func protoName(p uint8) string { return service.Protocol(p).String() }

func cmdCT(fs *pflag.FlagSet, o output) func() error {
	return checked(addShowFlags(fs), func(so *showOptions) error {
		m, err := maps.OpenPinned(so.bpffs)
		if err != nil {
			return err
		}
		defer m.Close()
		entries, err := ct.DumpZones(m)
		if err != nil {
			return err
		}
		sort.Slice(entries, func(i, j int) bool {
			a, b := entries[i], entries[j]
			if a.Zone != b.Zone {
				return a.Zone < b.Zone
			}
			if a.Source != b.Source {
				return a.Source.Compare(b.Source) < 0
			}
			return a.Service && !b.Service
		})
		if so.structured() {
			if entries == nil {
				entries = []ct.Entry{}
			}
			return so.write(o.out, entries)
		}
		tw := tabwriter.NewWriter(o.out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ZONE\tKIND\tPROTO\tSOURCE\tDESTINATION\tNAT\tSTATE\tEXPIRES\tPKTS(FWD/REV)")
		for _, e := range entries {
			kind := "flow"
			if e.Service {
				kind = "service"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d/%d\n", e.Zone, kind, protoName(e.Protocol), e.Source, e.Dest, e.NAT,
				dash(strings.Join(e.State, ",")), e.ExpiresIn.Round(time.Second), e.FwdPackets, e.RevPackets)
		}
		return tw.Flush()
	})
}

type statsJSON struct {
	Counters map[string]uint64   `json:"counters"`
	Maps     map[string]mapStats `json:"maps"`
	// Conntrack is each zone's pressure (ew and ns, or shared with zones
	// off): fill, expired, orphaned (evictions).
	Conntrack map[string]zonePressure `json:"conntrack"`
}

type mapStats struct {
	Entries    int    `json:"entries"`
	MaxEntries uint32 `json:"maxEntries"`
}

func cmdStats(fs *pflag.FlagSet, o output) func() error {
	return checked(addShowFlags(fs), func(so *showOptions) error {
		m, err := maps.OpenPinned(so.bpffs)
		if err != nil {
			return err
		}
		defer m.Close()
		counters, err := metrics.Read(m.Metrics)
		if err != nil {
			return err
		}
		occ, err := maps.Occupancy(m)
		if err != nil {
			return err
		}
		st := statsJSON{Counters: counters, Maps: map[string]mapStats{}}
		for name, o := range occ {
			st.Maps[name] = mapStats{Entries: o.Entries, MaxEntries: o.MaxEntries}
		}
		if so.structured() {
			if st.Conntrack, err = ctPressureLines(nil, m, counters); err != nil {
				return err
			}
			return so.write(o.out, st)
		}
		tw := tabwriter.NewWriter(o.out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "COUNTER\tPACKETS")
		for _, name := range metrics.Names {
			fmt.Fprintf(tw, "%s\t%d\n", name, counters[name])
		}
		fmt.Fprintln(tw, "\nMAP\tENTRIES\tMAX")
		var names []string
		for name := range st.Maps {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			fmt.Fprintf(tw, "%s\t%d\t%d\n", name, st.Maps[name].Entries, st.Maps[name].MaxEntries)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		_, err = ctPressureLines(o.out, m, counters)
		return err
	})
}
