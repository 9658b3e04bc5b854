package main

import (
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/servicepath/servicepath/datapath/ct"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/metrics"
)

func cmdGC(args []string, o output) error {
	fs := newFlags("gc", o)
	bpffs := fs.String("bpffs", defaultBPFFS, "bpffs directory given to load")
	interval := fs.Duration("interval", 0, "run passes until interrupted, at most this far apart (0: one pass over the whole map)")
	minInterval := fs.Duration("min-interval", 0, "shortest interval under pressure (default: interval/32, at least 250ms)")
	fixed := fs.Bool("fixed", false, "walk the whole map every interval instead of pacing by pressure")
	if err := parse(fs, args); err != nil {
		return err
	}
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
		res, err := ct.NewCollector(m.CT).Pass(now, 0)
		if err != nil {
			return err
		}
		fmt.Fprintf(o.out, "gc: scanned %d, deleted %d expired entries, %d orphaned in %s\n",
			res.Scanned, res.Deleted, res.Orphans, time.Since(start).Round(time.Microsecond))
		return nil
	}

	pacer := ct.DefaultPacer(*interval)
	if *minInterval > 0 {
		pacer.Min = *minInterval
	}
	c := ct.NewCollector(m.CT)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	prev, err := metrics.Read(m.Metrics)
	if err != nil {
		return err
	}
	d := ct.Decision{Interval: *interval} // the first pass reads the whole map
	for {
		now, err := ct.Now()
		if err != nil {
			return err
		}
		start := time.Now()
		res, err := c.Pass(now, d.Budget)
		if err != nil {
			return err
		}
		took := time.Since(start)
		cur, err := metrics.Read(m.Metrics)
		if err != nil {
			return err
		}
		sig := pressureSignals(c, prev, cur, int(m.CT.MaxEntries()), res)
		prev = cur
		if *fixed {
			d = ct.Decision{Interval: *interval}
		} else {
			d = pacer.Next(sig)
		}
		writeGCPass(o.out, res, sig, d, took)
		select {
		case <-stop:
			return nil
		case <-time.After(d.Interval):
		}
	}
}

// pressureSignals turns two counter readings and a pass into the pacer's
// input.
func pressureSignals(c *ct.Collector, prev, cur map[string]uint64, maxEntries int, res ct.PassResult) ct.Signals {
	s := ct.Signals{
		NewFlows:     cur["lb_new"] - prev["lb_new"],
		CreateFailed: cur["ct_create_failed"] - prev["ct_create_failed"],
		MaxEntries:   maxEntries,
		Last:         res,
		Fill:         -1,
	}
	if e := c.Estimate(0); e >= 0 && maxEntries > 0 {
		s.Fill = float64(e) / float64(maxEntries)
	}
	return s
}

func writeGCPass(w io.Writer, res ct.PassResult, s ct.Signals, d ct.Decision, took time.Duration) {
	fill := "?"
	if s.Fill >= 0 {
		fill = fmt.Sprintf("%.1f%%", 100*s.Fill)
	}
	budget := "whole map"
	if d.Budget > 0 {
		budget = fmt.Sprintf("%d entries", d.Budget)
	}
	why := "calm"
	if d.Pressure != "" {
		why = "pressure: " + d.Pressure
	}
	fmt.Fprintf(w, "gc: scanned %d, deleted %d, orphaned %d in %s; fill ~%s, new flows %d, insert failures %d; next in %s over %s (%s)\n",
		res.Scanned, res.Deleted, res.Orphans, took.Round(time.Microsecond), fill, s.NewFlows, s.CreateFailed,
		d.Interval, budget, why)
}

// ctPressureLines is `servicepath stats`' conntrack pressure block.
func ctPressureLines(w io.Writer, m *maps.Maps, counters map[string]uint64) (ct.Pressure, error) {
	now, err := ct.Now()
	if err != nil {
		return ct.Pressure{}, err
	}
	p, err := ct.ReadPressure(m.CT, now)
	if err != nil {
		return p, err
	}
	if w != nil {
		fmt.Fprintf(w, "\nCONNTRACK PRESSURE\n")
		fmt.Fprintf(w, "fill            %d/%d (%.1f%%)\n", p.Entries, p.MaxEntries, 100*float64(p.Entries)/float64(max(p.MaxEntries, 1)))
		fmt.Fprintf(w, "expired         %d (awaiting gc)\n", p.Expired)
		fmt.Fprintf(w, "orphaned        %d (half a flow evicted by the LRU, or a reused tuple forgotten)\n", p.Orphans)
		fmt.Fprintf(w, "insert failures %d (ct_create_failed)\n", counters["ct_create_failed"])
	}
	return p, nil
}
