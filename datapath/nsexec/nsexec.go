// Package nsexec runs code inside another network namespace, on a thread
// of its own, and never lets that thread leak back in the wrong one.
package nsexec

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// Do runs fn on a thread inside ns; sockets fn creates stay in ns.
func Do(ns netns.NsHandle, fn func() error) error {
	return OnThread(func() error {
		if err := netns.Set(ns); err != nil {
			return fmt.Errorf("enter netns: %w", err)
		}
		return fn()
	})
}

// OnThread runs fn on a fresh goroutine locked to its thread, then moves the
// thread back to its original netns. A dedicated goroutine means that if the
// move back fails, the goroutine exits still locked and the runtime discards
// the thread, instead of the caller carrying on in the wrong namespace.
// Panics in fn are re-raised in the caller.
func OnThread(fn func() error) error {
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
