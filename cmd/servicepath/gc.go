package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/servicepath/servicepath/datapath/ct"
	"github.com/servicepath/servicepath/datapath/maps"
)

func cmdGC(fs *pflag.FlagSet, o output) func() error {
	bpffs := fs.String("bpffs", defaultBPFFS, "bpffs directory given to load")
	interval := fs.Duration("interval", 0, "run passes until interrupted, at most this far apart (0: one pass over the whole map)")
	minInterval := fs.Duration("min-interval", 0, "shortest interval under pressure (default: interval/32, at least 250ms)")
	fixed := fs.Bool("fixed", false, "walk the whole map every interval instead of pacing by pressure")
	return func() error {
		m, err := maps.OpenPinned(*bpffs)
		if err != nil {
			return err
		}
		defer m.Close()

		if *interval <= 0 {
			now, err := ct.Now()
			if err != nil {
				return err
			}
			start := time.Now()
			for _, z := range ct.Zones(m) {
				res, err := ct.NewCollector(z.Map).Pass(now, 0)
				if err != nil {
					return fmt.Errorf("zone %s: %w", z.Name, err)
				}
				fmt.Fprintf(o.out, "gc %s: scanned %d, deleted %d expired entries, %d orphaned\n", z.Name, res.Scanned, res.Deleted, res.Orphans)
			}
			nat, err := ct.GCNAT(m, now)
			if err != nil {
				return err
			}
			fmt.Fprintf(o.out, "gc: %d SNAT entries in %s\n", nat, time.Since(start).Round(time.Microsecond))
			return nil
		}

		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		loop := &ct.Loop{Maps: m, Base: *interval, Min: *minInterval, Fixed: *fixed,
			Report: func(p ct.LoopPass) { writeGCPass(o.out, p) }}
		return loop.Run(ctx)
	}
}

func writeGCPass(w io.Writer, p ct.LoopPass) {
	fill := "?"
	if p.Signals.Fill >= 0 {
		fill = fmt.Sprintf("%.1f%%", 100*p.Signals.Fill)
	}
	budget := "whole map"
	if p.Decision.Budget > 0 {
		budget = fmt.Sprintf("%d entries", p.Decision.Budget)
	}
	why := "calm"
	if p.Decision.Pressure != "" {
		why = "pressure: " + p.Decision.Pressure
	}
	nat := ""
	if p.NorthSouth {
		nat = fmt.Sprintf(", %d SNAT entries", p.NAT)
	}
	fmt.Fprintf(w, "gc %s: scanned %d, deleted %d, orphaned %d%s in %s; fill ~%s, new flows %d, insert failures %d; next in %s over %s (%s)\n",
		p.Zone, p.Result.Scanned, p.Result.Deleted, p.Result.Orphans, nat, p.Took.Round(time.Microsecond), fill, p.Signals.NewFlows,
		p.Signals.CreateFailed, p.Decision.Interval, budget, why)
}

// zonePressure is one zone's line of `servicepath stats -o json`.
type zonePressure struct {
	Map string `json:"map"`
	ct.Pressure
}

// ctPressureLines is `servicepath stats`' conntrack pressure block, one
// per zone.
func ctPressureLines(w io.Writer, m *maps.Maps, counters map[string]uint64) (map[string]zonePressure, error) {
	now, err := ct.Now()
	if err != nil {
		return nil, err
	}
	out := map[string]zonePressure{}
	if w != nil {
		fmt.Fprintf(w, "\nCONNTRACK PRESSURE\n")
		fmt.Fprintf(w, "insert failures %d (ct_create_failed, every zone)\n", counters["ct_create_failed"])
	}
	for _, z := range ct.Zones(m) {
		p, err := ct.ReadPressure(z.Map, now)
		if err != nil {
			return nil, fmt.Errorf("zone %s: %w", z.Name, err)
		}
		out[z.Name] = zonePressure{Map: z.MapName, Pressure: p}
		if w == nil {
			continue
		}
		fmt.Fprintf(w, "\nzone %s (%s)\n", z.Name, z.MapName)
		fmt.Fprintf(w, "fill            %d/%d (%.1f%%)\n", p.Entries, p.MaxEntries, 100*float64(p.Entries)/float64(max(p.MaxEntries, 1)))
		fmt.Fprintf(w, "expired         %d (awaiting gc)\n", p.Expired)
		fmt.Fprintf(w, "orphaned        %d (half a flow evicted by the LRU, or a reused tuple forgotten)\n", p.Orphans)
	}
	return out, nil
}
