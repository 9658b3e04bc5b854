// Package socklb holds the end-to-end tests of socket-level load balancing
// (bpf/bpf_sock.c): cgroup connect, sendmsg, recvmsg and getpeername hooks
// translating Service addresses once, at the socket.
package socklb
