package bandwidth

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrNoBBR is a kernel without BBR (tcp_bbr, CONFIG_TCP_CONG_BBR).
var ErrNoBBR = fmt.Errorf("the kernel has no BBR congestion control (tcp_bbr, CONFIG_TCP_CONG_BBR): %w", errors.ErrUnsupported)

// congestionControl is the caller's netns' default TCP congestion control.
const congestionControl = "/proc/sys/net/ipv4/tcp_congestion_control"

// EnableBBR makes BBR the default TCP congestion control of the caller's
// netns (Cilium's bandwidthManager.bbr). A netns created later starts with
// the default of the host's, so pods started after this on a node whose
// agent runs in the host netns use BBR; running pods keep theirs. BBR paces
// its flows, which suits EDT, and keeps queues in fq short. The kernel
// loads tcp_bbr itself when the agent may (CAP_NET_ADMIN).
func EnableBBR() error {
	err := os.WriteFile(congestionControl, []byte("bbr"), 0)
	if errors.Is(err, unix.ENOENT) {
		return ErrNoBBR
	}
	if errors.Is(err, unix.EPERM) {
		return fmt.Errorf("bbr as the default congestion control: only the host netns may choose it, "+
			"unless net.ipv4.tcp_allowed_congestion_control lists it: %w", err)
	}
	if err != nil {
		return fmt.Errorf("bbr as the default congestion control: %w", err)
	}
	return nil
}

// CongestionControl is the caller's netns' default TCP congestion control.
func CongestionControl() (string, error) {
	b, err := os.ReadFile(congestionControl)
	return strings.TrimSpace(string(b)), err
}
