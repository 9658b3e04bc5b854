package loader

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"
)

// SockState is where the socket hooks keep the reverse translation of the
// flows they translate, which recvmsg and getpeername read back and
// socket destroy matches on (scenarios/README.md, section 4).
type SockState string

const (
	// SockStateMap keeps it in sp_sock_revnat, an LRU keyed by socket
	// cookie and backend: any kernel, but a full LRU evicts live sockets'
	// entries and closed sockets' entries linger until evicted. The
	// default ("" means map).
	SockStateMap SockState = "map"
	// SockStateStorage keeps it in the socket's own BPF storage
	// (sp_sock_ctx), freed with the socket: no capacity, no eviction. It
	// needs bpf_sk_storage_get in cgroup sock_addr programs.
	SockStateStorage SockState = "storage"
	// SockStateAuto is storage where the kernel has it, else the map.
	SockStateAuto SockState = "auto"
)

// ParseSockState reads the CLI spelling.
func ParseSockState(s string) (SockState, error) {
	switch m := SockState(s); m {
	case SockStateMap, SockStateStorage, SockStateAuto:
		return m, nil
	}
	return "", fmt.Errorf("socket state %q: want map, storage or auto", s)
}

func (m SockState) valid() bool {
	switch m {
	case "", SockStateMap, SockStateStorage, SockStateAuto:
		return true
	}
	return false
}

// SockStateMinKernel is a release that lets cgroup sock_addr programs use
// socket storage: the matrix's oldest, 5.10, does. Tests apply the matrix
// policy with it: a newer kernel without it fails.
const SockStateMinKernel = "5.10"

// ProbeSockStorage reports whether socket-storage mode can work: a
// BPF_MAP_TYPE_SK_STORAGE map, and a cgroup/connect4 program that calls
// bpf_sk_storage_get on ctx->sk, the way bpf_sock.c does. An error wrapping
// ebpf.ErrNotSupported when the kernel lacks either.
func ProbeSockStorage() error {
	m, err := ebpf.NewMap(&ebpf.MapSpec{
		Type:      ebpf.SkStorage,
		KeySize:   4,
		ValueSize: 8,
		Flags:     unix.BPF_F_NO_PREALLOC,
		Key:       &btf.Int{Name: "int", Size: 4, Encoding: btf.Signed},
		Value:     &btf.Int{Name: "long long", Size: 8, Encoding: btf.Signed},
	})
	if errors.Is(err, unix.EINVAL) {
		err = fmt.Errorf("%w: %v", ebpf.ErrNotSupported, err)
	}
	if err != nil {
		return fmt.Errorf("socket storage map: %w", err)
	}
	defer m.Close()

	// offsetof(struct bpf_sock_addr, sk): 16 __u32 fields, then the pointer.
	const skOffset = 64
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:       ebpf.CGroupSockAddr,
		AttachType: ebpf.AttachCGroupInet4Connect,
		License:    "GPL",
		Instructions: asm.Instructions{
			asm.LoadMem(asm.R2, asm.R1, skOffset, asm.DWord),
			asm.LoadMapPtr(asm.R1, m.FD()),
			asm.Mov.Imm(asm.R3, 0),
			asm.Mov.Imm(asm.R4, 0),
			asm.FnSkStorageGet.Call(),
			asm.Mov.Imm(asm.R0, 1),
			asm.Return(),
		},
	})
	var ve *ebpf.VerifierError
	switch {
	case err == nil:
		return prog.Close()
	case errors.As(err, &ve) || errors.Is(err, unix.EINVAL):
		return fmt.Errorf("bpf_sk_storage_get in cgroup sock_addr programs: %w (%v)", ebpf.ErrNotSupported, err)
	}
	return fmt.Errorf("probe bpf_sk_storage_get in cgroup sock_addr programs: %w", err)
}

// sockState resolves the configured mode against the kernel, given what
// ProbeSockStorage said. Asking for storage where the kernel cannot is an
// error; auto falls back to the map.
func (c Config) sockState(storage error) (SockState, error) {
	switch {
	case c.SockState == "" || c.SockState == SockStateMap:
		return SockStateMap, nil
	case storage == nil:
		return SockStateStorage, nil
	case c.SockState == SockStateAuto && errors.Is(storage, ebpf.ErrNotSupported):
		return SockStateMap, nil
	}
	return "", fmt.Errorf("socket state %s: %w", c.SockState, storage)
}

// ResolveSockState is the mode a Load with c would use.
func (c Config) ResolveSockState() (SockState, error) { return c.sockState(ProbeSockStorage()) }

func (m SockState) knob() uint32 {
	if m == SockStateStorage {
		return 1
	}
	return 0
}
