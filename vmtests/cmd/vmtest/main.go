// Command vmtest boots each kernel of a matrix of Debian kernels in QEMU and
// runs the module's Go test binaries inside, writing results/kernels/.
//
//	vmtest [flags] [packages]   run (packages default to ./...)
//	vmtest deps                 install the host tools it needs (root)
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/servicepath/servicepath/vmtests/internal/debian"
)

type config struct {
	kernels     []string
	cache       string
	results     string
	accel       string
	short       bool
	run         string
	testTimeout time.Duration
	bootTimeout time.Duration
	vmTimeout   time.Duration
	refresh     bool
	modules     []string
	hostTools   []string
	cpus        int
	memory      string
	qemu        string
	packages    []string
	reportOnly  bool
}

// defaultModules are loaded in every guest when the kernel has them as
// modules: what the datapath, its tests and kube-proxy baselines touch.
const defaultModules = "veth sch_ingress sch_fq cls_bpf act_bpf ipvlan macvlan netkit dummy bridge br_netfilter vxlan geneve tun " +
	"nf_tables nft_ct nft_nat nft_chain_nat nft_masq nft_numgen nft_compat nft_fib_inet nft_fib_ipv4 nft_fib_ipv6 nft_reject nft_reject_inet nft_reject_ipv4 nft_reject_ipv6 nf_conntrack nf_conntrack_netlink nf_nat " +
	"ip_tables iptable_filter iptable_nat iptable_mangle ip6_tables ip6table_filter ip6table_nat " +
	"xt_conntrack xt_nat xt_MASQUERADE xt_comment xt_mark xt_statistic xt_addrtype " +
	"ip_vs ip_vs_rr inet_diag tcp_diag udp_diag tcp_bbr"

func main() {
	// modprobe and depmod live in /usr/sbin, outside a normal user's PATH.
	os.Setenv("PATH", os.Getenv("PATH")+":/usr/sbin:/sbin")
	if len(os.Args) > 1 && os.Args[1] == "deps" {
		if err := deps(cacheDefault()); err != nil {
			fmt.Fprintln(os.Stderr, "vmtest deps:", err)
			os.Exit(1)
		}
		return
	}
	cfg := config{}
	kernels := flag.String("kernels", envOr("KERNELS", "5.10 6.1 6.12 7"), "kernel series to boot (`prefixes`), env KERNELS")
	flag.StringVar(&cfg.cache, "cache", envOr("VMTEST_CACHE", cacheDefault()), "cache of apt lists, kernels and busybox, env VMTEST_CACHE")
	flag.StringVar(&cfg.results, "results", "", "results directory (default <module root>/results/kernels)")
	flag.StringVar(&cfg.accel, "accel", envOr("VMTEST_ACCEL", "auto"), "auto, kvm or tcg, env VMTEST_ACCEL")
	flag.BoolVar(&cfg.short, "short", true, "pass -test.short to the tests")
	flag.StringVar(&cfg.run, "run", "", "pass -test.run `regexp` to the tests")
	flag.DurationVar(&cfg.testTimeout, "test-timeout", 10*time.Minute, "timeout of one test binary")
	flag.DurationVar(&cfg.bootTimeout, "boot-timeout", 2*time.Minute, "time for a guest to reach init")
	flag.DurationVar(&cfg.vmTimeout, "vm-timeout", 40*time.Minute, "time for a guest to run all binaries")
	flag.BoolVar(&cfg.refresh, "refresh", false, "refresh the apt lists even if less than a day old")
	modules := flag.String("modules", defaultModules, "kernel `modules` to load in the guest")
	hostTools := flag.String("host-tools", "ip tc nft", "host `programs` copied into the guest with their libraries")
	flag.IntVar(&cfg.cpus, "cpus", 2, "guest CPUs")
	// The initramfs (every test binary and the source tree, about 750 MB)
	// is unpacked into RAM beside itself.
	flag.StringVar(&cfg.memory, "memory", "4G", "guest memory")
	flag.StringVar(&cfg.qemu, "qemu", "qemu-system-x86_64", "QEMU binary")
	flag.BoolVar(&cfg.reportOnly, "report-only", false, "boot nothing: rewrite the results README from the results files")
	flag.Parse()
	cfg.kernels = strings.Fields(*kernels)
	cfg.modules = strings.Fields(*modules)
	cfg.hostTools = strings.Fields(*hostTools)
	cfg.packages = flag.Args()
	if len(cfg.packages) == 0 {
		cfg.packages = []string{"./..."}
	}
	failed, err := run(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmtest:", err)
		os.Exit(1)
	}
	if failed {
		os.Exit(1)
	}
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func cacheDefault() string {
	dir := os.Getenv("XDG_CACHE_HOME")
	if dir == "" {
		home, _ := os.UserHomeDir()
		dir = filepath.Join(home, ".cache")
	}
	return filepath.Join(dir, "servicepath", "vmtests")
}

// hostPackages are what `vmtest deps` installs when missing: QEMU 10 (7.2
// double-faults booting 6.12 under TCG) and kmod for modprobe/depmod.
var hostPackages = []string{"qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios"}

func deps(cache string) error {
	var need []string
	if v, err := qemuMajor("qemu-system-x86_64"); err != nil || v < 10 {
		need = append(need, hostPackages...)
	}
	for tool, pkg := range map[string]string{"modprobe": "kmod", "depmod": "kmod", "xz": "xz-utils", "zstd": "zstd", "dpkg-deb": "dpkg"} {
		if _, err := exec.LookPath(tool); err != nil && !slices.Contains(need, pkg) {
			need = append(need, pkg)
		}
	}
	if len(need) == 0 {
		fmt.Println("vmtest deps: all present")
		return nil
	}
	archive, err := debian.HostArchive("/etc/apt", "/etc/os-release")
	if err != nil {
		return err
	}
	apt := debian.HostSuites(archive, filepath.Join(cache, "apt", "host"))
	if err := apt.Update(24 * time.Hour); err != nil {
		return err
	}
	fmt.Println("vmtest deps: installing", strings.Join(need, " "))
	return apt.Install(append([]string{"-t", archive.Codename + "-backports"}, need...)...)
}

var qemuVersion = regexp.MustCompile(`version (\d+)\.`)

func qemuMajor(qemu string) (int, error) {
	out, err := exec.Command(qemu, "-version").Output()
	if err != nil {
		return 0, err
	}
	m := qemuVersion.FindSubmatch(out)
	if m == nil {
		return 0, errors.New("unrecognised qemu -version output")
	}
	return strconv.Atoi(string(m[1]))
}
