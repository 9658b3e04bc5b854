package k8s

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/util/validation/field"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	k8sjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// Objects are the Kubernetes objects read from manifests.
type Objects struct {
	Services       []*corev1.Service
	EndpointSlices []*discoveryv1.EndpointSlice
	// Pods are read for their hostPorts (TranslatePods).
	Pods []*corev1.Pod
	// Ignored lists objects of other kinds, e.g.
	// "deploy.yaml: document 2: apps/v1 Deployment default/web".
	Ignored []string
}

// ReadManifests reads Services, EndpointSlices and Pods from YAML or JSON
// files and validates Services and EndpointSlices as the API server does on
// create (validate.go), then as the datapath needs (what Translate checks
// of one object); it returns every error found, each naming its file,
// document, object and field path.
// A directory contributes its *.yaml, *.yml and *.json files, sorted, not
// recursing. Documents are numbered from 1, counting only non-empty ones.
func ReadManifests(paths ...string) (*Objects, error) {
	objs := &Objects{}
	for _, p := range paths {
		files, err := manifestFiles(p)
		if err != nil {
			return nil, err
		}
		for _, f := range files {
			data, err := os.ReadFile(f)
			if err != nil {
				return nil, err
			}
			if err := objs.addFile(f, data); err != nil {
				return nil, err
			}
		}
	}
	return objs, nil
}

// supportedVersions are the apiVersions servicepath reads each kind in,
// the ones a v1.34 API server serves.
var supportedVersions = map[string]string{
	"Service":       "v1",
	"EndpointSlice": "discovery.k8s.io/v1",
	"Pod":           "v1",
	"List":          "v1",
}

func manifestFiles(path string) ([]string, error) {
	info, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if !info.IsDir() {
		return []string{path}, nil
	}
	entries, err := os.ReadDir(path) // sorted by name
	if err != nil {
		return nil, err
	}
	var files []string
	for _, e := range entries {
		switch strings.ToLower(filepath.Ext(e.Name())) {
		case ".yaml", ".yml", ".json":
			if !e.IsDir() {
				files = append(files, filepath.Join(path, e.Name()))
			}
		}
	}
	return files, nil
}

func (o *Objects) addFile(file string, data []byte) error {
	n := 0
	var errs []error
	// kubectl's document reader: "---" lines, comments allowed after them.
	docs := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for {
		doc, err := docs.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("%s: document %d: %w", file, n+1, err)
		}
		// Strict conversion so that duplicate keys are refused.
		js, err := yaml.YAMLToJSONStrict(doc)
		if err != nil {
			return fmt.Errorf("%s: document %d: %w", file, n+1, err)
		}
		if bytes.Equal(js, []byte("null")) {
			continue // empty or comments only
		}
		n++
		errs = append(errs, o.addObject(fmt.Sprintf("%s: document %d", file, n), js))
	}
	return errors.Join(errs...)
}

// header is the part of any object needed to dispatch and name it.
type header struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string `json:"name"`
		Namespace string `json:"namespace"`
	} `json:"metadata"`
}

func (h *header) String() string {
	name := h.Metadata.Name
	if h.Metadata.Namespace != "" {
		name = h.Metadata.Namespace + "/" + name
	}
	return fmt.Sprintf("%s %s %s", h.APIVersion, h.Kind, name)
}

// list is what kubectl prints for "get -o yaml" of several objects.
type list struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   json.RawMessage   `json:"metadata"`
	Items      []json.RawMessage `json:"items"`
}

// addObject decodes one JSON object; where says which file and document
// it came from.
func (o *Objects) addObject(where string, js []byte) error {
	var h header
	if err := json.Unmarshal(js, &h); err != nil {
		return fmt.Errorf("%s: not a Kubernetes object: %w", where, err)
	}
	if h.Kind == "" {
		return fmt.Errorf("%s: kind is missing (metadata.name %q)", where, h.Metadata.Name)
	}
	if h.APIVersion == "" {
		return fmt.Errorf("%s: %s: apiVersion is missing (metadata.name %q)", where, h.Kind, h.Metadata.Name)
	}
	name := objectName(h.Metadata.Namespace, h.Metadata.Name)
	if v, ok := supportedVersions[h.Kind]; ok && h.APIVersion != v {
		// The API server has no such resource: refused, not ignored.
		return fmt.Errorf("%s: %s %s: %v", where, h.Kind, name, field.NotSupported(field.NewPath("apiVersion"), h.APIVersion, []string{v}))
	}
	switch h.Kind {
	case "Service":
		svc := &corev1.Service{}
		if err := decodeStrict(js, svc); err != nil {
			return fmt.Errorf("%s: Service %s: %w", where, name, err)
		}
		if err := fieldErrors(where+": Service "+name, validateService(svc)); err != nil {
			return err
		}
		if skipReason(svc) == "" {
			if _, _, errs := parseService(svc); len(errs) > 0 {
				return prefixed(where, errs)
			}
		}
		o.Services = append(o.Services, svc)
	case "EndpointSlice":
		es := &discoveryv1.EndpointSlice{}
		if err := decodeStrict(js, es); err != nil {
			return fmt.Errorf("%s: EndpointSlice %s: %w", where, name, err)
		}
		if err := fieldErrors(where+": EndpointSlice "+name, validateEndpointSlice(es)); err != nil {
			return err
		}
		if _, errs := parseSlice(es); len(errs) > 0 {
			return prefixed(where, errs)
		}
		o.EndpointSlices = append(o.EndpointSlices, es)
	case "Pod":
		pod := &corev1.Pod{}
		if err := decodeStrict(js, pod); err != nil {
			return fmt.Errorf("%s: Pod %s: %w", where, name, err)
		}
		o.Pods = append(o.Pods, pod)
	case "List":
		var l list
		if err := decodeStrict(js, &l); err != nil {
			return fmt.Errorf("%s: List: %w", where, err)
		}
		var errs []error
		for i, item := range l.Items {
			errs = append(errs, o.addObject(fmt.Sprintf("%s: items[%d]", where, i), item))
		}
		return errors.Join(errs...)
	default:
		o.Ignored = append(o.Ignored, where+": "+h.String())
	}
	return nil
}

// fieldErrors prefixes each error with the object it is about.
func fieldErrors(prefix string, list field.ErrorList) error {
	errs := make([]error, len(list))
	for i, e := range list {
		errs[i] = e
	}
	return prefixed(prefix, errs)
}

// prefixed joins errs, each prefixed.
func prefixed(prefix string, errs []error) error {
	out := make([]error, len(errs))
	for i, e := range errs {
		out[i] = fmt.Errorf("%s: %w", prefix, e)
	}
	return errors.Join(out...)
}

// decodeStrict decodes like the API server's strict field validation:
// field names are case-sensitive and unknown fields are errors, which
// encoding/json (case-insensitive) would let through.
func decodeStrict(js []byte, obj any) error {
	strictErrs, err := k8sjson.UnmarshalStrict(js, obj)
	if err != nil {
		return err
	}
	return errors.Join(strictErrs...)
}
