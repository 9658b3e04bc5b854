// Package image builds container images as docker-archive tarballs, with no
// registry and no container runtime: `ctr -n k8s.io images import FILE`
// reads them. Builds are reproducible: the same files give the same bytes,
// because every entry has a fixed time, root ownership and a sorted place,
// and the image config has a fixed creation time.
//
// Servicepath builds the agent's image; Cluster builds the images the
// upstream e2e suite runs, tagged as it expects them.
package image

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// epoch is the time of every tar entry and of the image config.
var epoch = time.Unix(0, 0).UTC()

// A File is one entry of an image's file system. Parent directories are
// added as needed (mode 0755).
type File struct {
	Path string      // absolute path in the image
	Mode fs.FileMode // permission bits (and fs.ModeSticky), with fs.ModeDir or fs.ModeSymlink for those kinds
	Data []byte      // contents of a regular file
	Link string      // target of a symlink
}

// A Spec says what one image holds and runs.
type Spec struct {
	Tag        string // e.g. registry.k8s.io/pause:3.10.1
	Files      []File
	Entrypoint []string
	Cmd        []string
	Env        []string // default: PATH of the usual directories
	User       string
}

// Built is an image written to disk.
type Built struct {
	Tag  string
	File string
}

const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Image assembles the spec into a one-layer image for this machine's
// architecture.
func (s Spec) Image() (v1.Image, error) {
	layer, err := layerOf(s.Files)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", s.Tag, err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", s.Tag, err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", s.Tag, err)
	}
	cf = cf.DeepCopy()
	cf.OS = "linux"
	cf.Architecture = runtime.GOARCH
	cf.Created = v1.Time{Time: epoch}
	cf.Config.Entrypoint = s.Entrypoint
	cf.Config.Cmd = s.Cmd
	cf.Config.User = s.User
	cf.Config.Env = s.Env
	if cf.Config.Env == nil {
		cf.Config.Env = []string{defaultPath}
	}
	return mutate.ConfigFile(img, cf)
}

// Write builds the spec and writes it as a docker-archive at file.
func (s Spec) Write(file string) (Built, error) {
	tag, err := name.NewTag(s.Tag, name.StrictValidation)
	if err != nil {
		return Built{}, fmt.Errorf("image tag %q: %w", s.Tag, err)
	}
	img, err := s.Image()
	if err != nil {
		return Built{}, err
	}
	// Written beside and renamed, so an interrupted build never leaves a
	// truncated archive under the real name.
	tmp := file + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return Built{}, err
	}
	defer os.Remove(tmp)
	if err := tarball.Write(tag, img, f); err != nil {
		f.Close()
		return Built{}, fmt.Errorf("write image %s: %w", s.Tag, err)
	}
	if err := f.Close(); err != nil {
		return Built{}, err
	}
	if err := os.Rename(tmp, file); err != nil {
		return Built{}, err
	}
	return Built{Tag: s.Tag, File: file}, nil
}

// layerOf makes the reproducible tar of files: parents added, entries
// sorted by path, owned by root, all at epoch.
func layerOf(files []File) (v1.Layer, error) {
	byPath := map[string]File{}
	add := func(f File) error {
		if old, ok := byPath[f.Path]; ok {
			if old.Mode == f.Mode && old.Link == f.Link && bytes.Equal(old.Data, f.Data) {
				return nil
			}
			if old.Mode.IsDir() && f.Mode.IsDir() {
				return nil
			}
			return fmt.Errorf("%s is given twice, differently", f.Path)
		}
		byPath[f.Path] = f
		return nil
	}
	for _, f := range files {
		if !path.IsAbs(f.Path) || path.Clean(f.Path) != f.Path || f.Path == "/" {
			return nil, fmt.Errorf("file path %q: want an absolute, clean path below /", f.Path)
		}
		if f.Mode&fs.ModeSymlink != 0 && f.Link == "" {
			return nil, fmt.Errorf("symlink %s has no target", f.Path)
		}
		if err := add(f); err != nil {
			return nil, err
		}
		for dir := path.Dir(f.Path); dir != "/"; dir = path.Dir(dir) {
			if err := add(File{Path: dir, Mode: fs.ModeDir | 0o755}); err != nil {
				return nil, err
			}
		}
	}
	paths := make([]string, 0, len(byPath))
	for p := range byPath {
		if dir := path.Dir(p); dir != "/" && !byPath[dir].Mode.IsDir() {
			return nil, fmt.Errorf("%s: its parent %s is not a directory", p, dir)
		}
		paths = append(paths, p)
	}
	slices.Sort(paths)

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, p := range paths {
		f := byPath[p]
		mode := int64(f.Mode.Perm())
		if f.Mode&fs.ModeSticky != 0 {
			mode |= 0o1000 // tar's sticky bit
		}
		hdr := &tar.Header{
			Name:    strings.TrimPrefix(p, "/"),
			Mode:    mode,
			ModTime: epoch,
			Format:  tar.FormatPAX,
		}
		switch {
		case f.Mode.IsDir():
			hdr.Typeflag, hdr.Name = tar.TypeDir, hdr.Name+"/"
		case f.Mode&fs.ModeSymlink != 0:
			hdr.Typeflag, hdr.Linkname, hdr.Mode = tar.TypeSymlink, f.Link, 0o777
		default:
			hdr.Typeflag, hdr.Size = tar.TypeReg, int64(len(f.Data))
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, fmt.Errorf("tar %s: %w", p, err)
		}
		if _, err := tw.Write(f.Data); err != nil {
			return nil, fmt.Errorf("tar %s: %w", p, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	data := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	})
}

// fileName is NAME-image.tar for a tag whose repository ends in NAME.
func fileName(tag string) string {
	t, err := name.NewTag(tag)
	if err != nil {
		return "image.tar" // Write reports the bad tag
	}
	return path.Base(t.RepositoryStr()) + "-image.tar"
}
