package debian

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// Busybox returns a static busybox from the newest busybox-static package,
// unpacked under cacheDir/busybox, and that package's version.
func Busybox(apt *Apt, cacheDir string) (path, version string, err error) {
	out, err := apt.Cache("show", "busybox-static")
	if err != nil {
		return "", "", err
	}
	var best *Stanza
	stanzas := ParseStanzas(out)
	for i := range stanzas {
		if best == nil || CompareVersions(stanzas[i].Version, best.Version) > 0 {
			best = &stanzas[i]
		}
	}
	if best == nil {
		return "", "", fmt.Errorf("busybox-static: not in the package lists")
	}
	dir := filepath.Join(cacheDir, "busybox", best.Version)
	if path, err := findBusybox(dir); err == nil {
		return path, best.Version, nil
	}
	tmp := dir + ".tmp"
	os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return "", "", err
	}
	if err := apt.Download(tmp, "busybox-static="+best.Version); err != nil {
		return "", "", err
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(debs) != 1 {
		return "", "", fmt.Errorf("busybox-static: downloaded %d packages", len(debs))
	}
	if out, err := exec.Command("dpkg-deb", "-x", debs[0], tmp).CombinedOutput(); err != nil {
		return "", "", fmt.Errorf("dpkg-deb -x %s: %w\n%s", debs[0], err, out)
	}
	os.RemoveAll(dir)
	if err := os.Rename(tmp, dir); err != nil {
		return "", "", err
	}
	path, err = findBusybox(dir)
	return path, best.Version, err
}

// findBusybox looks in /bin (bookworm) and /usr/bin (merged /usr releases).
func findBusybox(dir string) (string, error) {
	for _, p := range []string{"bin/busybox", "usr/bin/busybox"} {
		if st, err := os.Stat(filepath.Join(dir, p)); err == nil && st.Mode().IsRegular() {
			return filepath.Join(dir, p), nil
		}
	}
	return "", fmt.Errorf("no busybox binary in %s", dir)
}
