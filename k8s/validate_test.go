package k8s

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/servicepath/servicepath/harness/kubeapi"
)

func TestMain(m *testing.M) { kubeapi.RunTests(m) }

// corpusCase is one file of testdata/validation: one object, whose
// comments say what servicepath does with it ("# want: ok", or the field
// path it refuses) and, where the API server differs on purpose,
// "# apiserver: accepts" or "# apiserver: refuses".
type corpusCase struct {
	path      string
	want      string
	apiserver string // "" when it agrees with servicepath
}

func readCorpus(t *testing.T) []corpusCase {
	t.Helper()
	paths, err := filepath.Glob("testdata/validation/*.yaml")
	require.NoError(t, err, "listing the corpus")
	require.NotEmpty(t, paths, "the corpus")
	var cases []corpusCase
	for _, p := range paths {
		f, err := os.Open(p)
		require.NoError(t, err, "opening %s", p)
		c := corpusCase{path: p}
		for s := bufio.NewScanner(f); s.Scan() && strings.HasPrefix(s.Text(), "#"); {
			if v, ok := strings.CutPrefix(s.Text(), "# want: "); ok {
				c.want = v
			}
			if v, ok := strings.CutPrefix(s.Text(), "# apiserver: "); ok {
				c.apiserver = v
			}
		}
		f.Close()
		require.NotEmpty(t, c.want, "%s has no '# want:' line", p)
		cases = append(cases, c)
	}
	return cases
}

// checkManifest is what `servicepath apply` checks before it writes a map.
func checkManifest(path string) error {
	objs, err := ReadManifests(path)
	if err != nil {
		return err
	}
	if _, err := Translate(objs.Services, objs.EndpointSlices); err != nil {
		return err
	}
	_, err = TranslatePods(Options{}, objs.Pods)
	return err
}

// mentions says whether a servicepath error names field path f.
func mentions(err error, f string) bool {
	return strings.Contains(err.Error(), ": "+f+": ")
}

func TestValidationCorpus(t *testing.T) {
	for _, c := range readCorpus(t) {
		t.Run(filepath.Base(c.path), func(t *testing.T) {
			err := checkManifest(c.path)
			if c.want == "ok" {
				assert.NoError(t, err, "%s is valid", c.path)
				return
			}
			require.Error(t, err, "%s must be refused at %s", c.path, c.want)
			assert.True(t, mentions(err, c.want), "%s: the error names %s:\n%v", c.path, c.want, err)
			assert.True(t, strings.HasPrefix(err.Error(), c.path+": document 1: "), "%s: the error names the document:\n%v", c.path, err)
		})
	}
}

// TestValidationMatchesAPIServer creates each corpus object on a real
// kube-apiserver with dry run and strict field validation, as `kubectl
// apply` would, and checks that servicepath refuses exactly what the API
// server refuses, naming the fields it names. The raw manifest is posted
// (a typed client would rewrite apiVersion and drop unknown fields).
func TestValidationMatchesAPIServer(t *testing.T) {
	srv := kubeapi.Shared(t)
	cs, err := kubernetes.NewForConfig(srv.Config)
	require.NoError(t, err, "client")
	ctx := t.Context()
	// The corpus's controls use this namespace besides default.
	_, err = cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop-1"}}, metav1.CreateOptions{})
	if !apierrors.IsAlreadyExists(err) {
		require.NoError(t, err, "creating namespace shop-1")
	}

	cases := readCorpus(t)
	agree, deliberate := 0, 0
	for _, c := range cases {
		t.Run(filepath.Base(c.path), func(t *testing.T) {
			apiErr := dryRunCreate(ctx, t, cs, c.path)
			ours := checkManifest(c.path)
			switch c.apiserver {
			case "accepts":
				deliberate++
				assert.NoError(t, apiErr, "the API server accepts %s (servicepath differs on purpose)", c.path)
				return
			case "refuses":
				deliberate++
				assert.Error(t, apiErr, "the API server refuses %s (servicepath differs on purpose)", c.path)
				return
			}
			if apiErr == nil {
				assert.NoError(t, ours, "the API server accepts %s", c.path)
			} else {
				assert.Error(t, ours, "the API server refuses %s: %v", c.path, apiErr)
			}
			var st apierrors.APIStatus
			if ours != nil && errors.As(apiErr, &st) && st.Status().Details != nil {
				for _, cause := range st.Status().Details.Causes {
					assert.True(t, mentions(ours, cause.Field), "%s: the API server names %s (%v); servicepath says:\n%v", c.path, cause.Field, apiErr, ours)
				}
			}
			if !t.Failed() {
				agree++
			}
		})
	}
	t.Logf("servicepath and kube-apiserver %s agree on %d of %d manifests; %d differ on purpose", kubeapi.KubernetesVersion, agree, len(cases), deliberate)
}

// dryRunCreate posts the one object in path to the API server, in its
// namespace or default, with dryRun=All and fieldValidation=Strict.
func dryRunCreate(ctx context.Context, t *testing.T, cs *kubernetes.Clientset, path string) error {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err, "reading %s", path)
	js, err := yaml.YAMLToJSON(data)
	require.NoError(t, err, "converting %s", path)
	var h header
	require.NoError(t, yaml.Unmarshal(js, &h), "header of %s", path)
	req := cs.CoreV1().RESTClient().Post().Resource("services")
	if h.Kind == "EndpointSlice" {
		req = cs.DiscoveryV1().RESTClient().Post().Resource("endpointslices")
	}
	return req.Namespace(cmp.Or(h.Metadata.Namespace, metav1.NamespaceDefault)).
		Param("dryRun", metav1.DryRunAll).Param("fieldValidation", "Strict").
		Body(js).Do(ctx).Error()
}
