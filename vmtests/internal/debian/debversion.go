package debian

import "strings"

// CompareVersions orders two Debian package versions as dpkg does
// (epoch, upstream, revision; '~' sorts before everything).
func CompareVersions(a, b string) int {
	ea, ua, ra := splitVersion(a)
	eb, ub, rb := splitVersion(b)
	if c := compareNum(ea, eb); c != 0 {
		return c
	}
	if c := compareFragment(ua, ub); c != 0 {
		return c
	}
	return compareFragment(ra, rb)
}

// Upstream returns the upstream part of a Debian version: "1:6.1.192-2" -> "6.1.192".
func Upstream(v string) string {
	_, u, _ := splitVersion(v)
	return u
}

func splitVersion(v string) (epoch, upstream, revision string) {
	if i := strings.IndexByte(v, ':'); i >= 0 {
		epoch, v = v[:i], v[i+1:]
	}
	if i := strings.LastIndexByte(v, '-'); i >= 0 {
		v, revision = v[:i], v[i+1:]
	}
	return epoch, v, revision
}

func compareFragment(a, b string) int {
	for a != "" || b != "" {
		var na, nb string
		na, a = splitFunc(a, isNotDigit)
		nb, b = splitFunc(b, isNotDigit)
		if c := compareLexical(na, nb); c != 0 {
			return c
		}
		na, a = splitFunc(a, isDigit)
		nb, b = splitFunc(b, isDigit)
		if c := compareNum(na, nb); c != 0 {
			return c
		}
	}
	return 0
}

func splitFunc(s string, f func(byte) bool) (head, tail string) {
	i := 0
	for i < len(s) && f(s[i]) {
		i++
	}
	return s[:i], s[i:]
}

func isDigit(c byte) bool    { return c >= '0' && c <= '9' }
func isNotDigit(c byte) bool { return !isDigit(c) }

// order is dpkg's weight of one character of a non-digit run; end of string is 0.
func order(c byte) int {
	switch {
	case c == '~':
		return -1
	case isDigit(c):
		return 0
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z':
		return int(c)
	default:
		return int(c) + 256
	}
}

func compareLexical(a, b string) int {
	for i := 0; i < len(a) || i < len(b); i++ {
		var oa, ob int
		if i < len(a) {
			oa = order(a[i])
		}
		if i < len(b) {
			ob = order(b[i])
		}
		if oa != ob {
			return sign(oa - ob)
		}
	}
	return 0
}

func compareNum(a, b string) int {
	a = strings.TrimLeft(a, "0")
	b = strings.TrimLeft(b, "0")
	if len(a) != len(b) {
		return sign(len(a) - len(b))
	}
	return strings.Compare(a, b)
}

func sign(n int) int {
	switch {
	case n < 0:
		return -1
	case n > 0:
		return 1
	}
	return 0
}
