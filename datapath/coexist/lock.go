package coexist

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/mounts"
)

// Lock is an exclusive flock on a pin directory, held while a servicepath
// process uses it. bpffs holds no regular files, so the directory itself
// is locked; the kernel drops the lock when the process dies, so a pin
// directory left by a crashed process is free.
type Lock struct{ f *os.File }

// InUseError says another process holds the pin directory's lock.
type InUseError struct {
	Dir string
	// PID is the holder as /proc/locks names it; 0 when it cannot be seen
	// (another PID namespace).
	PID int
}

func (e *InUseError) Error() string {
	who := "another servicepath process"
	if e.PID > 0 {
		who = fmt.Sprintf("another servicepath process (pid %d%s)", e.PID, comm(e.PID))
	}
	return fmt.Sprintf("%s is using %s: stop it first (two on one node would fight over the same traffic; a second one for a test needs its own --bpffs)", who, e.Dir)
}

// Acquire mounts bpffs on dir if needed and locks it, without waiting.
func Acquire(dir string) (*Lock, error) {
	if err := mounts.EnsureBPFFS(dir); err != nil {
		return nil, err
	}
	return lockDir(dir)
}

// AcquireExisting locks dir if it exists; (nil, nil) when it does not,
// for commands that must not create state.
func AcquireExisting(dir string) (*Lock, error) {
	l, err := lockDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	return l, err
}

func lockDir(dir string) (*Lock, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		defer f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, &InUseError{Dir: dir, PID: lockHolder(f)}
		}
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return &Lock{f: f}, nil
}

// Release drops the lock; nil-safe.
func (l *Lock) Release() error {
	if l == nil {
		return nil
	}
	return l.f.Close()
}

// lockHolder finds the pid holding an flock on f's inode in /proc/locks:
// "1: FLOCK  ADVISORY  WRITE 29907 00:27:70010 0 EOF".
func lockHolder(f *os.File) int {
	var st unix.Stat_t
	if unix.Fstat(int(f.Fd()), &st) != nil {
		return 0
	}
	want := fmt.Sprintf("%02x:%02x:%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	locks, err := os.Open("/proc/locks")
	if err != nil {
		return 0
	}
	defer locks.Close()
	sc := bufio.NewScanner(locks)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 || fields[1] != "FLOCK" || fields[5] != want {
			continue
		}
		if pid, err := strconv.Atoi(fields[4]); err == nil && pid > 0 {
			return pid
		}
	}
	return 0
}

// comm is ", NAME" for pid's command name, or "" if it cannot be read.
func comm(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		return ""
	}
	return ", " + strings.TrimSpace(string(b))
}
