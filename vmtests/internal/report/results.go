// Package report turns guest console output into test2json results files and
// renders the kernel matrix README from them.
package report

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/servicepath/servicepath/vmtests/internal/debian"
	"github.com/servicepath/servicepath/vmtests/internal/vm"
)

// Event is a test2json event.
type Event struct {
	Time        *time.Time `json:",omitempty"`
	Action      string
	Package     string   `json:",omitempty"`
	Test        string   `json:",omitempty"`
	Elapsed     *float64 `json:",omitempty"`
	Output      string   `json:",omitempty"`
	FailedBuild string   `json:",omitempty"`
}

// Binary is how one test binary ended in the guest.
type Binary struct {
	Package string
	Exit    int
	Ended   bool // false: not started, or the VM ended mid-run
}

// Header is the first line of a results file: what produced it.
type Header struct {
	Series        string
	Version       string
	Release       string
	Packages      []debian.Package
	Busybox       string
	QEMU          string
	Accel         string
	Cmdline       string
	Date          string
	Commit        string
	Go            string
	Booted        bool
	Finished      bool
	Problem       string   `json:",omitempty"` // why the VM did not finish, if it did not
	ModulesAbsent []string `json:",omitempty"`
	ModulesFailed []string `json:",omitempty"`
	WallSeconds   float64
	Binaries      []Binary
}

// Result is one kernel's results file.
type Result struct {
	Header Header
	Events []Event
}

// Events converts the guest runs of every expected package to test2json
// events with `go tool test2json`. A binary that exited non-zero, died, or
// never ran gets a package-level fail event, whatever its output said.
func Events(packages []string, runs []*vm.Run, notRun string) ([]Event, []Binary, error) {
	byPkg := map[string]*vm.Run{}
	for _, r := range runs {
		byPkg[r.Package] = r
	}
	var events []Event
	var bins []Binary
	for _, pkg := range packages {
		r := byPkg[pkg]
		if r == nil {
			bins = append(bins, Binary{Package: pkg, Exit: -1})
			events = append(events,
				Event{Action: "output", Package: pkg, Output: "vmtest: not run: " + notRun + "\n"},
				Event{Action: "fail", Package: pkg})
			continue
		}
		bins = append(bins, Binary{Package: pkg, Exit: r.Exit, Ended: r.Ended})
		evs, err := test2json(pkg, r.Output)
		if err != nil {
			return nil, nil, err
		}
		events = append(events, settle(pkg, r, evs)...)
	}
	return events, bins, nil
}

func test2json(pkg string, output []string) ([]Event, error) {
	cmd := exec.Command("go", "tool", "test2json", "-p", pkg)
	cmd.Stdin = strings.NewReader(strings.Join(output, "\n") + "\n")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("go tool test2json -p %s: %w: %s", pkg, err, stderr.String())
	}
	return parseEvents(out)
}

func parseEvents(data []byte) ([]Event, error) {
	var events []Event
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, 16<<20)
	for sc.Scan() {
		var e Event
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			return nil, fmt.Errorf("test2json event %q: %w", sc.Text(), err)
		}
		events = append(events, e)
	}
	return events, sc.Err()
}

// settle makes the package's final event agree with how the binary ended.
func settle(pkg string, r *vm.Run, evs []Event) []Event {
	var why string
	switch {
	case !r.Ended:
		why = "vmtest: binary did not finish (VM timed out or crashed)\n"
	case r.Exit != 0:
		why = fmt.Sprintf("vmtest: binary exited with code %d\n", r.Exit)
		for _, line := range r.Output {
			if strings.HasPrefix(line, "panic: test timed out") {
				why = "vmtest: " + strings.TrimPrefix(line, "panic: ") + "\n"
			}
		}
	default:
		return evs
	}
	var kept []Event
	for _, e := range evs {
		if e.Test == "" && (e.Action == "pass" || e.Action == "fail" || e.Action == "skip") {
			continue
		}
		kept = append(kept, e)
	}
	return append(kept, Event{Action: "output", Package: pkg, Output: why}, Event{Action: "fail", Package: pkg})
}

// Write stores res as dir/<version>.json and removes older results of the
// same series, so each series has one column in the matrix.
func Write(dir string, res Result) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	old, err := Load(dir)
	if err != nil {
		return "", err
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(struct{ Header Header }{res.Header}); err != nil {
		return "", err
	}
	for _, e := range res.Events {
		if err := enc.Encode(e); err != nil {
			return "", err
		}
	}
	path := filepath.Join(dir, res.Header.Version+".json")
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		return "", err
	}
	for file, o := range old {
		if o.Header.Series == res.Header.Series && file != path {
			os.Remove(file)
		}
	}
	return path, nil
}

// Load reads every results file in dir, keyed by path.
func Load(dir string) (map[string]Result, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil {
		return nil, err
	}
	out := map[string]Result{}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		first, rest, _ := bytes.Cut(data, []byte("\n"))
		var h struct{ Header Header }
		if err := json.Unmarshal(first, &h); err != nil {
			return nil, fmt.Errorf("%s: header: %w", f, err)
		}
		events, err := parseEvents(rest)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		out[f] = Result{Header: h.Header, Events: events}
	}
	return out, nil
}

// Sorted returns results ordered by kernel version.
func Sorted(m map[string]Result) []Result {
	var out []Result
	for _, r := range m {
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool {
		return debian.CompareVersions(out[i].Header.Version, out[j].Header.Version) < 0
	})
	return out
}
