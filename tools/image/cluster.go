package image

import (
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// Tags of the images, as their users name them. The e2e tags are those of
// Kubernetes v1.34.10's test/utils/image/manifest.go; the DaemonSet in
// deploy/ names ServicepathTag with imagePullPolicy: Never.
const (
	ServicepathTag   = "localhost/servicepath/servicepath:v0.0.0-dev"
	AgnhostTag       = "registry.k8s.io/e2e-test-images/agnhost:2.56"
	BusyBoxTag       = "registry.k8s.io/e2e-test-images/busybox:1.37.0-1"
	JessieDnsutilTag = "registry.k8s.io/e2e-test-images/jessie-dnsutils:1.7"
	NginxTag         = "registry.k8s.io/e2e-test-images/nginx:1.14-4"
	// PauseTag is both e2e's Pause image and the sandbox image of
	// kubeadm 1.34; containerd 1.6 defaults to pause:3.6, so its config
	// must name this one (sandbox_image).
	PauseTag = "registry.k8s.io/pause:3.10.1"
)

// iptablesCommands are the programs datapath/coexist runs to find and
// remove kube-proxy's rules (iptables-save and -restore of both backends
// and families, as kube-proxy uses them); kubelet's own chains put tables
// in every node's netns, so the agent runs them on every start.
var iptablesCommands = []string{
	"iptables-legacy-save", "iptables-legacy-restore", "ip6tables-legacy-save", "ip6tables-legacy-restore",
	"iptables-nft-save", "iptables-nft-restore", "ip6tables-nft-save", "ip6tables-nft-restore",
}

// xtablesPlugins is where Debian's iptables keeps the match and target
// extensions it loads to read and write rules: /usr/lib/<multiarch>/xtables.
const xtablesPlugins = "/usr/lib/*-linux-gnu/xtables"

// Servicepath is the agent's image: the static servicepath binary at
// /servicepath, and Debian's iptables (its commands, libraries and
// extensions), which the binary runs to coexist with kube-proxy.
func Servicepath(bin string) (Spec, error) {
	if dyn, err := dynamic(bin); err != nil {
		return Spec{}, err
	} else if dyn {
		return Spec{}, fmt.Errorf("%s is dynamically linked: build it with CGO_ENABLED=0", bin)
	}
	files, err := Program(bin, "/servicepath")
	if err != nil {
		return Spec{}, err
	}
	cmds, err := Commands("/usr/sbin", "iptables", iptablesCommands...)
	if err != nil {
		return Spec{}, err
	}
	plugins, err := Plugins(xtablesPlugins+"/*.so", "iptables")
	if err != nil {
		return Spec{}, err
	}
	files = append(files, cmds...)
	files = append(files, plugins...)
	// iptables-restore -w locks /run/xtables.lock; a pod must mount the
	// node's there to exclude kubelet's and kube-proxy's runs.
	files = append(files, File{Path: "/run", Mode: fs.ModeDir | 0o755})
	return Spec{Tag: ServicepathTag, Files: files, Entrypoint: []string{"/servicepath"}}, nil
}

// dynamic says bin is an ELF program naming a program interpreter: it is
// dynamically linked. Read from its ELF headers, so no ldd is needed to
// refuse it (a script is not ELF, and not refused).
func dynamic(bin string) (bool, error) {
	f, err := elf.Open(bin)
	var notELF *elf.FormatError
	if errors.As(err, &notELF) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read %s: %w", bin, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return true, nil
		}
	}
	return false, nil
}

// ClusterOptions says where the programs of the cluster images come from.
type ClusterOptions struct {
	// Agnhost is an agnhost binary built from k8s.io/kubernetes
	// test/images/agnhost, AgnhostSource that directory (for porter's
	// TLS certificate and key, which its image carries).
	Agnhost       string
	AgnhostSource string
	// BusyBox is a busybox binary (Debian's busybox-static:
	// /bin/busybox). It is the BusyBox image and the shell and
	// utilities of the others, as Alpine's busybox is upstream's.
	BusyBox string
	// NginxRoot is where Debian's nginx and nginx-common are unpacked
	// (tools/image/debs.sh nginx nginx-common); empty: no nginx image.
	NginxRoot string
}

// shell is /bin/sh of the cluster images. Not busybox's: Debian builds
// busybox-static to run its own applets before any program on PATH, so
// its sh would run busybox's nc and ip in place of the real ones.
var shell = Tool{"dash", "/bin/sh", "dash"}

// agnhostTools are what upstream's agnhost Dockerfile installs from
// Alpine (bind-tools, curl, netcat-openbsd, iproute2, bash), and getent,
// which Alpine's base has, taken from Debian. Tests run them in agnhost
// pods: curl and nc against services, dig, nslookup and getent in the DNS
// tests, ip and ss on nodes.
var agnhostTools = []Tool{
	shell,
	{"curl", "/usr/bin/curl", "curl"},
	// Debian's busybox-static 1.35 wget segfaults with -T, which e2e's
	// service reachability checks pass ("wget -q -O - -T 1").
	{"wget", "/usr/bin/wget", "wget"},
	{"nc.openbsd", "/usr/bin/nc", "netcat-openbsd"},
	{"dig", "/usr/bin/dig", "bind9-dnsutils"},
	{"nslookup", "/usr/bin/nslookup", "bind9-dnsutils"},
	{"host", "/usr/bin/host", "bind9-host"},
	{"ip", "/sbin/ip", "iproute2"},
	{"ss", "/usr/bin/ss", "iproute2"},
	{"bash", "/bin/bash", "bash"},
	{"getent", "/usr/bin/getent", "libc-bin"},
}

// jessieTools are what the jessie-dnsutils image's DNS probes run besides
// busybox's seq: Debian's shell (dash, as in jessie), dig (dnsutils
// upstream, from jessie; here from this machine's Debian) and getent.
var jessieTools = []Tool{
	shell,
	{"dig", "/usr/bin/dig", "bind9-dnsutils"},
	{"nslookup", "/usr/bin/nslookup", "bind9-dnsutils"},
	{"getent", "/usr/bin/getent", "libc-bin"},
}

// etcFiles are the account and resolver files every cluster image has.
// agnhost's user and group are those its Dockerfile adds for the
// SupplementalGroups test.
func etcFiles(users, groups string) []File {
	return []File{
		{Path: "/etc/passwd", Mode: 0o644, Data: []byte("root:x:0:0:root:/root:/bin/sh\n" + users +
			"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")},
		{Path: "/etc/group", Mode: 0o644, Data: []byte("root:x:0:\n" + groups + "nogroup:x:65534:\n")},
		{Path: "/etc/nsswitch.conf", Mode: 0o644, Data: []byte("hosts: files dns\n")},
		// kubelet mounts its own; this one is for a container run without.
		{Path: "/etc/hosts", Mode: 0o644, Data: []byte("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")},
		{Path: "/tmp", Mode: fs.ModeDir | fs.ModeSticky | 0o777},
	}
}

// ClusterSpecs are the images the e2e suite's Services and sig-network
// Conformance tests run, each the upstream image's files rebuilt from
// local programs.
func ClusterSpecs(o ClusterOptions) ([]Spec, error) {
	if o.Agnhost == "" || o.AgnhostSource == "" || o.BusyBox == "" {
		return nil, errors.New("cluster images: Agnhost, AgnhostSource and BusyBox are all needed")
	}
	agnhost, err := Program(o.Agnhost, "/agnhost")
	if err != nil {
		return nil, err
	}
	var porter []File
	for _, f := range []string{"localhost.crt", "localhost.key"} {
		data, err := os.ReadFile(filepath.Join(o.AgnhostSource, "porter", f))
		if err != nil {
			return nil, fmt.Errorf("agnhost source: %w", err)
		}
		porter = append(porter, File{Path: "/" + f, Mode: 0o644, Data: data})
	}

	agnhostFiles, err := userland(o.BusyBox, agnhostTools)
	if err != nil {
		return nil, err
	}
	agnhostFiles = append(agnhostFiles, agnhost...)
	agnhostFiles = append(agnhostFiles, porter...)
	agnhostFiles = append(agnhostFiles,
		// entrypoint-tester tests run the binary under this second name.
		File{Path: "/agnhost-2", Mode: fs.ModeSymlink | 0o777, Link: "agnhost"},
		File{Path: "/uploads", Mode: fs.ModeDir | 0o755}, // netexec's upload target
		// GNU wget retries a timed-out request 20 times, with back-off;
		// busybox's, which e2e's loops of "wget -T 1" expect, tries once.
		File{Path: "/etc/wgetrc", Mode: 0o644, Data: []byte("tries = 1\n")},
	)
	agnhostFiles = append(agnhostFiles, etcFiles(
		"user-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh\n",
		"user-defined-in-image:x:1000:\ngroup-defined-in-image:x:50000:user-defined-in-image\n")...)

	jessieFiles, err := userland(o.BusyBox, jessieTools)
	if err != nil {
		return nil, err
	}
	jessieFiles = append(jessieFiles, etcFiles("", "")...)

	busybox, err := Busybox(o.BusyBox)
	if err != nil {
		return nil, err
	}
	busybox = append(busybox, etcFiles("", "")...)

	specs := []Spec{
		{Tag: AgnhostTag, Files: agnhostFiles, Entrypoint: []string{"/agnhost"}, Cmd: []string{"pause"}},
		// Upstream's pause is a tiny C program; agnhost's pause subcommand
		// does the same (waits, reaps children, exits on SIGINT/SIGTERM).
		{Tag: PauseTag, Files: agnhost, Entrypoint: []string{"/agnhost", "pause"}, User: "65535:65535"},
		{Tag: BusyBoxTag, Files: busybox, Cmd: []string{"sh"}},
		{Tag: JessieDnsutilTag, Files: jessieFiles},
	}
	if o.NginxRoot != "" {
		nginx, err := nginxSpec(o.NginxRoot, o.BusyBox)
		if err != nil {
			return nil, err
		}
		specs = append(specs, nginx)
	}
	return specs, nil
}

// nginxConf is the official nginx image's configuration (upstream's e2e
// nginx is that image), for Debian's build of nginx.
const nginxConf = `user nginx;
worker_processes auto;
error_log /var/log/nginx/error.log notice;
pid /run/nginx.pid;
events {
    worker_connections 1024;
}
http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log /var/log/nginx/access.log;
    sendfile on;
    keepalive_timeout 65;
    server {
        listen 80;
        listen [::]:80;
        server_name localhost;
        location / {
            root /usr/share/nginx/html;
            index index.html index.htm;
        }
    }
}
`

// nginxSpec is the e2e nginx image (upstream: nginx on Alpine, serving
// port 80 in the foreground, logs to the container's output) from
// Debian's nginx unpacked at root, with busybox's utilities and a shell.
func nginxSpec(root, busybox string) (Spec, error) {
	files, err := Program(filepath.Join(root, "usr/sbin/nginx"), "/usr/sbin/nginx")
	if err != nil {
		return Spec{}, fmt.Errorf("nginx (unpack it with tools/image/debs.sh nginx nginx-common): %w", err)
	}
	for _, f := range []string{"/etc/nginx/mime.types", "/usr/share/nginx/html/index.html"} {
		data, err := os.ReadFile(filepath.Join(root, f))
		if err != nil {
			return Spec{}, fmt.Errorf("nginx: %w", err)
		}
		files = append(files, File{Path: f, Mode: 0o644, Data: data})
	}
	base, err := userland(busybox, []Tool{shell})
	if err != nil {
		return Spec{}, err
	}
	files = append(files, base...)
	files = append(files, etcFiles("nginx:x:101:101:nginx:/nonexistent:/sbin/nologin\n", "nginx:x:101:\n")...)
	files = append(files,
		File{Path: "/etc/nginx/nginx.conf", Mode: 0o644, Data: []byte(nginxConf)},
		File{Path: "/var/log/nginx/access.log", Mode: fs.ModeSymlink | 0o777, Link: "/dev/stdout"},
		File{Path: "/var/log/nginx/error.log", Mode: fs.ModeSymlink | 0o777, Link: "/dev/stderr"},
		File{Path: "/var/lib/nginx", Mode: fs.ModeDir | 0o755}, // Debian's build keeps its temp files here
		File{Path: "/run", Mode: fs.ModeDir | 0o755},
	)
	return Spec{Tag: NginxTag, Files: files, Cmd: []string{"nginx", "-g", "daemon off;"}}, nil
}

// userland is busybox's shell and utilities with tools in place of the
// applets of the same names.
func userland(busybox string, tools []Tool) ([]File, error) {
	var names []string
	for _, t := range tools {
		names = append(names, filepath.Base(t.Dst))
	}
	files, err := Busybox(busybox, names...)
	if err != nil {
		return nil, err
	}
	tf, err := Tools(tools...)
	if err != nil {
		return nil, err
	}
	return append(files, tf...), nil
}

// Write writes each spec into dir as NAME-image.tar, NAME being the last
// element of its repository (pause-image.tar, agnhost-image.tar, ...).
func Write(dir string, specs []Spec) ([]Built, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	var built []Built
	for _, s := range specs {
		b, err := s.Write(filepath.Join(dir, fileName(s.Tag)))
		if err != nil {
			return nil, err
		}
		built = append(built, b)
	}
	return built, nil
}

// Cluster builds the cluster images into dir.
func Cluster(dir string, o ClusterOptions) ([]Built, error) {
	specs, err := ClusterSpecs(o)
	if err != nil {
		return nil, err
	}
	return Write(dir, specs)
}
