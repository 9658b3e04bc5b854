package nodeport

import (
	"bytes"
	"errors"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/packet"
	"github.com/servicepath/servicepath/harness/testenv"
)

// Two CPUs see a new UDP flow's first datagram at once (a client's
// burst spread over receive queues): both must send it to the same
// backend from the same SNAT port, as the first CPU to write the flow
// chose. Each CPU runs the same datagrams in step, one new flow each.
func TestNewUDPFlowOnTwoCPUsAtOnce(t *testing.T) {
	testenv.RequireRoot(t)
	if runtime.NumCPU() < 2 {
		t.Skip("needs two CPUs")
	}
	b := NewBed(t)
	dev := b.wire()
	f := b.Families()[0]
	e := gcEnv(t, b, dev)
	// Addresses on the second node's pod network, routed over the wire.
	var backends []netip.Addr
	for a, i := f.Remote, 0; i < 8; a, i = a.Next(), i+1 {
		backends = append(backends, a)
	}
	require.NoError(t, inject.Upsert(f.nodePortSvc(service.UDP, backends))(e), "a UDP NodePort over remote backends")

	const flows = 4000
	var arrived atomic.Int64
	var failed atomic.Bool
	var outs [2][][]byte
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for cpu := range 2 {
		outs[cpu] = make([][]byte, flows)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[cpu] = dev.Do(func() error {
				var orig, one unix.CPUSet
				if err := unix.SchedGetaffinity(0, &orig); err != nil {
					return err
				}
				one.Set(cpu)
				if err := unix.SchedSetaffinity(0, &one); err != nil {
					return err
				}
				defer unix.SchedSetaffinity(0, &orig)
				for i := range flows {
					pkt := udp(netip.AddrPortFrom(f.Client.Addr(), uint16(1024+i)), f.nodePort(), packet.Opts{})
					// Both CPUs start each datagram together.
					arrived.Add(1)
					for arrived.Load() < int64(2*(i+1)) {
						if failed.Load() {
							return errors.New("the other CPU failed")
						}
					}
					o, err := e.RunHere(dev, inject.FromNetdev, pkt)
					if err != nil {
						failed.Store(true)
						return err
					}
					outs[cpu][i] = o.Packet
				}
				return nil
			})
		}()
	}
	wg.Wait()
	require.NoError(t, errors.Join(errs...), "run the datagrams on two CPUs")
	differ := 0
	for i := range flows {
		if !bytes.Equal(outs[0][i], outs[1][i]) {
			differ++
			if differ < 3 {
				t.Logf("%d:\n%x\n%x", i, outs[0][i], outs[1][i])
			}
		}
	}
	assert.Zero(t, differ, "of %d flows, none left two CPUs for different backends or SNAT ports", flows)
}
