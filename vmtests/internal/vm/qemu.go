package vm

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"
)

// Machine is how guests are started.
type Machine struct {
	QEMU   string // qemu-system-x86_64
	Accel  string // "kvm" or "tcg"
	CPUs   int
	Memory string // e.g. "2G"
}

// Cmdline is the kernel command line: panic=-1 with -no-reboot turns a guest
// panic into QEMU exiting instead of a hang until the timeout.
const Cmdline = "console=ttyS0 panic=-1 quiet random.trust_cpu=on mitigations=off"

func (m Machine) args(kernel, initrd string) []string {
	accel, cpu := "tcg,thread=multi", "max"
	if m.Accel == "kvm" {
		accel, cpu = "kvm", "host"
	}
	return []string{
		"-accel", accel, "-M", "pc", "-cpu", cpu,
		"-smp", fmt.Sprint(m.CPUs), "-m", m.Memory,
		"-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio",
		"-kernel", kernel, "-initrd", initrd, "-append", Cmdline,
	}
}

// Command is the QEMU invocation, for logs and for reproducing by hand.
func (m Machine) Command(kernel, initrd string) string {
	return m.QEMU + " " + strings.Join(m.args(kernel, initrd), " ")
}

// Outcome is how a boot ended.
type Outcome struct {
	Console  *Console
	TimedOut string // "boot" or "run" when QEMU was killed, else ""
	Err      error  // QEMU failed to start or exited with an error
	Wall     time.Duration
}

// Boot runs one guest, handing each console line to onLine as it arrives.
// QEMU is killed if init has not started within bootTimeout or the guest
// has not finished within timeout.
func (m Machine) Boot(kernel, initrd string, bootTimeout, timeout time.Duration, onLine func(string)) Outcome {
	start := time.Now()
	out := Outcome{Console: &Console{}}
	cmd := exec.Command(m.QEMU, m.args(kernel, initrd)...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		out.Err = err
		return out
	}
	stderrPipe, err := cmd.StderrPipe()
	if err != nil {
		out.Err = err
		return out
	}
	if err := cmd.Start(); err != nil {
		out.Err = err
		return out
	}
	lines := make(chan string)
	go func() {
		defer close(lines)
		r := bufio.NewReaderSize(stdout, 1<<16)
		for {
			line, err := r.ReadString('\n')
			if line != "" {
				lines <- strings.TrimRight(line, "\r\n")
			}
			if err != nil {
				return
			}
		}
	}()
	// On an internal error (nested KVM that cannot run the guest) QEMU stops
	// the guest and waits forever: kill it as soon as it says so.
	var stderr strings.Builder
	stuck := make(chan struct{})
	stderrDone := make(chan struct{})
	go func() {
		defer close(stderrDone)
		sc := bufio.NewScanner(stderrPipe)
		once := false
		for sc.Scan() {
			stderr.WriteString(sc.Text() + "\n")
			if !once && strings.Contains(sc.Text(), "internal error") {
				once = true
				close(stuck)
			}
		}
	}()
	bootTimer, runTimer := time.NewTimer(bootTimeout), time.NewTimer(timeout)
	defer bootTimer.Stop()
	defer runTimer.Stop()
	stopped, watch := false, stuck
	for open := true; open; {
		select {
		case line, ok := <-lines:
			if !ok {
				open = false
				break
			}
			out.Console.Feed(line)
			onLine(line)
			if out.Console.Booted() {
				bootTimer.Stop()
			}
		case <-bootTimer.C:
			out.TimedOut = "boot"
			cmd.Process.Kill()
		case <-runTimer.C:
			out.TimedOut = "run"
			cmd.Process.Kill()
		case <-watch:
			stopped, watch = true, nil
			cmd.Process.Kill()
		}
	}
	<-stderrDone
	err = cmd.Wait()
	if stopped {
		err = errors.New("guest stopped")
	}
	if err != nil && out.TimedOut == "" {
		msg := strings.SplitN(strings.TrimSpace(stderr.String()), "\n", 4)
		out.Err = fmt.Errorf("%s: %w: %s", m.QEMU, err, strings.Join(msg[:min(len(msg), 3)], "; "))
	}
	out.Wall = time.Since(start)
	return out
}

// Version returns QEMU's first line of `-version`.
func Version(qemu string) (string, error) {
	out, err := exec.Command(qemu, "-version").Output()
	if err != nil {
		return "", fmt.Errorf("%s -version: %w", qemu, err)
	}
	return strings.SplitN(strings.TrimSpace(string(out)), "\n", 2)[0], nil
}

// DetectAccel returns "kvm" if a probe guest (kernel + an initramfs whose
// init only powers off) completes under KVM, else "tcg". /dev/kvm being
// present is not enough: nested software KVM cannot run Debian's kernels.
func DetectAccel(m Machine, kernel, probeInitrd string, log io.Writer) string {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return "tcg"
	}
	f.Close()
	m.Accel = "kvm"
	out := m.Boot(kernel, probeInitrd, 10*time.Second, 20*time.Second, func(string) {})
	if out.Console.Done {
		return "kvm"
	}
	reason := out.TimedOut + " timeout"
	if out.Err != nil {
		reason = out.Err.Error()
	}
	fmt.Fprintf(log, "vmtest: /dev/kvm does not boot a guest (%s); using TCG\n", reason)
	return "tcg"
}
