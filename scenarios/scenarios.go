// Package scenarios holds the conntrack and agent-scale experiments, one
// package each (collision, lruscale, zones, sockstate, churn, agentscale). Each has a
// small form that runs in `go test ./...` and a full form
// (`-scenario.full`, or `make scenarios`) that writes
// results/scenarios/<name>/: JSON, Markdown with a verdict, and SVG where
// a curve helps, stamped with kernel, CPU and commit by bench.NewStamp.
package scenarios

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/servicepath/servicepath/bench"
	"github.com/servicepath/servicepath/bench/plot"
)

var (
	full = flag.Bool("scenario.full", false, "run the scenarios' full forms and write results/scenarios/")
	out  = flag.String("scenario.out", "", "where full forms write (default: <repo>/results/scenarios)")
)

// Full says whether the full form was asked for.
func Full() bool { return *full }

// SkipUnlessFull skips a full form unless -scenario.full is given.
func SkipUnlessFull(t *testing.T) {
	t.Helper()
	if !*full {
		t.Skip("full form: run with -scenario.full (make scenarios)")
	}
}

// RepoRoot is the directory holding go.mod, found upwards from the
// working directory.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod above the working directory")
		}
		dir = parent
	}
}

// Report is one scenario run.
type Report struct {
	Name  string      `json:"name"`
	Title string      `json:"title"`
	Stamp bench.Stamp `json:"stamp"`
	// Settings are the knobs the run used.
	Settings map[string]any `json:"settings"`
	// Pass says whether the verdict's bound held.
	Pass        bool    `json:"pass"`
	Verdict     string  `json:"verdict"`
	WallSeconds float64 `json:"wall_seconds"`
	Data        any     `json:"data"`
}

// Write puts r into dir/<name>/: <name>.json, README.md (header, verdict,
// stamp, then body) and the line charts, named by file.
func Write(r Report, body string, charts map[string]plot.Line) (string, error) {
	base := *out
	if base == "" {
		root, err := RepoRoot()
		if err != nil {
			return "", err
		}
		base = filepath.Join(root, "results", "scenarios")
	}
	dir := filepath.Join(base, r.Name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, r.Name+".json"), append(js, '\n'), 0o644); err != nil {
		return "", err
	}
	var names []string
	for file, chart := range charts {
		f, err := os.Create(filepath.Join(dir, file))
		if err != nil {
			return "", err
		}
		werr := chart.Write(f)
		if cerr := f.Close(); werr == nil {
			werr = cerr
		}
		if werr != nil {
			return "", fmt.Errorf("write %s: %w", file, werr)
		}
		names = append(names, file)
	}
	var md strings.Builder
	fmt.Fprintf(&md, "# %s\n\n", r.Title)
	verdict := "FAIL"
	if r.Pass {
		verdict = "PASS"
	}
	fmt.Fprintf(&md, "**Verdict: %s.** %s\n\n", verdict, r.Verdict)
	s := r.Stamp
	fmt.Fprintf(&md, "Kernel %s (%s), %d × %s, commit `%s`, %s, %s; wall time %.1f s.\n\n", s.Kernel, s.Machine, s.NumCPU, s.CPUModel, s.Commit, s.Go, s.Date, r.WallSeconds)
	if len(r.Settings) > 0 {
		keys := make([]string, 0, len(r.Settings))
		for k := range r.Settings {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		md.WriteString("Settings: ")
		for i, k := range keys {
			if i > 0 {
				md.WriteString(", ")
			}
			fmt.Fprintf(&md, "%s=%v", k, r.Settings[k])
		}
		md.WriteString(".\n\n")
	}
	md.WriteString(body)
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(&md, "\n![%s](%s)\n", n, n)
	}
	if err := os.WriteFile(filepath.Join(dir, "README.md"), []byte(md.String()), 0o644); err != nil {
		return "", err
	}
	return dir, nil
}

// Stamp reads what produced a run.
func Stamp() bench.Stamp {
	root, err := RepoRoot()
	if err != nil {
		root = "."
	}
	return bench.NewStamp(root)
}
