package coexist

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// KubeProxyPorts are kube-proxy's default healthz and metrics ports.
var KubeProxyPorts = []uint16{10256, 10249}

const tcpListen = 10 // TCP_LISTEN in the kernel's socket states

// findListeners reports TCP listeners of this netns on ports held by
// another process, with that process when it is visible in our PID
// namespace.
func findListeners(ports []uint16) ([]Finding, error) {
	var found []Finding
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		socks, err := netlink.SocketDiagTCP(family)
		if err != nil {
			return nil, fmt.Errorf("list TCP sockets: %w", err)
		}
		for _, s := range socks {
			if s.State != tcpListen || !slices.Contains(ports, s.ID.SourcePort) {
				continue
			}
			pid := socketOwner(s.INode)
			if pid == os.Getpid() {
				continue // ours
			}
			owner := "a process outside this PID namespace"
			if pid > 0 {
				owner = fmt.Sprintf("pid %d%s", pid, comm(pid))
			}
			addr := net.JoinHostPort(s.ID.Source.String(), strconv.Itoa(int(s.ID.SourcePort)))
			found = append(found, Finding{What: "a listener on a kube-proxy port",
				Where: fmt.Sprintf("TCP %s is listened on by %s", addr, owner)})
		}
	}
	return found, nil
}

// socketOwner finds the process with a descriptor on socket inode ino;
// 0 if none is visible.
func socketOwner(ino uint32) int {
	want := fmt.Sprintf("socket:[%d]", ino)
	fds, _ := filepath.Glob("/proc/[0-9]*/fd/*")
	for _, fd := range fds {
		if l, err := os.Readlink(fd); err == nil && l == want {
			pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(fd))))
			return pid
		}
	}
	return 0
}
