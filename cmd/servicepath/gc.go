package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/servicepath/servicepath/datapath/ct"
	"github.com/servicepath/servicepath/datapath/maps"
)

func cmdGC(args []string, o output) error {
	fs := newFlags("gc", o)
	bpffs := fs.String("bpffs", defaultBPFFS, "bpffs directory given to load")
	interval := fs.Duration("interval", 0, "run a pass every interval until interrupted (0: one pass)")
	if err := parse(fs, args); err != nil {
		return err
	}
	m, err := maps.OpenPinned(*bpffs)
	if err != nil {
		return err
	}
	defer m.Close()

	pass := func() error {
		now, err := ct.Now()
		if err != nil {
			return err
		}
		start := time.Now()
		res, err := ct.GC(m.CT, now)
		if err != nil {
			return err
		}
		fmt.Fprintf(o.out, "gc: scanned %d, deleted %d expired entries in %s\n", res.Scanned, res.Deleted, time.Since(start).Round(time.Microsecond))
		return nil
	}
	if *interval <= 0 {
		return pass()
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	tick := time.NewTicker(*interval)
	defer tick.Stop()
	for {
		if err := pass(); err != nil {
			return err
		}
		select {
		case <-stop:
			return nil
		case <-tick.C:
		}
	}
}
