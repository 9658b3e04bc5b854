package k8s

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// names lists "namespace/name" of what was read, as the objects say it.
func names(o *Objects) (svcs, slices []string) {
	for _, s := range o.Services {
		svcs = append(svcs, s.Namespace+"/"+s.Name)
	}
	for _, s := range o.EndpointSlices {
		slices = append(slices, s.Namespace+"/"+s.Name)
	}
	return svcs, slices
}

func TestReadManifests(t *testing.T) {
	tests := []struct {
		name        string
		paths       []string
		wantSvcs    []string
		wantSlices  []string
		wantIgnored []string
	}{
		{
			name:       "multi-document with empty documents and other kinds",
			paths:      []string{"testdata/multi.yaml"},
			wantSvcs:   []string{"/web"},
			wantSlices: []string{"/web-abc"},
			wantIgnored: []string{
				"testdata/multi.yaml: document 2: apps/v1 Deployment default/web",
				"testdata/multi.yaml: document 4: v1 Namespace apps",
			},
		},
		{
			name:        "kubectl List",
			paths:       []string{"testdata/list.yaml"},
			wantSvcs:    []string{"shop/web"},
			wantSlices:  []string{"shop/web-x7k2p"},
			wantIgnored: []string{"testdata/list.yaml: document 1: items[2]: v1 Endpoints shop/web"},
		},
		{
			name:        "directory: manifest extensions only, sorted, not recursive",
			paths:       []string{"testdata/dir"},
			wantSvcs:    []string{"/a"},
			wantSlices:  []string{"/a-1"},
			wantIgnored: []string{filepath.Join("testdata", "dir", "b.yml") + ": document 1: v1 ConfigMap b"},
		},
		{
			name:        "several paths, in the order given",
			paths:       []string{"testdata/list.yaml", "testdata/dir/a.yaml"},
			wantSvcs:    []string{"shop/web", "/a"},
			wantSlices:  []string{"shop/web-x7k2p"},
			wantIgnored: []string{"testdata/list.yaml: document 1: items[2]: v1 Endpoints shop/web"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			objs, err := ReadManifests(tt.paths...)
			require.NoError(t, err, "reading %v", tt.paths)
			svcs, slices := names(objs)
			assert.Equal(t, tt.wantSvcs, svcs, "services read from %v", tt.paths)
			assert.Equal(t, tt.wantSlices, slices, "EndpointSlices read from %v", tt.paths)
			assert.Equal(t, tt.wantIgnored, objs.Ignored, "ignored objects of %v", tt.paths)
		})
	}
}

func TestReadManifestsDecodesFields(t *testing.T) {
	objs, err := ReadManifests("testdata/list.yaml")
	require.NoError(t, err, "reading the List")
	require.Len(t, objs.Services, 1, "one Service in the List")
	require.Len(t, objs.EndpointSlices, 1, "one EndpointSlice in the List")
	svc, es := objs.Services[0], objs.EndpointSlices[0]
	assert.Equal(t, []string{"10.96.0.20"}, svc.Spec.ClusterIPs, "clusterIPs decoded")
	assert.Equal(t, "http", svc.Spec.Ports[0].TargetPort.String(), "named targetPort decoded")
	require.Len(t, es.Endpoints, 1, "one endpoint")
	assert.Equal(t, []string{"10.0.1.5"}, es.Endpoints[0].Addresses, "endpoint address decoded")
	require.NotNil(t, es.Endpoints[0].Conditions.Ready, "ready condition decoded")
	assert.True(t, *es.Endpoints[0].Conditions.Ready, "ready condition value")
}

func TestReadManifestsErrors(t *testing.T) {
	const svcHead = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\n"
	tests := []struct {
		name    string
		content string
		want    string // the whole message; the file is called bad.yaml
	}{
		{
			name:    "unknown field",
			content: svcHead + "spec:\n  clusterIP: 10.96.0.1\n  clusterIPz: [10.96.0.1]\n",
			want:    `bad.yaml: document 1: Service shop/web: unknown field "spec.clusterIPz"`,
		},
		{
			name:    "field misspelled only in case",
			content: svcHead + "spec:\n  clusterIp: 10.96.0.1\n",
			want:    `bad.yaml: document 1: Service shop/web: unknown field "spec.clusterIp"`,
		},
		{
			name: "unknown field in the second document",
			content: "---\n# empty\n---\n" + svcHead + "spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\n" +
				"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1}\naddressType: IPv4\nendpoints: [{adresses: [10.0.0.1]}]\n",
			want: `bad.yaml: document 2: EndpointSlice default/web-1: unknown field "endpoints[0].adresses"`,
		},
		{
			name:    "wrong type",
			content: svcHead + "spec:\n  ports: [{port: eighty}]\n",
			want:    `bad.yaml: document 1: Service shop/web: json: cannot unmarshal string into Go struct field ServicePort.spec.ports.port of type int32`,
		},
		{
			name:    "duplicate key",
			content: svcHead + "spec:\n  clusterIP: 10.96.0.1\n  clusterIP: 10.96.0.2\n",
			want:    "bad.yaml: document 1: yaml: unmarshal errors:\n  line 8: key \"clusterIP\" already set in map",
		},
		{
			name:    "apiVersion the API server does not serve",
			content: "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: web-1}\naddressType: IPv4\n",
			want:    `bad.yaml: document 1: EndpointSlice default/web-1: apiVersion: Unsupported value: "discovery.k8s.io/v1beta1": supported values: "discovery.k8s.io/v1"`,
		},
		{
			name: "invalid fields in two documents, all reported",
			content: svcHead + "spec: {clusterIP: 10.96.0.1, ports: [{port: 80, targetPort: 70000}]}\n---\n" +
				"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: Web_1, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\n",
			want: "bad.yaml: document 1: Service shop/web: spec.ports[0].targetPort: Invalid value: 70000: must be between 1 and 65535, inclusive\n" +
				`bad.yaml: document 2: EndpointSlice default/Web_1: metadata.name: Invalid value: "Web_1": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')`,
		},
		{
			name:    "no kind",
			content: "apiVersion: v1\nmetadata: {name: web}\n",
			want:    `bad.yaml: document 1: kind is missing (metadata.name "web")`,
		},
		{
			name:    "no apiVersion",
			content: "kind: Service\nmetadata: {name: web}\n",
			want:    `bad.yaml: document 1: Service: apiVersion is missing (metadata.name "web")`,
		},
		{
			name:    "not an object",
			content: "just a string\n",
			want:    "bad.yaml: document 1: not a Kubernetes object: json: cannot unmarshal string into Go value of type k8s.header",
		},
		{
			name: "bad List item",
			content: "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: c}\n" +
				"- apiVersion: v1\n  kind: Service\n  metadata: {name: web}\n  spec: {clusterIPs: 10.96.0.1}\n",
			want: `bad.yaml: document 1: items[1]: Service default/web: json: cannot unmarshal string into Go struct field ServiceSpec.spec.clusterIPs of type []string`,
		},
		{
			name:    "unknown field in a List",
			content: "apiVersion: v1\nkind: List\nitem: []\n",
			want:    `bad.yaml: document 1: List: unknown field "item"`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "bad.yaml")
			require.NoError(t, os.WriteFile(path, []byte(tt.content), 0o644), "writing the manifest")
			objs, err := ReadManifests(path)
			require.Error(t, err, "reading a bad manifest must fail")
			assert.Nil(t, objs, "no objects on error")
			assert.Equal(t, tt.want, strings.ReplaceAll(err.Error(), filepath.Dir(path)+string(filepath.Separator), ""), "error message")
		})
	}
}

func TestReadManifestsMissingPath(t *testing.T) {
	_, err := ReadManifests("testdata/does-not-exist.yaml")
	assert.ErrorIs(t, err, os.ErrNotExist, "a missing file is reported")
}

// Documents are split as kubectl splits them: at "---" lines, which may
// carry a comment, with CRLF line ends, not at dashes inside a value;
// "---" followed by anything else is refused, naming the file.
func TestDocumentSeparators(t *testing.T) {
	const cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: %s}\ndata:\n  a: |\n    ---x\n"
	doc := func(name string) string { return fmt.Sprintf(cm, name) }
	tests := []struct {
		name, in string
		want     []string
	}{
		{"leading separator", "---\n" + doc("a"), []string{"document 1: v1 ConfigMap a"}},
		{"separator with comment", doc("a") + "--- # next\n" + doc("b"),
			[]string{"document 1: v1 ConfigMap a", "document 2: v1 ConfigMap b"}},
		{"CRLF", strings.ReplaceAll(doc("a")+"---\n"+doc("b"), "\n", "\r\n"),
			[]string{"document 1: v1 ConfigMap a", "document 2: v1 ConfigMap b"}},
		{"empty documents are not counted", doc("a") + "---\n---\n# only a comment\n---\n" + doc("b"),
			[]string{"document 1: v1 ConfigMap a", "document 2: v1 ConfigMap b"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "m.yaml")
			require.NoError(t, os.WriteFile(file, []byte(tt.in), 0o644), "write manifest")
			o, err := ReadManifests(file)
			require.NoError(t, err, "read %q", tt.in)
			var want []string
			for _, w := range tt.want {
				want = append(want, file+": "+w)
			}
			assert.Equal(t, want, o.Ignored, "documents of %q", tt.in)
		})
	}

	file := filepath.Join(t.TempDir(), "bad.yaml")
	require.NoError(t, os.WriteFile(file, []byte(doc("a")+"---x: 1\n"), 0o644), "write manifest")
	_, err := ReadManifests(file)
	require.Error(t, err, "--- followed by content")
	assert.Contains(t, err.Error(), file+": document 1: invalid Yaml document separator", "names the file and the document")
}
