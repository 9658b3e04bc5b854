package vm

import (
	"strconv"
	"strings"
)

// Run is one test binary's slice of the console.
type Run struct {
	Package string
	Output  []string // lines, without the markers
	Exit    int
	Ended   bool // the end marker was seen; false if the VM died or timed out mid-run
}

// Console follows a guest's console line by line.
type Console struct {
	Release        string // `uname -r` in the guest, set once it booted
	Done           bool   // init reached the end of its script
	ModuleFailures []string
	// InitramfsFailed: the kernel could not unpack all of the initramfs
	// (guest memory too small for it), so files the tests need are missing.
	InitramfsFailed bool
	Runs            []*Run
	cur             *Run
}

// initramfsFailed is what the kernel prints when it cannot unpack the
// initramfs whole (init/initramfs.c), and boots on with what it has.
const initramfsFailed = "Initramfs unpacking failed"

// Booted tells whether init started.
func (c *Console) Booted() bool { return c.Release != "" }

// Feed takes one console line without its line ending. A marker may follow
// test output that did not end its last line, so markers are found anywhere.
func (c *Console) Feed(line string) {
	if strings.Contains(line, initramfsFailed) {
		c.InitramfsFailed = true
	}
	i := strings.Index(line, "@@vmtest ")
	if i < 0 {
		if c.cur != nil {
			c.cur.Output = append(c.cur.Output, line)
		}
		return
	}
	if i > 0 {
		c.Feed(line[:i])
	}
	m := line[i:]
	switch {
	case strings.HasPrefix(m, markBoot):
		c.Release = strings.TrimSpace(strings.TrimPrefix(m, markBoot))
	case strings.HasPrefix(m, markModFail):
		c.ModuleFailures = append(c.ModuleFailures, strings.TrimSpace(strings.TrimPrefix(m, markModFail)))
	case strings.HasPrefix(m, markBegin):
		c.cur = &Run{Package: strings.TrimSpace(strings.TrimPrefix(m, markBegin))}
		c.Runs = append(c.Runs, c.cur)
	case strings.HasPrefix(m, markEnd):
		f := strings.Fields(strings.TrimPrefix(m, markEnd))
		if c.cur != nil && len(f) == 2 && f[0] == c.cur.Package {
			code, err := strconv.Atoi(strings.TrimPrefix(f[1], "exit="))
			if err != nil {
				code = -1
			}
			c.cur.Exit, c.cur.Ended = code, true
			c.cur = nil
		}
	case strings.HasPrefix(m, markDone):
		c.Done = true
	default:
		if c.cur != nil {
			c.cur.Output = append(c.cur.Output, line[i:])
		}
	}
}
