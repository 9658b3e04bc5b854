package topology

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// netnsDir is where netns.NewNamed and iproute2 keep named namespaces.
const netnsDir = "/run/netns"

// do runs fn on a thread inside ns.
func do(ns netns.NsHandle, fn func() error) error {
	return onThread(func() error {
		if err := netns.Set(ns); err != nil {
			return fmt.Errorf("enter netns: %w", err)
		}
		return fn()
	})
}

// onThread runs fn on a fresh goroutine locked to its thread, then moves the
// thread back to its original netns. A dedicated goroutine means that if the
// move back fails, the goroutine exits still locked and the runtime discards
// the thread, instead of the caller carrying on in the wrong namespace.
// Panics in fn are re-raised in the caller.
func onThread(fn func() error) error {
	type result struct {
		err      error
		panicked bool
		value    any
	}
	done := make(chan result, 1)
	go func() {
		var res result
		returned := false
		defer func() {
			if !returned {
				if v := recover(); v != nil {
					res.panicked, res.value = true, v
				} else {
					res.err = errors.New("netns function exited via runtime.Goexit (t.FailNow outside the test goroutine?)")
				}
			}
			done <- res
		}()
		res.err = lockedRun(fn)
		returned = true
	}()
	res := <-done
	if res.panicked {
		panic(res.value)
	}
	return res.err
}

func lockedRun(fn func() error) (err error) {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("get current netns: %w", err)
	}
	defer orig.Close()
	defer func() {
		if serr := netns.Set(orig); serr != nil {
			err = errors.Join(err, fmt.Errorf("restore netns (thread discarded): %w", serr))
			return
		}
		runtime.UnlockOSThread()
	}()
	return fn()
}

// newNamedNS creates a netns bound at /run/netns/name, so iproute2 can use
// it, without moving the caller's thread into it.
func newNamedNS(name string) (netns.NsHandle, error) {
	h := netns.None()
	err := onThread(func() error {
		var err error
		h, err = netns.NewNamed(name)
		return err
	})
	if err != nil {
		h.Close()
		// EEXIST means the name belongs to someone else; otherwise NewNamed
		// may have left its placeholder file or mount, which are ours.
		if !errors.Is(err, fs.ErrExist) {
			_ = deleteNamedNS(name)
		}
		return netns.None(), fmt.Errorf("create netns %s: %w", name, err)
	}
	return h, nil
}

// deleteNamedNS drops the bind mount that keeps a named netns alive and its
// file. The namespace itself goes once no handle or socket refers to it.
func deleteNamedNS(name string) error {
	p := filepath.Join(netnsDir, name)
	err := unix.Unmount(p, unix.MNT_DETACH)
	if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount %s: %w", p, err)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
