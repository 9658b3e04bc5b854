package loader

// One object per attach point; the generated files are committed so that
// building servicepath needs no clang. `make generate` reruns this.
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I../../bpf/include" -target bpfel -no-global-types Lxc ../../bpf/bpf_lxc.c
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I../../bpf/include" -target bpfel -no-global-types Sock ../../bpf/bpf_sock.c
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I../../bpf/include" -target bpfel -no-global-types SockDestroy ../../bpf/bpf_sock_destroy.c
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I../../bpf/include" -target bpfel -no-global-types Host ../../bpf/bpf_host.c
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I../../bpf/include" -target bpfel -no-global-types Xdp ../../bpf/bpf_xdp.c
