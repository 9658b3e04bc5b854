// Package smoketest is vmtest's canary: its tests check inside each guest
// that the runner gives tests a working BPF and netlink environment.
package smoketest
