package netperf

import (
	"fmt"
	"net/netip"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// StreamOptions describe a single-flow throughput run.
type StreamOptions struct {
	CPU int
	// WriteSize is each write(), 512 KiB if zero (tcp_mmap's chunk).
	WriteSize int
	Duration  time.Duration
}

// SinkResult is what the receiver saw of one stream.
type SinkResult struct {
	Bytes int64
	// Mapped bytes came through TCP_ZEROCOPY_RECEIVE, Copied through read().
	Mapped, Copied int64
	// Receive says how data was received: "zerocopy", "zerocopy+read"
	// (some of each), or "read" with the reason zero-copy was not used.
	Receive string
	// Elapsed is accept to end of stream.
	Elapsed time.Duration
	// CPU is the receiving thread's user+system time.
	CPU time.Duration
	Err error
}

// StreamResult is one stream run.
type StreamResult struct {
	Sink SinkResult
	// SenderCPU is the sending thread's user+system time.
	SenderCPU time.Duration
}

// Gbps is the receiver's goodput.
func (r StreamResult) Gbps() float64 {
	if r.Sink.Elapsed <= 0 {
		return 0
	}
	return float64(r.Sink.Bytes) * 8 / r.Sink.Elapsed.Seconds() / 1e9
}

// CPUMicrosPerMB is sender plus receiver CPU time per MB (1e6 bytes)
// delivered. With both threads on one CPU the softirq work of the path is
// charged to them too.
func (r StreamResult) CPUMicrosPerMB() float64 {
	if r.Sink.Bytes == 0 {
		return 0
	}
	return float64((r.SenderCPU + r.Sink.CPU).Microseconds()) / (float64(r.Sink.Bytes) / 1e6)
}

// RunStream sends one flow of large writes for o.Duration from a pinned
// thread in doer's netns to a Sink server srv reachable at dst, and
// returns what both ends measured.
func RunStream(doer Doer, srv *Server, dst netip.AddrPort, o StreamOptions) (StreamResult, error) {
	if srv.mode != Sink {
		return StreamResult{}, fmt.Errorf("server is not a sink")
	}
	size := o.WriteSize
	if size == 0 {
		size = 512 << 10
	}
	var res StreamResult
	err := Pinned(doer, o.CPU, func() error {
		buf := make([]byte, size)
		for i := range buf {
			buf[i] = byte(i * 7)
		}
		fd, err := dial(dst, sockaddr(dst))
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		cpu0, err := threadCPU()
		if err != nil {
			return err
		}
		deadline := time.Now().Add(o.Duration)
		for time.Now().Before(deadline) {
			if err := writeAll(fd, buf); err != nil {
				return err
			}
		}
		if err := unix.Shutdown(fd, unix.SHUT_WR); err != nil {
			return err
		}
		// Wait for the receiver to drain and close, so its numbers are final.
		var one [1]byte
		for {
			n, err := unix.Read(fd, one[:])
			if err == unix.EINTR {
				continue
			}
			if err != nil || n == 0 {
				break
			}
		}
		cpu1, err := threadCPU()
		res.SenderCPU = cpu1 - cpu0
		return err
	})
	if err != nil {
		return res, err
	}
	select {
	case res.Sink = <-srv.sinks:
	case <-time.After(2 * ioTimeout):
		return res, fmt.Errorf("no result from the receiver")
	}
	return res, res.Sink.Err
}

// tcpZerocopyReceive is struct tcp_zerocopy_receive (linux/tcp.h).
type tcpZerocopyReceive struct {
	Address        uint64
	Length         uint32
	RecvSkipHint   uint32
	Inq            uint32
	Err            int32
	CopybufAddress uint64
	CopybufLen     int32
	Flags          uint32
	MsgControl     uint64
	MsgControllen  uint64
	MsgFlags       uint32
	Reserved       uint32
}

// zcChunk is the receive mapping, tcp_mmap's default chunk size.
const zcChunk = 512 << 10

// sink receives until end of stream. It maps a window of the socket and
// asks TCP_ZEROCOPY_RECEIVE to map received pages into it; bytes the
// kernel cannot map (recv_skip_hint, or everything when the path's skbs
// do not hold page-aligned payload) are read() instead, as tcp_mmap does.
func sink(fd int) SinkResult {
	var r SinkResult
	start := time.Now()
	cpu0, _ := threadCPU()
	buf := make([]byte, zcChunk)
	zc := true
	why := ""
	area, err := unix.Mmap(fd, 0, zcChunk, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		zc, why = false, fmt.Sprintf("mmap of the socket: %v", err)
	} else {
		defer unix.Munmap(area)
	}
	for {
		if zc {
			z := tcpZerocopyReceive{Address: uint64(uintptr(unsafe.Pointer(&area[0]))), Length: zcChunk}
			l := uint32(unsafe.Sizeof(z))
			_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.IPPROTO_TCP, unix.TCP_ZEROCOPY_RECEIVE,
				uintptr(unsafe.Pointer(&z)), uintptr(unsafe.Pointer(&l)), 0)
			if errno == unix.EIO {
				// The kernel's way of saying: no data left and the
				// peer has closed.
				break
			}
			if errno != 0 {
				zc, why = false, fmt.Sprintf("TCP_ZEROCOPY_RECEIVE: %v", errno)
				continue
			}
			r.Mapped += int64(z.Length)
			if z.RecvSkipHint > 0 {
				n, err := unix.Read(fd, buf[:min(int(z.RecvSkipHint), len(buf))])
				if err != nil && err != unix.EINTR {
					r.Err = fmt.Errorf("read: %w", err)
					break
				}
				r.Copied += int64(max(n, 0))
				continue
			}
			if z.Length > 0 {
				continue
			}
		}
		n, err := unix.Read(fd, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			r.Err = fmt.Errorf("read: %w", err)
			break
		}
		if n == 0 {
			break
		}
		r.Copied += int64(n)
	}
	r.Elapsed = time.Since(start)
	cpu1, _ := threadCPU()
	r.CPU = cpu1 - cpu0
	r.Bytes = r.Mapped + r.Copied
	switch {
	case r.Mapped > 0 && r.Copied > 0:
		r.Receive = "zerocopy+read"
	case r.Mapped > 0:
		r.Receive = "zerocopy"
	case why != "":
		r.Receive = "read (" + why + ")"
	default:
		r.Receive = "read (TCP_ZEROCOPY_RECEIVE mapped nothing on this path)"
	}
	return r
}
