package debian

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Archive is where the host's apt gets Debian from; other suites are taken
// from the same places so no host name is written down anywhere.
type Archive struct {
	Codename string // host release, e.g. "bookworm"
	Main     string // URI serving the release suites
	Security string // URI serving the -security suites; empty if the host has none
	SignedBy string // keyring the host trusts for Main
}

type sourceEntry struct {
	uris, suites []string
	signedBy     string
}

// HostArchive reads the apt sources under etcApt (normally /etc/apt) and
// /etc/os-release style data from osRelease.
func HostArchive(etcApt, osRelease string) (Archive, error) {
	codename, err := readCodename(osRelease)
	if err != nil {
		return Archive{}, err
	}
	var entries []sourceEntry
	files := []string{filepath.Join(etcApt, "sources.list")}
	more, _ := filepath.Glob(filepath.Join(etcApt, "sources.list.d", "*"))
	files = append(files, more...)
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		switch {
		case strings.HasSuffix(f, ".sources"):
			entries = append(entries, parseDeb822(string(data))...)
		case strings.HasSuffix(f, ".list"):
			entries = append(entries, parseOneLine(string(data))...)
		}
	}
	return pickArchive(codename, entries)
}

func pickArchive(codename string, entries []sourceEntry) (Archive, error) {
	a := Archive{Codename: codename, SignedBy: "/usr/share/keyrings/debian-archive-keyring.gpg"}
	for _, e := range entries {
		for _, s := range e.suites {
			switch {
			case s == codename && a.Main == "" && len(e.uris) > 0:
				a.Main = strings.TrimSuffix(e.uris[0], "/")
				if strings.HasPrefix(e.signedBy, "/") {
					a.SignedBy = e.signedBy
				}
			case s == codename+"-security" && a.Security == "" && len(e.uris) > 0:
				a.Security = strings.TrimSuffix(e.uris[0], "/")
			}
		}
	}
	if a.Main == "" {
		return a, fmt.Errorf("no apt source for suite %q in the host's apt configuration", codename)
	}
	return a, nil
}

func readCodename(osRelease string) (string, error) {
	f, err := os.Open(osRelease)
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VERSION_CODENAME="); ok && v != "" {
			return strings.Trim(v, `"`), nil
		}
	}
	return "", fmt.Errorf("%s: no VERSION_CODENAME", osRelease)
}

// parseDeb822 reads .sources stanzas, keeping enabled "deb" entries.
func parseDeb822(text string) []sourceEntry {
	var out []sourceEntry
	for _, stanza := range strings.Split(text, "\n\n") {
		fields := map[string]string{}
		for _, line := range strings.Split(stanza, "\n") {
			if strings.HasPrefix(line, "#") || strings.HasPrefix(line, " ") {
				continue
			}
			k, v, ok := strings.Cut(line, ":")
			if ok {
				fields[strings.ToLower(strings.TrimSpace(k))] = strings.TrimSpace(v)
			}
		}
		if !strings.Contains(" "+fields["types"]+" ", " deb ") || strings.EqualFold(fields["enabled"], "no") {
			continue
		}
		out = append(out, sourceEntry{
			uris:     strings.Fields(fields["uris"]),
			suites:   strings.Fields(fields["suites"]),
			signedBy: fields["signed-by"],
		})
	}
	return out
}

// parseOneLine reads the classic "deb [opts] URI suite comp..." format.
func parseOneLine(text string) []sourceEntry {
	var out []sourceEntry
	for _, line := range strings.Split(text, "\n") {
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) < 3 || f[0] != "deb" {
			continue
		}
		var e sourceEntry
		f = f[1:]
		if strings.HasPrefix(f[0], "[") {
			for len(f) > 0 {
				opt := strings.Trim(f[0], "[]")
				if v, ok := strings.CutPrefix(opt, "signed-by="); ok {
					e.signedBy = v
				}
				last := strings.HasSuffix(f[0], "]")
				f = f[1:]
				if last {
					break
				}
			}
		}
		if len(f) < 2 {
			continue
		}
		e.uris, e.suites = f[:1], f[1:2]
		out = append(out, e)
	}
	return out
}
