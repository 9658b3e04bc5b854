package report

import (
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/servicepath/servicepath/vmtests/internal/vm"
)

var update = flag.Bool("update", false, "rewrite testdata/README.golden.md")

func TestRender(t *testing.T) {
	results, err := Load("testdata/results")
	if err != nil {
		t.Fatal(err)
	}
	got := Render(Sorted(results))
	golden := "testdata/README.golden.md"
	if *update {
		if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if got != string(want) {
		t.Errorf("rendered matrix differs from %s (go test -update to accept):\n%s", golden, got)
	}
}

func TestCount(t *testing.T) {
	results, err := Load("testdata/results")
	if err != nil {
		t.Fatal(err)
	}
	got := Count(results["testdata/results/5.10.1.json"])
	// TestFail fails; example.com/q crashed in TestCrash, which never ended.
	if want := (Counts{Pass: 1, Fail: 2, Skip: 1}); got != want {
		t.Errorf("counts of 5.10.1: got %+v, want %+v", got, want)
	}
	got = Count(results["testdata/results/6.12.2.json"])
	// example.com/q never ran: one failure for the binary.
	if want := (Counts{Pass: 3, Fail: 1}); got != want {
		t.Errorf("counts of 6.12.2: got %+v, want %+v", got, want)
	}
}

func TestSettle(t *testing.T) {
	evs := []Event{
		{Action: "run", Package: "p", Test: "TestA"},
		{Action: "pass", Package: "p", Test: "TestA"},
		{Action: "pass", Package: "p"},
	}
	if got := settle("p", &vm.Run{Ended: true}, evs); !reflect.DeepEqual(got, evs) {
		t.Errorf("a clean exit keeps test2json's events, got %+v", got)
	}
	got := settle("p", &vm.Run{Ended: true, Exit: 1}, evs)
	want := []Event{
		evs[0], evs[1],
		{Action: "output", Package: "p", Output: "vmtest: binary exited with code 1\n"},
		{Action: "fail", Package: "p"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("a non-zero exit fails the package:\n got %+v\nwant %+v", got, want)
	}
}

func TestWriteReplacesSeries(t *testing.T) {
	dir := t.TempDir()
	for _, h := range []Header{
		{Series: "6.12", Version: "6.12.1"},
		{Series: "6.1", Version: "6.1.5"},
		{Series: "6.12", Version: "6.12.2"},
	} {
		if _, err := Write(dir, Result{Header: h, Events: []Event{{Action: "pass", Package: "p"}}}); err != nil {
			t.Fatal(err)
		}
	}
	files, _ := filepath.Glob(filepath.Join(dir, "*.json"))
	want := []string{filepath.Join(dir, "6.1.5.json"), filepath.Join(dir, "6.12.2.json")}
	if !reflect.DeepEqual(files, want) {
		t.Errorf("one file per series, the newest run: got %v, want %v", files, want)
	}
	res, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if r := res[want[1]]; r.Header.Version != "6.12.2" || len(r.Events) != 1 {
		t.Errorf("round trip of 6.12.2: %+v", r)
	}
}
