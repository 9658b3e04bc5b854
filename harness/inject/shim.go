package inject

import (
	"fmt"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// queueShim runs a tc program with skb->queue_mapping set, which
// BPF_PROG_TEST_RUN refuses to take from the context (net/bpf/test_run.c
// wants it zero): it moves the value from cb[0] into queue_mapping, clears
// cb[0] and tail-calls the program.
type queueShim struct {
	prog  *ebpf.Program
	array *ebpf.Map
}

// Offsets in struct __sk_buff.
const (
	skbQueueMappingOff = int16(unsafe.Offsetof(skbContext{}.Head) + 3*4)
	skbCB0Off          = int16(unsafe.Offsetof(skbContext{}.CB))
)

func (e *Env) queueShim(h Hook, target *ebpf.Program) (*ebpf.Program, error) {
	if s, ok := e.shims[h]; ok {
		return s.prog, nil
	}
	array, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.ProgramArray, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		return nil, fmt.Errorf("queue_mapping shim: %w", err)
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:    "sp_queue_shim",
		Type:    ebpf.SchedCLS,
		License: "GPL",
		Instructions: asm.Instructions{
			asm.LoadMem(asm.R2, asm.R1, skbCB0Off, asm.Word),
			asm.StoreMem(asm.R1, skbQueueMappingOff, asm.R2, asm.Word),
			// A register store: older kernels (5.10) refuse BPF_ST into
			// the context.
			asm.Mov.Imm(asm.R3, 0),
			asm.StoreMem(asm.R1, skbCB0Off, asm.R3, asm.Word),
			asm.LoadMapPtr(asm.R2, array.FD()),
			asm.Mov.Imm(asm.R3, 0),
			asm.FnTailCall.Call(),
			// Only if the tail call failed: TC_ACT_UNSPEC, which no
			// fixture expects.
			asm.Mov.Imm(asm.R0, -1),
			asm.Return(),
		},
	})
	if err != nil {
		array.Close()
		return nil, fmt.Errorf("queue_mapping shim: %w", err)
	}
	if err := array.Put(uint32(0), target); err != nil {
		prog.Close()
		array.Close()
		return nil, fmt.Errorf("queue_mapping shim: tail call to %s: %w", h, err)
	}
	if e.shims == nil {
		e.shims = map[Hook]*queueShim{}
	}
	e.shims[h] = &queueShim{prog: prog, array: array}
	return prog, nil
}

func (s *queueShim) close() {
	s.prog.Close()
	s.array.Close()
}
