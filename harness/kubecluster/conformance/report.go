package conformance

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/servicepath/servicepath/bench"
	"github.com/servicepath/servicepath/harness/kubeapi"
)

// Report is a run's results: every test, in every mode.
type Report struct {
	Stamp      bench.Stamp `json:"stamp"`
	Kubernetes string      `json:"kubernetes"`
	Focus      string      `json:"focus"`
	Skip       string      `json:"skip"`
	Modes      []string    `json:"modes"`
	// ModeErrors are modes whose cluster or suite could not run.
	ModeErrors map[string]string `json:"modeErrors,omitempty"`
	Tests      []Test            `json:"tests"`
}

// Test is one test across the modes.
type Test struct {
	Name    string          `json:"name"`
	Results map[string]Case `json:"results"`
	// Note explains a difference between modes that is not servicepath's
	// to fix, or names the bug that is.
	Note string `json:"note,omitempty"`
}

// Notes explain known outcomes, by test name pattern. A failure in every
// mode is the harness's or the environment's, not a proxy's. Empty while
// servicepath passes all that kube-proxy passes; add the named bug or the
// reason here when a run shows an exception.
var Notes = []struct {
	Pattern *regexp.Regexp
	Note    string
}{}

// NewReport joins each mode's cases into one table.
func NewReport(o Options, results map[string][]Case, errs map[string]error, repo string) *Report {
	r := &Report{Stamp: bench.NewStamp(repo), Kubernetes: kubeapi.KubernetesVersion, Focus: o.Focus, Skip: o.Skip, ModeErrors: map[string]string{}}
	byName := map[string]*Test{}
	for _, m := range o.Modes {
		r.Modes = append(r.Modes, m.Name)
		if err := errs[m.Name]; err != nil {
			r.ModeErrors[m.Name] = err.Error()
		}
		for _, c := range results[m.Name] {
			t := byName[c.Name]
			if t == nil {
				t = &Test{Name: c.Name, Results: map[string]Case{}}
				byName[c.Name] = t
			}
			t.Results[m.Name] = c
		}
	}
	for _, t := range byName {
		for _, n := range Notes {
			if n.Pattern.MatchString(t.Name) {
				t.Note = n.Note
			}
		}
		r.Tests = append(r.Tests, *t)
	}
	sort.Slice(r.Tests, func(i, j int) bool { return r.Tests[i].Name < r.Tests[j].Name })
	return r
}

// Ran drops the tests skipped in every mode (the suite's own skips), which
// would only lengthen the table.
func (r *Report) Ran() []Test {
	var ran []Test
	for _, t := range r.Tests {
		for _, c := range t.Results {
			if c.Outcome != Skip {
				ran = append(ran, t)
				break
			}
		}
	}
	return ran
}

// Failed lists "test (mode): reason" of every failure.
func (r *Report) Failed() []string {
	var failed []string
	for _, t := range r.Tests {
		for _, m := range r.Modes {
			if c, ok := t.Results[m]; ok && c.Outcome == Fail {
				failed = append(failed, fmt.Sprintf("%s (%s): %s", t.Name, m, c.Reason))
			}
		}
	}
	return failed
}

// ReadReport reads the results.json Write wrote into dir.
func ReadReport(dir string) (*Report, error) {
	b, err := os.ReadFile(filepath.Join(dir, "results.json"))
	if err != nil {
		return nil, err
	}
	var r Report
	return &r, json.Unmarshal(b, &r)
}

// Write writes results.json and README.md into dir.
func (r *Report) Write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "results.json"), append(b, '\n'), 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "README.md"), []byte(r.Markdown()), 0o644)
}

var symbol = map[Outcome]string{Pass: "pass", Fail: "**FAIL**", Skip: "skip"}

// Markdown is the table: a row per test that ran somewhere, a column per
// mode, and the failures' reasons below it.
func (r *Report) Markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "# Upstream e2e network tests, by service proxy\n\n")
	fmt.Fprintf(&b, "Kubernetes %s e2e.test against the one-machine cluster of harness/kubecluster (`make conformance`).\n", r.Kubernetes)
	fmt.Fprintf(&b, "Kernel %s, %s (%d CPUs), commit %s, %s.\n\n", r.Stamp.Kernel, r.Stamp.CPUModel, r.Stamp.NumCPU, r.Stamp.Commit, r.Stamp.Date)
	fmt.Fprintf(&b, "Focus `%s`, skip `%s`.\n\n", r.Focus, r.Skip)
	ran := r.Ran()
	totals := map[string]map[Outcome]int{}
	for _, m := range r.Modes {
		totals[m] = map[Outcome]int{}
		for _, t := range ran {
			if c, ok := t.Results[m]; ok {
				totals[m][c.Outcome]++
			}
		}
	}
	b.WriteString("| mode | pass | fail | skip |\n|---|---|---|---|\n")
	for _, m := range r.Modes {
		note := ""
		if e := r.ModeErrors[m]; e != "" {
			note = " (did not run to the end: " + firstLine(e) + ")"
		}
		fmt.Fprintf(&b, "| %s%s | %d | %d | %d |\n", m, note, totals[m][Pass], totals[m][Fail], totals[m][Skip])
	}
	b.WriteString("\n| test | " + strings.Join(r.Modes, " | ") + " | note |\n|---|")
	b.WriteString(strings.Repeat("---|", len(r.Modes)+1) + "\n")
	var reasons []string
	for _, t := range ran {
		fmt.Fprintf(&b, "| %s |", strings.ReplaceAll(t.Name, "|", `\|`))
		for _, m := range r.Modes {
			c, ok := t.Results[m]
			switch {
			case !ok:
				b.WriteString(" — |")
			default:
				fmt.Fprintf(&b, " %s |", symbol[c.Outcome])
				if c.Outcome == Fail {
					reasons = append(reasons, fmt.Sprintf("- %s, %s: %s", t.Name, m, c.Reason))
				}
			}
		}
		fmt.Fprintf(&b, " %s |\n", t.Note)
	}
	if len(reasons) > 0 {
		b.WriteString("\n## Failures\n\n" + strings.Join(reasons, "\n") + "\n")
	}
	return b.String()
}
