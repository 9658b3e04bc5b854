package debian

import (
	"fmt"
	"regexp"
	"strings"
)

// Package is one Debian package at one version.
type Package struct {
	Name    string
	Version string
}

// Stanza is one package record of `apt-cache show`.
type Stanza struct {
	Package
	Depends []string // package names, alternatives flattened
}

// ParseStanzas reads `apt-cache show` output.
func ParseStanzas(text string) []Stanza {
	var out []Stanza
	for _, block := range strings.Split(text, "\n\n") {
		var s Stanza
		for _, line := range strings.Split(block, "\n") {
			k, v, ok := strings.Cut(line, ": ")
			if !ok {
				continue
			}
			switch k {
			case "Package":
				s.Name = v
			case "Version":
				s.Version = v
			case "Depends", "Pre-Depends":
				s.Depends = append(s.Depends, dependNames(v)...)
			}
		}
		if s.Name != "" && s.Version != "" {
			out = append(out, s)
		}
	}
	return out
}

func dependNames(field string) []string {
	var names []string
	for _, alt := range strings.FieldsFunc(field, func(r rune) bool { return r == ',' || r == '|' }) {
		if f := strings.Fields(alt); len(f) > 0 {
			names = append(names, strings.SplitN(f[0], ":", 2)[0])
		}
	}
	return names
}

// imageName matches the cloud kernel images of every Debian release; 7.x in
// sid names a meta-package whose dependencies carry the kernel.
var imageName = regexp.MustCompile(`^linux-image-([0-9][^ ]*-cloud-amd64)$`)

// ImageNames filters `apt-cache pkgnames linux-image-` output to cloud kernel images.
func ImageNames(pkgnames string) []string {
	var out []string
	for _, n := range strings.Fields(pkgnames) {
		if imageName.MatchString(n) {
			out = append(out, n)
		}
	}
	return out
}

// Selection is the kernel picked for one requested series.
type Selection struct {
	Series   string    // as requested: "6.12", "7"
	Version  string    // upstream version, e.g. "6.12.117"
	Release  string    // `uname -r`, e.g. "6.12.117+deb13-cloud-amd64"
	Packages []Package // everything to download, image first
}

// Select picks, for each series prefix, the newest image by Debian version
// whose upstream version is in that series.
func Select(series []string, stanzas []Stanza) ([]Selection, error) {
	var out []Selection
	for _, want := range series {
		var best *Stanza
		for i := range stanzas {
			s := &stanzas[i]
			up := Upstream(s.Version)
			if !imageName.MatchString(s.Name) || (up != want && !strings.HasPrefix(up, want+".")) {
				continue
			}
			if best == nil || CompareVersions(s.Version, best.Version) > 0 {
				best = s
			}
		}
		if best == nil {
			return nil, fmt.Errorf("no Debian cloud kernel image in series %s", want)
		}
		release := imageName.FindStringSubmatch(best.Name)[1]
		sel := Selection{Series: want, Version: Upstream(best.Version), Release: release, Packages: []Package{best.Package}}
		// Split kernels (linux-binary-, linux-modules-) depend on their parts by release.
		for _, d := range best.Depends {
			if strings.HasSuffix(d, "-"+release) {
				sel.Packages = append(sel.Packages, Package{Name: d, Version: best.Version})
			}
		}
		out = append(out, sel)
	}
	return out, nil
}
