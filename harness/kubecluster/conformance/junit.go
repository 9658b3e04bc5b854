package conformance

import (
	"encoding/xml"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
)

// Outcome of one test in one mode.
type Outcome string

const (
	Pass Outcome = "pass"
	Fail Outcome = "fail"
	Skip Outcome = "skip"
)

// Case is one test's result, as e2e.test's JUnit report says.
type Case struct {
	Name    string  `json:"name"`
	Outcome Outcome `json:"outcome"`
	// Reason is the failure's or skip's first line.
	Reason  string  `json:"reason,omitempty"`
	Seconds float64 `json:"seconds"`
}

type junitSuites struct {
	Suites []junitSuite `xml:"testsuite"`
}

type junitSuite struct {
	Cases []junitCase `xml:"testcase"`
}

type junitCase struct {
	Name    string        `xml:"name,attr"`
	Time    float64       `xml:"time,attr"`
	Status  string        `xml:"status,attr"`
	Skipped *junitMessage `xml:"skipped"`
	Failure *junitMessage `xml:"failure"`
	Error   *junitMessage `xml:"error"`
}

type junitMessage struct {
	Message string `xml:"message,attr"`
	Text    string `xml:",chardata"`
}

// ReadJUnit reads every junit_*.xml e2e.test wrote into dir (one per
// parallel process), leaving out the suite's setup and teardown nodes.
func ReadJUnit(dir string) ([]Case, error) {
	files, err := filepath.Glob(filepath.Join(dir, "junit_*.xml"))
	if err != nil {
		return nil, err
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("no junit_*.xml in %s: did e2e.test run?", dir)
	}
	var cases []Case
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		cs, err := parseJUnit(b)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		cases = append(cases, cs...)
	}
	sort.Slice(cases, func(i, j int) bool { return cases[i].Name < cases[j].Name })
	return cases, nil
}

func parseJUnit(b []byte) ([]Case, error) {
	var suites junitSuites
	if err := xml.Unmarshal(b, &suites); err != nil {
		// A report of a single suite has no <testsuites> wrapper.
		var one junitSuite
		if err2 := xml.Unmarshal(b, &one); err2 != nil {
			return nil, err
		}
		suites.Suites = []junitSuite{one}
	}
	var cases []Case
	for _, s := range suites.Suites {
		for _, tc := range s.Cases {
			// Ginkgo's suite-level nodes ([SynchronizedBeforeSuite], [ReportAfterSuite] ...).
			if kind, _, _ := strings.Cut(tc.Name, " "); strings.HasSuffix(kind, "Suite]") {
				continue
			}
			c := Case{Name: strings.TrimPrefix(tc.Name, "[It] "), Outcome: Pass, Seconds: tc.Time}
			switch {
			case tc.Failure != nil:
				c.Outcome, c.Reason = Fail, firstLine(tc.Failure.Message, tc.Failure.Text)
			case tc.Error != nil:
				c.Outcome, c.Reason = Fail, firstLine(tc.Error.Message, tc.Error.Text)
			case tc.Skipped != nil:
				c.Outcome, c.Reason = Skip, firstLine(tc.Skipped.Message, tc.Skipped.Text)
			}
			cases = append(cases, c)
		}
	}
	return cases, nil
}

// kubectlFailure is e2e's message for a failed kubectl command: the binary
// and connection flags, which say nothing, then what was run.
var kubectlFailure = regexp.MustCompile(`^error running \S*kubectl (?:--server=\S+ )?(?:--kubeconfig=\S+ )?(.*?):?$`)

// kubectlReason says what a failed kubectl ran and how it ended (the last
// line of its stderr or error), instead of its binary's path.
func kubectlReason(first, text string) string {
	m := kubectlFailure.FindStringSubmatch(first)
	if m == nil {
		return ""
	}
	reason := "kubectl " + m[1]
	lines := strings.Split(text, "\n")
	for i := len(lines) - 1; i > 0; i-- {
		if l := strings.TrimSpace(lines[i]); l != "" && !strings.HasPrefix(l, "In [It] at:") && l != "error:" && l != first {
			reason += ": " + l
			break
		}
	}
	return reason
}

// firstLine is the first non-empty line of the texts, shortened for a table.
func firstLine(texts ...string) string {
	for _, t := range texts {
		for _, line := range strings.Split(t, "\n") {
			line = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), "skipped -"))
			if line == "" || line == "[FAILED]" || line == "[SKIPPED]" {
				continue
			}
			line = strings.TrimPrefix(line, "[FAILED] ")
			line = strings.TrimPrefix(line, "[SKIPPED] ")
			if r := kubectlReason(line, t); r != "" {
				line = r
			}
			if len(line) > 200 {
				line = line[:200] + "…"
			}
			return line
		}
	}
	return ""
}
