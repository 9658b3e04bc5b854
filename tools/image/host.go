package image

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
)

// Program is a file copied from this machine into an image as an
// executable (mode 0755), with the shared libraries and loader it needs at
// the paths where this machine has them. A static program brings nothing
// else.
func Program(src, dst string) ([]File, error) {
	data, err := os.ReadFile(src)
	if err != nil {
		return nil, fmt.Errorf("program %s: %w", src, err)
	}
	files := []File{{Path: dst, Mode: 0o755, Data: data}}
	libs, err := sharedLibraries(src)
	if err != nil {
		return nil, err
	}
	for _, lib := range libs {
		// The library's path as the loader found it (often a symlink to
		// the versioned file), holding the versioned file's bytes.
		data, err := os.ReadFile(lib)
		if err != nil {
			return nil, fmt.Errorf("program %s: library %w", src, err)
		}
		files = append(files, File{Path: lib, Mode: 0o755, Data: data})
	}
	return files, nil
}

// lddLib matches "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)"
// and the loader's "/lib64/ld-linux-x86-64.so.2 (0x...)".
var lddLib = regexp.MustCompile(`^\s*(?:\S+ => )?(/\S+) \(0x[0-9a-f]+\)$`)

// sharedLibraries lists what the dynamic loader maps for program, loader
// included, as ldd reports it; nothing for a static program.
func sharedLibraries(program string) ([]string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.Command("ldd", program)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	all := stdout.String() + stderr.String()
	if strings.Contains(all, "not a dynamic executable") || strings.Contains(all, "statically linked") {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("ldd %s: %w: %s", program, err, strings.TrimSpace(all))
	}
	var libs []string
	sc := bufio.NewScanner(&stdout)
	for sc.Scan() {
		line := sc.Text()
		if strings.Contains(line, "=> not found") {
			return nil, fmt.Errorf("ldd %s: %s", program, strings.TrimSpace(line))
		}
		if m := lddLib.FindStringSubmatch(line); m != nil {
			libs = append(libs, m[1])
		}
	}
	return libs, sc.Err()
}

// A Tool is a program an image takes from this machine, where a Debian
// package installs it.
type Tool struct {
	Name    string // file name on this machine, looked up in the usual bin directories
	Dst     string // path in the image
	Package string // Debian package that installs it
}

// hostBinDirs are searched in order, so that the result never depends on
// the caller's PATH.
var hostBinDirs = []string{"/usr/bin", "/usr/sbin", "/bin", "/sbin"}

func (t Tool) files() ([]File, error) {
	for _, dir := range hostBinDirs {
		src := path.Join(dir, t.Name)
		if _, err := os.Stat(src); err == nil {
			return Program(src, t.Dst)
		}
	}
	return nil, fmt.Errorf("%s not found in %s: install the Debian package %s (make deps)",
		t.Name, strings.Join(hostBinDirs, ", "), t.Package)
}

// Tools copies each tool with what it needs.
func Tools(tools ...Tool) ([]File, error) {
	var files []File
	for _, t := range tools {
		tf, err := t.files()
		if err != nil {
			return nil, err
		}
		files = append(files, tf...)
	}
	return files, nil
}

// Commands copies the named commands of dir with the layout they have
// there: a command that is a symlink to a program beside it (Debian's
// iptables-nft-save to xtables-nft-multi, which acts by the name it is
// run as) stays a symlink, next to a copy of that program.
func Commands(dir, pkg string, names ...string) ([]File, error) {
	var files []File
	for _, n := range names {
		src := path.Join(dir, n)
		fi, err := os.Lstat(src)
		if err != nil {
			return nil, fmt.Errorf("%w: install the Debian package %s (make deps)", err, pkg)
		}
		prog := src
		if fi.Mode()&fs.ModeSymlink != 0 {
			target, err := os.Readlink(src)
			if err != nil {
				return nil, err
			}
			if strings.Contains(target, "/") {
				return nil, fmt.Errorf("%s links to %s, not to a program beside it", src, target)
			}
			files = append(files, File{Path: src, Mode: fs.ModeSymlink | 0o777, Link: target})
			prog = path.Join(dir, target)
		}
		pf, err := Program(prog, prog)
		if err != nil {
			return nil, err
		}
		files = append(files, pf...)
	}
	return files, nil
}

// Plugins copies the shared objects that pattern matches to the same
// places, with the libraries each needs: what a program loads at run
// time, which ldd of the program does not show.
func Plugins(pattern, pkg string) ([]File, error) {
	sos, err := filepath.Glob(pattern)
	if err != nil || len(sos) == 0 {
		return nil, fmt.Errorf("no plugins match %s: install the Debian package %s (make deps)", pattern, pkg)
	}
	var files []File
	for _, so := range sos {
		pf, err := Program(so, so)
		if err != nil {
			return nil, err
		}
		files = append(files, pf...)
	}
	return files, nil
}

// Busybox is the busybox binary at /bin/busybox with a symlink for each
// of its applets where busybox itself installs them (`busybox
// --list-full`), except the commands in skip, which other files provide.
func Busybox(bin string, skip ...string) ([]File, error) {
	files, err := Program(bin, "/bin/busybox")
	if err != nil {
		return nil, err
	}
	out, err := exec.Command(bin, "--list-full").Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			err = fmt.Errorf("%w: %s", err, ee.Stderr)
		}
		return nil, fmt.Errorf("%s --list-full: %w", bin, err)
	}
	for _, applet := range strings.Fields(string(out)) {
		p := "/" + applet
		if p == "/bin/busybox" || slices.Contains(skip, path.Base(p)) {
			continue
		}
		files = append(files, File{Path: p, Mode: fs.ModeSymlink | 0o777, Link: "/bin/busybox"})
	}
	return files, nil
}
