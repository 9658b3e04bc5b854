package bench

import (
	"bufio"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Stamp says what produced a results file.
type Stamp struct {
	Kernel   string            `json:"kernel"`
	Machine  string            `json:"machine"`
	CPUModel string            `json:"cpu_model"`
	NumCPU   int               `json:"num_cpu"`
	Commit   string            `json:"commit"`
	Date     string            `json:"date"`
	Go       string            `json:"go"`
	Tools    map[string]string `json:"tools"`
}

// NewStamp reads the kernel, CPU, commit (with -dirty when the tree has
// changes) and tool versions.
func NewStamp(repo string) Stamp {
	s := Stamp{NumCPU: runtime.NumCPU(), Go: runtime.Version(), Date: time.Now().UTC().Format(time.RFC3339), Tools: map[string]string{}}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		s.Kernel = unix.ByteSliceToString(u.Release[:])
		s.Machine = unix.ByteSliceToString(u.Machine[:])
	}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				s.CPUModel = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	s.Commit = "unknown"
	if out, err := exec.Command("git", "-C", repo, "rev-parse", "HEAD").Output(); err == nil {
		s.Commit = strings.TrimSpace(string(out))
		if st, err := exec.Command("git", "-C", repo, "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(strings.TrimSpace(string(st))) > 0 {
			s.Commit += "-dirty"
		}
	}
	for _, t := range [][]string{{"iptables-legacy-restore", "--version"}, {"iptables-nft-restore", "--version"}, {"nft", "--version"}} {
		if out, err := exec.Command(t[0], t[1:]...).Output(); err == nil {
			s.Tools[t[0]] = strings.TrimSpace(string(out))
		} else {
			s.Tools[t[0]] = "missing"
		}
	}
	return s
}
