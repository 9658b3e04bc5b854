package debian

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Apt runs apt-get and apt-cache on a private sources list, lists and cache
// under Dir, so the host's own apt state is never read or changed.
type Apt struct {
	Dir     string
	Sources []string // one-line "deb ..." entries
}

// KernelSuites lists the suites kernels are taken from: Debian 11 to sid,
// with the security suites where the newest stable kernels land.
func KernelSuites(a Archive, dir string) *Apt {
	apt := &Apt{Dir: dir}
	for _, s := range []string{"bullseye", "bookworm", "trixie", "sid"} {
		apt.add(a.Main, s, a.SignedBy)
		if a.Security != "" && s != "sid" {
			apt.add(a.Security, s+"-security", a.SignedBy)
		}
	}
	return apt
}

// HostSuites lists the host's own release plus its backports, for tools
// (QEMU 10) that only backports carries.
func HostSuites(a Archive, dir string) *Apt {
	apt := &Apt{Dir: dir}
	for _, s := range []string{a.Codename, a.Codename + "-updates", a.Codename + "-backports"} {
		apt.add(a.Main, s, a.SignedBy)
	}
	if a.Security != "" {
		apt.add(a.Security, a.Codename+"-security", a.SignedBy)
	}
	return apt
}

func (a *Apt) add(uri, suite, signedBy string) {
	a.Sources = append(a.Sources, fmt.Sprintf("deb [signed-by=%s] %s %s main", signedBy, uri, suite))
}

func (a *Apt) options() []string {
	return []string{
		"-o", "Dir::Etc::SourceList=" + filepath.Join(a.Dir, "sources.list"),
		"-o", "Dir::Etc::SourceParts=" + filepath.Join(a.Dir, "sources.list.d"),
		"-o", "Dir::Etc::PreferencesParts=" + filepath.Join(a.Dir, "preferences.d"),
		"-o", "Dir::State::Lists=" + filepath.Join(a.Dir, "lists"),
		"-o", "Dir::Cache=" + filepath.Join(a.Dir, "cache"),
		// The cache may sit in a home directory the _apt user cannot enter.
		"-o", "APT::Sandbox::User=root",
		// Only Packages indices are needed, not AppStream metadata.
		"-o", "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false",
		"-o", "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false",
		"-o", "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false",
		"-o", "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false",
	}
}

// Update refreshes the package lists when they are older than maxAge or the
// sources changed, so a cached run needs no network.
func (a *Apt) Update(maxAge time.Duration) error {
	for _, d := range []string{"sources.list.d", "preferences.d", "lists/partial", "cache/archives/partial"} {
		if err := os.MkdirAll(filepath.Join(a.Dir, d), 0o755); err != nil {
			return err
		}
	}
	list := []byte(strings.Join(a.Sources, "\n") + "\n")
	listFile := filepath.Join(a.Dir, "sources.list")
	stamp := filepath.Join(a.Dir, "updated")
	old, _ := os.ReadFile(listFile)
	if st, err := os.Stat(stamp); err == nil && bytes.Equal(old, list) && time.Since(st.ModTime()) < maxAge {
		return nil
	}
	if err := os.WriteFile(listFile, list, 0o644); err != nil {
		return err
	}
	os.Remove(stamp)
	if _, err := a.run("apt-get", "", false, "-q", "update"); err != nil {
		return err
	}
	return os.WriteFile(stamp, nil, 0o644)
}

// Cache runs apt-cache with the private configuration and returns stdout.
func (a *Apt) Cache(args ...string) (string, error) {
	return a.run("apt-cache", "", false, args...)
}

// Download fetches "name=version" packages into dir.
func (a *Apt) Download(dir string, pkgs ...string) error {
	_, err := a.run("apt-get", dir, false, append([]string{"-q", "download"}, pkgs...)...)
	return err
}

// Install installs packages on the host from the private lists.
func (a *Apt) Install(args ...string) error {
	_, err := a.run("apt-get", "", true, append([]string{"-q", "-y", "--no-install-recommends", "install"}, args...)...)
	return err
}

// run captures stdout, or streams it to stderr when the user should see it.
func (a *Apt) run(tool, dir string, stream bool, args ...string) (string, error) {
	cmd := exec.Command(tool, append(a.options(), args...)...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if stream {
		cmd.Stdout = os.Stderr
	}
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %w\n%s", tool, strings.Join(args, " "), err, lastLines(stderr.String(), 10))
	}
	return stdout.String(), nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
