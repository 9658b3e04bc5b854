// Package netperf measures TCP between network namespaces the way the
// kernel's and netperf's tools do, with every socket driven by raw
// blocking syscalls from an OS thread pinned to one CPU:
//
//   - CRR: new-connection latency (connect, request, response, close),
//     sequential, like netperf TCP_CRR;
//   - RR: request/response latency on one connection, like netperf TCP_RR;
//   - Stream: one flow of large writes into a receiver that uses
//     TCP_ZEROCOPY_RECEIVE where the path allows it and read() otherwise,
//     like tools/testing/selftests/net/tcp_mmap.c, with CPU time per MB.
//
// Client and server are pinned to the same CPU on purpose: on small VMs a
// wake-up across CPUs adds tens of microseconds at the median and
// milliseconds at the tail, which would swamp what is being measured.
package netperf

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// Doer runs a function on a thread inside a network namespace; topology's
// Node and Pod implement it.
type Doer interface {
	Do(fn func() error) error
}

// Pinned runs fn on a thread inside doer's netns with the thread's CPU
// affinity set to cpu alone, and puts the old affinity back afterwards
// (the thread returns to the Go runtime).
func Pinned(doer Doer, cpu int, fn func() error) error {
	return doer.Do(func() error {
		var old, one unix.CPUSet
		if err := unix.SchedGetaffinity(0, &old); err != nil {
			return fmt.Errorf("sched_getaffinity: %w", err)
		}
		one.Set(cpu)
		if err := unix.SchedSetaffinity(0, &one); err != nil {
			return fmt.Errorf("pin to CPU %d: %w", cpu, err)
		}
		err := fn()
		if rerr := unix.SchedSetaffinity(0, &old); rerr != nil {
			err = errors.Join(err, fmt.Errorf("restore affinity: %w", rerr))
		}
		return err
	})
}

// ioTimeout bounds every blocking socket call, so a broken path fails a
// run instead of hanging it.
const ioTimeout = 5 * time.Second

func setTimeouts(fd int, d time.Duration) error {
	tv := unix.NsecToTimeval(d.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return err
	}
	return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
}

func sockaddr(ap netip.AddrPort) unix.Sockaddr {
	if ap.Addr().Unmap().Is4() {
		return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().Unmap().As4()}
	}
	return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
}

func family(ap netip.AddrPort) int {
	if ap.Addr().Unmap().Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

// dial opens a blocking TCP socket connected to dst.
func dial(dst netip.AddrPort, sa unix.Sockaddr) (int, error) {
	fd, err := unix.Socket(family(dst), unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	if err := setTimeouts(fd, ioTimeout); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("socket timeouts: %w", err)
	}
	err = unix.Connect(fd, sa)
	if err == unix.EINTR {
		// A signal (the Go runtime's preemption) interrupted the wait;
		// the handshake goes on, so wait for it here.
		err = waitConnected(fd)
	}
	if err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("connect %s: %w", dst, err)
	}
	return fd, nil
}

// waitConnected waits for a connect in progress and returns its outcome.
func waitConnected(fd int) error {
	for {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		n, err := unix.Poll(fds, int(ioTimeout.Milliseconds()))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("poll: %w", err)
		}
		if n == 0 {
			return unix.ETIMEDOUT
		}
		break
	}
	v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err != nil {
		return err
	}
	if v != 0 {
		return unix.Errno(v)
	}
	return nil
}

// readFull reads len(p) bytes; io.EOF-like short reads are errors.
func readFull(fd int, p []byte) error {
	for off := 0; off < len(p); {
		n, err := unix.Read(fd, p[off:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("read: %w", err)
		}
		if n == 0 {
			return fmt.Errorf("read: connection closed after %d of %d bytes", off, len(p))
		}
		off += n
	}
	return nil
}

func writeAll(fd int, p []byte) error {
	for off := 0; off < len(p); {
		n, err := unix.Write(fd, p[off:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("write: %w", err)
		}
		off += n
	}
	return nil
}

// threadCPU is the calling thread's user+system CPU time.
func threadCPU() (time.Duration, error) {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		return 0, err
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), nil
}
