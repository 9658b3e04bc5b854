package metrics_test

import (
	"bufio"
	"errors"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
	"github.com/servicepath/servicepath/datapath/metrics"
	"github.com/servicepath/servicepath/harness/inject"
	"github.com/servicepath/servicepath/harness/testenv"
)

// enumName is the C enumerator a Go counter name stands for.
func enumName(name string) string { return "METRIC_" + strings.ToUpper(name) }

// headerEnum reads the enumerators of enum metric, in order, from the C
// source: clang drops the enum from BTF because no map or global uses it.
func headerEnum(t *testing.T) []string {
	t.Helper()
	f, err := os.Open("../../bpf/lib/metrics.h")
	require.NoError(t, err, "open bpf/lib/metrics.h")
	defer f.Close()
	re := regexp.MustCompile(`^\s*(METRIC_[A-Z0-9_]+)\s*(=\s*0\s*)?,`)
	var out []string
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "enum metric {"):
			in = true
		case in && strings.HasPrefix(line, "}"):
			in = false
		case in:
			if m := re.FindStringSubmatch(line); m != nil {
				out = append(out, m[1])
			}
		}
	}
	require.NoError(t, sc.Err(), "read bpf/lib/metrics.h")
	return out
}

// Names must follow enum metric: a counter read under the wrong name is
// worse than none. The compiled object is the authority where its BTF has
// the enum; the header source otherwise; and sp_metrics' max_entries
// (METRIC_MAX) always.
func TestNamesFollowEnumMetric(t *testing.T) {
	spec, err := loader.LoadLxc()
	require.NoError(t, err, "read the compiled BPF object")

	ms, ok := spec.Maps[maps.MetricsName]
	require.True(t, ok, "sp_metrics is in the object")
	assert.Equal(t, uint32(len(metrics.Names)), ms.MaxEntries,
		"len(Names) equals sp_metrics' max_entries, METRIC_MAX in the compiled object")

	var enum *btf.Enum
	err = spec.Types.TypeByName("metric", &enum)
	if errors.Is(err, btf.ErrNotFound) {
		t.Log("enum metric is not in the object's BTF: checking order against bpf/lib/metrics.h")
		values := headerEnum(t)
		require.NotEmpty(t, values, "found enum metric's enumerators in bpf/lib/metrics.h")
		require.Equal(t, "METRIC_MAX", values[len(values)-1], "METRIC_MAX is the last enumerator")
		want := make([]string, len(metrics.Names))
		for i, n := range metrics.Names {
			want[i] = enumName(n)
		}
		assert.Equal(t, want, values[:len(values)-1], "Names, upper-cased with METRIC_, are enum metric's enumerators in order")
		return
	}
	require.NoError(t, err, "look up enum metric in BTF")
	t.Log("checking order against enum metric in the object's BTF")
	byName := map[string]uint64{}
	for _, v := range enum.Values {
		byName[v.Name] = v.Value
	}
	for i, n := range metrics.Names {
		v, ok := byName[enumName(n)]
		if assert.True(t, ok, "enum metric has %s for Names[%d]", enumName(n), i) {
			assert.Equal(t, uint64(i), v, "%s is Names[%d]", enumName(n), i)
		}
	}
	assert.Equal(t, uint64(len(metrics.Names)), byName["METRIC_MAX"], "METRIC_MAX equals len(Names)")
}

func TestReadFreshDatapathAllZero(t *testing.T) {
	testenv.RequireRoot(t)
	env, err := inject.NewEnv(inject.Config())
	require.NoError(t, err, "load datapath")
	t.Cleanup(func() { env.Close() })

	got, err := metrics.Read(env.DP.Maps.Metrics)
	require.NoError(t, err, "read counters")
	want := map[string]uint64{}
	for _, n := range metrics.Names {
		want[n] = 0
	}
	assert.Equal(t, want, got, "every named counter is present and zero on a fresh datapath")
}

// Read sums over CPUs under the right name.
func TestReadSumsPerCPU(t *testing.T) {
	testenv.RequireRoot(t)
	env, err := inject.NewEnv(inject.Config())
	require.NoError(t, err, "load datapath")
	t.Cleanup(func() { env.Close() })

	ncpu := ebpf.MustPossibleCPU()
	for i := range metrics.Names {
		perCPU := make([]uint64, ncpu)
		for c := range perCPU {
			perCPU[c] = uint64(i*100 + c + 1)
		}
		require.NoError(t, env.DP.Maps.Metrics.Put(uint32(i), perCPU), "write counter %d", i)
	}
	got, err := metrics.Read(env.DP.Maps.Metrics)
	require.NoError(t, err, "read counters")
	for i, n := range metrics.Names {
		var want uint64
		for c := range ncpu {
			want += uint64(i*100 + c + 1)
		}
		assert.Equal(t, want, got[n], "counter %s (index %d) is the sum over %d CPUs", n, i, ncpu)
	}
}

// A map of another size is refused rather than read under wrong names.
func TestReadRefusesOtherSize(t *testing.T) {
	testenv.RequireRoot(t)
	m, err := ebpf.NewMap(&ebpf.MapSpec{
		Type:       ebpf.PerCPUArray,
		KeySize:    4,
		ValueSize:  8,
		MaxEntries: uint32(len(metrics.Names) + 1),
	})
	require.NoError(t, err, "create a metrics map one counter larger")
	t.Cleanup(func() { m.Close() })
	_, err = metrics.Read(m)
	assert.ErrorContains(t, err, "reload the datapath", "a metrics map of a different size is refused")
}
