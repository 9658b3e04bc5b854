package debian

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Kernel is an unpacked kernel ready to boot.
type Kernel struct {
	Selection
	Tree    string // root of the unpacked packages; modules under Tree/lib/modules/Release
	Vmlinuz string
}

const metaFile = "kernel.json"

// Fetch downloads and unpacks sel under cacheDir/kernels, unless an earlier
// run already did.
func Fetch(apt *Apt, sel Selection, cacheDir string) (*Kernel, error) {
	dir := filepath.Join(cacheDir, "kernels", sel.Release+"_"+sel.Packages[0].Version)
	if k, err := loadKernel(dir); err == nil {
		return k, nil
	}
	tmp := dir + ".tmp"
	os.RemoveAll(tmp)
	debs := filepath.Join(tmp, "debs")
	tree := filepath.Join(tmp, "tree")
	if err := os.MkdirAll(debs, 0o755); err != nil {
		return nil, err
	}
	var args []string
	for _, p := range sel.Packages {
		args = append(args, p.Name+"="+p.Version)
	}
	if err := apt.Download(debs, args...); err != nil {
		return nil, err
	}
	files, _ := filepath.Glob(filepath.Join(debs, "*.deb"))
	for _, f := range files {
		if out, err := exec.Command("dpkg-deb", "-x", f, tree).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("dpkg-deb -x %s: %w\n%s", f, err, out)
		}
	}
	os.RemoveAll(debs)
	// 6.12+ keep modules in usr/lib; the host's depmod and modprobe look in lib.
	if _, err := os.Stat(filepath.Join(tree, "lib")); os.IsNotExist(err) {
		if err := os.Symlink("usr/lib", filepath.Join(tree, "lib")); err != nil {
			return nil, err
		}
	}
	if out, err := exec.Command("depmod", "-b", tree, sel.Release).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("depmod -b %s %s: %w\n%s", tree, sel.Release, err, out)
	}
	k := &Kernel{Selection: sel, Tree: filepath.Join(dir, "tree")}
	vmlinuz, err := findVmlinuz(tree, sel.Release)
	if err != nil {
		return nil, err
	}
	k.Vmlinuz = filepath.Join(k.Tree, vmlinuz)
	meta, _ := json.MarshalIndent(k, "", "  ")
	if err := os.WriteFile(filepath.Join(tmp, metaFile), meta, 0o644); err != nil {
		return nil, err
	}
	os.RemoveAll(dir)
	if err := os.Rename(tmp, dir); err != nil {
		return nil, err
	}
	return k, nil
}

// findVmlinuz returns the image path relative to tree: boot/ up to 6.12,
// the modules directory from 7.x on.
func findVmlinuz(tree, release string) (string, error) {
	for _, p := range []string{
		"boot/vmlinuz-" + release,
		"usr/lib/modules/" + release + "/vmlinuz",
		"lib/modules/" + release + "/vmlinuz",
	} {
		if _, err := os.Stat(filepath.Join(tree, p)); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("no vmlinuz for %s in %s", release, tree)
}

func loadKernel(dir string) (*Kernel, error) {
	data, err := os.ReadFile(filepath.Join(dir, metaFile))
	if err != nil {
		return nil, err
	}
	var k Kernel
	if err := json.Unmarshal(data, &k); err != nil {
		return nil, err
	}
	if _, err := os.Stat(k.Vmlinuz); err != nil {
		return nil, err
	}
	return &k, nil
}

// Cached returns the newest kernel of each series already in the cache, for
// runs where the archive cannot be reached.
func Cached(series []string, cacheDir string) ([]*Kernel, error) {
	dirs, _ := filepath.Glob(filepath.Join(cacheDir, "kernels", "*"))
	var out []*Kernel
	for _, want := range series {
		var best *Kernel
		for _, d := range dirs {
			k, err := loadKernel(d)
			if err != nil || (k.Version != want && !strings.HasPrefix(k.Version, want+".")) {
				continue
			}
			if best == nil || CompareVersions(k.Packages[0].Version, best.Packages[0].Version) > 0 {
				best = k
			}
		}
		if best == nil {
			return nil, fmt.Errorf("series %s: not in cache %s", want, cacheDir)
		}
		best.Series = want
		out = append(out, best)
	}
	return out, nil
}
