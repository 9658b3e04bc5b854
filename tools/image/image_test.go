package image

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/stretchr/testify/require"
)

// entry is one file of an image as read back from its archive.
type entry struct {
	hdr  *tar.Header
	data []byte
}

// readBack opens the archive as `ctr import` would: by its tag, and checks
// the archive names exactly that tag.
func readBack(t *testing.T, b Built) (cfgEntrypoint, cfgCmd []string, user string, files map[string]entry) {
	t.Helper()
	m, err := tarball.LoadManifest(func() (io.ReadCloser, error) { return os.Open(b.File) })
	require.NoError(t, err, "manifest.json of %s", b.File)
	require.Len(t, m, 1, "one image per archive")
	require.Equal(t, []string{b.Tag}, m[0].RepoTags, "the archive is tagged %s", b.Tag)

	tag, err := name.NewTag(b.Tag)
	require.NoError(t, err)
	img, err := tarball.ImageFromPath(b.File, &tag)
	require.NoError(t, err, "read %s back", b.File)
	cf, err := img.ConfigFile()
	require.NoError(t, err, "config of %s", b.Tag)
	require.Equal(t, "linux", cf.OS, "os of %s", b.Tag)
	require.NotEmpty(t, cf.Architecture, "architecture of %s", b.Tag)

	layers, err := img.Layers()
	require.NoError(t, err)
	require.Len(t, layers, 1, "one layer in %s", b.Tag)
	rc, err := layers[0].Uncompressed()
	require.NoError(t, err)
	defer rc.Close()
	files = map[string]entry{}
	tr := tar.NewReader(rc)
	prev := ""
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err, "layer of %s", b.Tag)
		require.Less(t, prev, hdr.Name, "entries of %s sorted", b.Tag)
		prev = hdr.Name
		require.Zero(t, hdr.Uid+hdr.Gid, "%s in %s owned by root", hdr.Name, b.Tag)
		require.Empty(t, hdr.Uname+hdr.Gname, "%s in %s has no host user names", hdr.Name, b.Tag)
		require.Equal(t, epoch, hdr.ModTime.UTC(), "%s in %s has the fixed time", hdr.Name, b.Tag)
		data, err := io.ReadAll(tr)
		require.NoError(t, err)
		files["/"+filepath.Clean(hdr.Name)] = entry{hdr, data}
	}
	return cf.Config.Entrypoint, cf.Config.Cmd, cf.Config.User, files
}

func requireExecutable(t *testing.T, files map[string]entry, p string, want []byte) {
	t.Helper()
	e, ok := files[p]
	require.True(t, ok, "%s is in the image", p)
	require.Equal(t, byte(tar.TypeReg), e.hdr.Typeflag, "%s is a regular file", p)
	require.Equal(t, int64(0o755), e.hdr.Mode, "%s has mode 0755", p)
	if want != nil {
		require.Equal(t, want, e.data, "%s holds the given binary", p)
	}
}

// buildTwice writes the specs into two directories and checks the
// archives are byte for byte the same.
func buildTwice(t *testing.T, specs func() ([]Spec, error)) []Built {
	t.Helper()
	var runs [2][]Built
	for i := range runs {
		s, err := specs()
		require.NoError(t, err, "specs")
		runs[i], err = Write(t.TempDir(), s)
		require.NoError(t, err, "write images")
	}
	require.Len(t, runs[1], len(runs[0]))
	for i, b := range runs[0] {
		a, err := os.ReadFile(b.File)
		require.NoError(t, err)
		c, err := os.ReadFile(runs[1][i].File)
		require.NoError(t, err)
		require.True(t, bytes.Equal(a, c), "two builds of %s are byte-identical", b.Tag)
	}
	return runs[0]
}

// standIn writes a file to stand for a program the test does not build
// (servicepath, agnhost): the images are checked for holding exactly its
// bytes, never run. ldd takes it for a static program.
func standIn(t *testing.T, name string) (string, []byte) {
	t.Helper()
	data := []byte("#!stand-in for " + name + "\n")
	p := filepath.Join(t.TempDir(), name)
	require.NoError(t, os.WriteFile(p, data, 0o644))
	return p, data
}

// servicepathSpec is the agent's image with a stand-in binary; it skips
// when make deps has not installed iptables.
func servicepathSpec(t *testing.T) Spec {
	t.Helper()
	if _, err := os.Stat("/usr/sbin/xtables-nft-multi"); err != nil {
		t.Skipf("the agent's image needs this machine's iptables (make deps): %v", err)
	}
	bin, _ := standIn(t, "servicepath")
	s, err := Servicepath(bin)
	require.NoError(t, err, "servicepath spec")
	return s
}

func TestServicepathImage(t *testing.T) {
	spec := servicepathSpec(t)
	built := buildTwice(t, func() ([]Spec, error) { return []Spec{spec}, nil })
	require.Len(t, built, 1)
	require.Equal(t, ServicepathTag, built[0].Tag)
	require.Equal(t, "servicepath-image.tar", filepath.Base(built[0].File), "the file make image writes")
	entrypoint, _, _, files := readBack(t, built[0])
	require.Equal(t, []string{"/servicepath"}, entrypoint, "entrypoint")
	requireExecutable(t, files, "/servicepath", spec.Files[0].Data)
	requireExecutable(t, files, "/usr/sbin/xtables-nft-multi", nil)
	requireExecutable(t, files, "/usr/sbin/xtables-legacy-multi", nil)

	// Every iptables program datapath/coexist names is in the image.
	src, err := os.ReadFile("../../datapath/coexist/iptables.go")
	require.NoError(t, err, "read datapath/coexist's iptables programs")
	names := regexp.MustCompile(`"(ip6?tables-(?:legacy|nft)-(?:save|restore))"`).FindAllStringSubmatch(string(src), -1)
	require.NotEmpty(t, names, "datapath/coexist names iptables programs")
	for _, n := range names {
		e, ok := files["/usr/sbin/"+n[1]]
		require.True(t, ok, "%s, which datapath/coexist runs, is in the image", n[1])
		require.Contains(t, []string{"xtables-nft-multi", "xtables-legacy-multi"}, e.hdr.Linkname, "%s runs its backend's program", n[1])
	}
	var plugins int
	for p, e := range files {
		if filepath.Base(filepath.Dir(p)) == "xtables" && e.hdr.Mode == 0o755 {
			plugins++
		}
	}
	require.Greater(t, plugins, 10, "iptables' extensions are in the image")
}

// dynamicELF writes the headers of a dynamically linked x86-64 program:
// an ELF header and one PT_INTERP program header naming the loader. Made
// here, since which of a machine's programs are dynamic varies (a vmtest
// guest's /bin/sh is a static busybox).
func dynamicELF(t *testing.T) string {
	t.Helper()
	const interp = "/lib64/ld-linux-x86-64.so.2\x00"
	var ehdr elf.Header64
	copy(ehdr.Ident[:], elf.ELFMAG)
	ehdr.Ident[elf.EI_CLASS], ehdr.Ident[elf.EI_DATA], ehdr.Ident[elf.EI_VERSION] = byte(elf.ELFCLASS64), byte(elf.ELFDATA2LSB), byte(elf.EV_CURRENT)
	ehdr.Type, ehdr.Machine, ehdr.Version = uint16(elf.ET_EXEC), uint16(elf.EM_X86_64), uint32(elf.EV_CURRENT)
	ehdr.Phoff, ehdr.Ehsize, ehdr.Phentsize, ehdr.Phnum = 64, 64, 56, 1
	phdr := elf.Prog64{Type: uint32(elf.PT_INTERP), Flags: uint32(elf.PF_R), Off: 64 + 56, Filesz: uint64(len(interp)), Memsz: uint64(len(interp)), Align: 1}
	var b bytes.Buffer
	require.NoError(t, binary.Write(&b, binary.LittleEndian, ehdr))
	require.NoError(t, binary.Write(&b, binary.LittleEndian, phdr))
	b.WriteString(interp)
	p := filepath.Join(t.TempDir(), "dynamic")
	require.NoError(t, os.WriteFile(p, b.Bytes(), 0o755))
	return p
}

func TestServicepathRefusesDynamicBinary(t *testing.T) {
	_, err := Servicepath(dynamicELF(t))
	require.ErrorContains(t, err, "CGO_ENABLED=0", "a dynamic binary is refused, saying how to build it")
}

func TestBadInput(t *testing.T) {
	_, err := Spec{Tag: "a/b:c", Files: []File{{Path: "rel/x", Mode: 0o644}}}.Image()
	require.ErrorContains(t, err, `"rel/x"`, "a relative path is named")
	_, err = Spec{Tag: "a/b:c", Files: []File{{Path: "/x", Data: []byte("1")}, {Path: "/x", Data: []byte("2")}}}.Image()
	require.ErrorContains(t, err, "/x is given twice", "a conflicting file is named")
	_, err = Spec{Tag: "Not A Tag"}.Write(filepath.Join(t.TempDir(), "x.tar"))
	require.ErrorContains(t, err, `"Not A Tag"`, "a bad tag is named")
	_, err = ClusterSpecs(ClusterOptions{})
	require.ErrorContains(t, err, "Agnhost", "missing programs are named")
	_, err = Tools(Tool{Name: "no-such-tool-here", Dst: "/x", Package: "some-package"})
	require.ErrorContains(t, err, "some-package", "a missing tool names its Debian package")
}

// clusterOptions has a stand-in agnhost and porter's files, and this
// machine's busybox; it skips when make deps has not installed the tools.
func clusterOptions(t *testing.T) (ClusterOptions, []byte) {
	t.Helper()
	bin, data := standIn(t, "agnhost")
	src := filepath.Join(t.TempDir(), "agnhost")
	require.NoError(t, os.MkdirAll(filepath.Join(src, "porter"), 0o755))
	for _, f := range []string{"localhost.crt", "localhost.key"} {
		require.NoError(t, os.WriteFile(filepath.Join(src, "porter", f), []byte(f), 0o644))
	}
	for _, tool := range append([]Tool{{"busybox", "/bin/busybox", "busybox-static"}}, agnhostTools...) {
		if _, err := tool.files(); err != nil {
			t.Skipf("cluster images need this machine's tools: %v", err)
		}
	}
	out, err := exec.Command("./debs.sh", "nginx", "nginx-common").Output()
	if err != nil {
		t.Skipf("cluster images need Debian's nginx unpacked (make deps): %v", err)
	}
	return ClusterOptions{Agnhost: bin, AgnhostSource: src, BusyBox: "/bin/busybox", NginxRoot: strings.TrimSpace(string(out))}, data
}

func TestClusterImages(t *testing.T) {
	o, agnhost := clusterOptions(t)
	built := buildTwice(t, func() ([]Spec, error) { return ClusterSpecs(o) })
	byTag := map[string]Built{}
	for _, b := range built {
		byTag[b.Tag] = b
	}
	require.Len(t, byTag, 5, "agnhost, pause, busybox, jessie-dnsutils, nginx: %v", built)

	entrypoint, cmd, _, files := readBack(t, byTag[AgnhostTag])
	require.Equal(t, []string{"/agnhost"}, entrypoint, "agnhost entrypoint")
	require.Equal(t, []string{"pause"}, cmd, "agnhost's default subcommand")
	requireExecutable(t, files, "/agnhost", agnhost)
	for _, p := range []string{"/bin/busybox", "/usr/bin/curl", "/usr/bin/nc", "/usr/bin/dig", "/usr/bin/nslookup",
		"/sbin/ip", "/usr/bin/ss", "/bin/bash", "/usr/bin/getent", "/lib64/ld-linux-x86-64.so.2", "/bin/sh"} {
		requireExecutable(t, files, p, nil)
	}
	require.Equal(t, "/bin/busybox", files["/usr/bin/seq"].hdr.Linkname, "seq is busybox's")
	require.Equal(t, []byte("localhost.crt"), files["/localhost.crt"].data, "porter's certificate")
	require.Equal(t, "agnhost", files["/agnhost-2"].hdr.Linkname, "agnhost-2 for the entrypoint tests")
	require.Contains(t, string(files["/etc/group"].data), "group-defined-in-image:x:50000:user-defined-in-image",
		"the group the SupplementalGroups test expects")

	entrypoint, _, user, files := readBack(t, byTag[PauseTag])
	require.Equal(t, []string{"/agnhost", "pause"}, entrypoint, "pause runs agnhost pause")
	require.Equal(t, "65535:65535", user, "pause runs as upstream's does")
	requireExecutable(t, files, "/agnhost", agnhost)

	_, cmd, _, files = readBack(t, byTag[BusyBoxTag])
	require.Equal(t, []string{"sh"}, cmd, "busybox's default command")
	requireExecutable(t, files, "/bin/busybox", nil)
	require.Equal(t, "/bin/busybox", files["/usr/bin/nc"].hdr.Linkname, "busybox's own nc")

	_, _, _, files = readBack(t, byTag[JessieDnsutilTag])
	requireExecutable(t, files, "/usr/bin/dig", nil)
	requireExecutable(t, files, "/usr/bin/getent", nil)
	requireExecutable(t, files, "/bin/sh", nil)
	require.Equal(t, fs.FileMode(0o1777), fs.FileMode(files["/tmp"].hdr.Mode), "/tmp is sticky and world-writable")

	_, cmd, _, files = readBack(t, byTag[NginxTag])
	require.Equal(t, []string{"nginx", "-g", "daemon off;"}, cmd, "nginx in the foreground")
	requireExecutable(t, files, "/usr/sbin/nginx", nil)
	require.Equal(t, "/dev/stdout", files["/var/log/nginx/access.log"].hdr.Linkname, "access log to the container's output")
	require.Contains(t, string(files["/etc/nginx/nginx.conf"].data), "listen 80;", "nginx serves port 80")
}
