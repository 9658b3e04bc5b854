package kubeproxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Tool is one of the rule loaders kube-proxy drives.
type Tool string

const (
	// IPTablesLegacy is iptables-restore with the legacy (x_tables) backend.
	IPTablesLegacy Tool = "iptables-legacy-restore"
	// IPTablesNFT is iptables-restore with the nf_tables backend.
	IPTablesNFT Tool = "iptables-nft-restore"
	// NFT is the nft command, reading a file of commands.
	NFT Tool = "nft"
)

// args are the arguments kube-proxy passes (iptables: --noflush
// --counters, plus waiting for the lock), input read from stdin.
func (t Tool) args() []string {
	if t == NFT {
		return []string{"-f", "-"}
	}
	return []string{"-w", "5", "--noflush", "--counters"}
}

// Available reports whether the tool's binary is on PATH, naming the
// Debian package that has it when not.
func (t Tool) Available() error {
	if _, err := exec.LookPath(string(t)); err != nil {
		pkg := "iptables"
		if t == NFT {
			pkg = "nftables"
		}
		return fmt.Errorf("%s not found (Debian package %s): %w", t, pkg, err)
	}
	return nil
}

// Doer runs a function on a thread inside a network namespace;
// topology's Node and Pod implement it.
type Doer interface {
	Do(fn func() error) error
}

// Runner applies rule text inside one netns. The child process is forked
// from a thread inside that netns, so it inherits it (no `ip netns exec`,
// whose extra exec and mount namespace would be timed too). iptables'
// lock file is private to the Runner, so a benchmark never waits on, or
// blocks, the host's iptables users.
type Runner struct {
	NS Doer
	// LockFile is XTABLES_LOCKFILE for iptables; empty: a file in the
	// temporary directory, named after the Runner's pointer.
	LockFile string
}

// Apply feeds input to tool's stdin inside r's netns and returns how long
// the command took, start to exit. The context bounds it; on expiry the
// process is killed.
func (r *Runner) Apply(ctx context.Context, tool Tool, input string) (time.Duration, error) {
	lock := r.LockFile
	if lock == "" {
		lock = filepath.Join(os.TempDir(), fmt.Sprintf("servicepath-xtables-%p.lock", r))
		r.LockFile = lock
	}
	var took time.Duration
	var stderr bytes.Buffer
	err := r.NS.Do(func() error {
		cmd := exec.CommandContext(ctx, string(tool), tool.args()...)
		cmd.Stdin = strings.NewReader(input)
		cmd.Stderr = &stderr
		cmd.Env = append(os.Environ(), "XTABLES_LOCKFILE="+lock)
		start := time.Now()
		err := cmd.Run()
		took = time.Since(start)
		return err
	})
	if err != nil {
		if ctx.Err() != nil {
			return took, fmt.Errorf("%s: %w after %v", tool, ctx.Err(), took.Round(time.Millisecond))
		}
		return took, fmt.Errorf("%s: %w: %s", tool, err, firstLines(stderr.String(), 5))
	}
	return took, nil
}

// Output runs tool with args inside r's netns and returns its stdout, for
// listing what is loaded (iptables-save, nft list).
func (r *Runner) Output(ctx context.Context, name string, args ...string) (string, error) {
	var out, stderr bytes.Buffer
	err := r.NS.Do(func() error {
		cmd := exec.CommandContext(ctx, name, args...)
		cmd.Stdout, cmd.Stderr = &out, &stderr
		if r.LockFile != "" {
			cmd.Env = append(os.Environ(), "XTABLES_LOCKFILE="+r.LockFile)
		}
		return cmd.Run()
	})
	if err != nil {
		return "", fmt.Errorf("%s: %w: %s", name, err, firstLines(stderr.String(), 5))
	}
	return out.String(), nil
}

// Close removes the private lock file.
func (r *Runner) Close() error {
	if r.LockFile == "" {
		return nil
	}
	if err := os.Remove(r.LockFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func firstLines(s string, n int) string {
	lines := strings.SplitN(strings.TrimSpace(s), "\n", n+1)
	if len(lines) > n {
		lines = append(lines[:n], "...")
	}
	return strings.Join(lines, "; ")
}
