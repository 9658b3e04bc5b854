package netperf

import (
	"fmt"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// Latencies is a run of timed transactions.
type Latencies struct {
	// Samples are per-transaction times, in order.
	Samples []time.Duration
	// Elapsed is the whole run, warm-up excluded; len(Samples)/Elapsed is
	// the rate.
	Elapsed time.Duration
}

// PerSecond is transactions per second over the run.
func (l Latencies) PerSecond() float64 {
	if l.Elapsed <= 0 {
		return 0
	}
	return float64(len(l.Samples)) / l.Elapsed.Seconds()
}

// CRROptions describe a new-connection latency run.
type CRROptions struct {
	CPU int
	// Size is the request and the response, in bytes (64 if zero).
	Size int
	// Warmup transactions are run first and not recorded.
	Warmup, N int
}

// RunCRR runs sequential transactions from a pinned thread in doer's
// netns against a CRR server at dst: socket, connect, write the request,
// read the response, read the server's close, close. Each sample spans
// socket() to close().
func RunCRR(doer Doer, dst netip.AddrPort, o CRROptions) (Latencies, error) {
	size := o.Size
	if size == 0 {
		size = 64
	}
	var out Latencies
	out.Samples = make([]time.Duration, 0, o.N)
	err := Pinned(doer, o.CPU, func() error {
		req, resp := make([]byte, size), make([]byte, size)
		for i := range req {
			req[i] = byte(i)
		}
		sa := sockaddr(dst)
		var start time.Time
		for i := range o.Warmup + o.N {
			if i == o.Warmup {
				start = time.Now()
			}
			t0 := time.Now()
			if err := crrOnce(dst, sa, req, resp); err != nil {
				return fmt.Errorf("transaction %d: %w", i, err)
			}
			if i >= o.Warmup {
				out.Samples = append(out.Samples, time.Since(t0))
			}
		}
		out.Elapsed = time.Since(start)
		return nil
	})
	return out, err
}

func crrOnce(dst netip.AddrPort, sa unix.Sockaddr, req, resp []byte) error {
	fd, err := dial(dst, sa)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := writeAll(fd, req); err != nil {
		return err
	}
	if err := readFull(fd, resp); err != nil {
		return err
	}
	// The server closes first; waiting for its FIN keeps TIME_WAIT off
	// the client.
	var one [1]byte
	for {
		n, err := unix.Read(fd, one[:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("read close: %w", err)
		}
		if n == 0 {
			return nil
		}
	}
}

// RROptions describe a request/response run on one connection.
type RROptions struct {
	CPU int
	// Size is the request and the response, in bytes (1 if zero, as
	// netperf TCP_RR).
	Size      int
	Warmup, N int
}

// RunRR connects once to an RR server at dst and times N sequential
// request/response pairs.
func RunRR(doer Doer, dst netip.AddrPort, o RROptions) (Latencies, error) {
	size := o.Size
	if size == 0 {
		size = 1
	}
	var out Latencies
	out.Samples = make([]time.Duration, 0, o.N)
	err := Pinned(doer, o.CPU, func() error {
		fd, err := dial(dst, sockaddr(dst))
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
			return err
		}
		buf := make([]byte, size)
		var start time.Time
		for i := range o.Warmup + o.N {
			if i == o.Warmup {
				start = time.Now()
			}
			t0 := time.Now()
			if err := writeAll(fd, buf); err != nil {
				return err
			}
			if err := readFull(fd, buf); err != nil {
				return err
			}
			if i >= o.Warmup {
				out.Samples = append(out.Samples, time.Since(t0))
			}
		}
		out.Elapsed = time.Since(start)
		return nil
	})
	return out, err
}
