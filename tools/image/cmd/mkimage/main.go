// Command mkimage writes container images as docker-archive tarballs into
// a directory, one per image, and prints "TAG<TAB>FILE" for each; import
// them with `ctr -n k8s.io images import FILE`.
//
//	mkimage -out DIR -servicepath BIN                 the agent's image
//	mkimage -out DIR -agnhost BIN [-busybox BIN]      the e2e suite's images
//
// Run from the repository root, -agnhost-src defaults to agnhost's source
// in the module cache of tools/kube, which agnhost is built from.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/servicepath/servicepath/tools/image"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

func run() error {
	out := flag.String("out", "", "directory to write the images into (required)")
	servicepath := flag.String("servicepath", "", "static servicepath binary: writes "+image.ServicepathTag)
	agnhost := flag.String("agnhost", "", "agnhost binary: writes the e2e images (agnhost, pause, busybox, jessie-dnsutils, nginx)")
	agnhostSrc := flag.String("agnhost-src", "", "k8s.io/kubernetes/test/images/agnhost source directory (default: from tools/kube's module cache)")
	busybox := flag.String("busybox", "/bin/busybox", "busybox binary (Debian busybox-static) for the e2e images")
	nginxRoot := flag.String("nginx-root", "", "Debian's nginx and nginx-common unpacked, for the e2e nginx image (default: tools/image/debs.sh unpacks them)")
	flag.Parse()
	if *out == "" || flag.NArg() > 0 || (*servicepath == "" && *agnhost == "") {
		flag.Usage()
		return errors.New("need -out and at least one of -servicepath, -agnhost")
	}

	var specs []image.Spec
	if *servicepath != "" {
		s, err := image.Servicepath(*servicepath)
		if err != nil {
			return err
		}
		specs = append(specs, s)
	}
	if *agnhost != "" {
		if *agnhostSrc == "" {
			dir, err := agnhostSource()
			if err != nil {
				return err
			}
			*agnhostSrc = dir
		}
		if *nginxRoot == "" {
			dir, err := output(exec.Command(filepath.Join("tools", "image", "debs.sh"), "nginx", "nginx-common"))
			if err != nil {
				return fmt.Errorf("unpack nginx (run from the repository root, or pass -nginx-root): %w", err)
			}
			*nginxRoot = dir
		}
		cs, err := image.ClusterSpecs(image.ClusterOptions{Agnhost: *agnhost, AgnhostSource: *agnhostSrc, BusyBox: *busybox, NginxRoot: *nginxRoot})
		if err != nil {
			return err
		}
		specs = append(specs, cs...)
	}
	built, err := image.Write(*out, specs)
	if err != nil {
		return err
	}
	for _, b := range built {
		fmt.Printf("%s\t%s\n", b.Tag, b.File)
	}
	return nil
}

// agnhostSource is agnhost's directory in the k8s.io/kubernetes module
// that tools/kube pins.
func agnhostSource() (string, error) {
	cmd := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes")
	cmd.Dir = filepath.Join("tools", "kube")
	dir, err := output(cmd)
	if err != nil {
		return "", fmt.Errorf("find agnhost's source with go list in tools/kube (run from the repository root, or pass -agnhost-src): %w", err)
	}
	return filepath.Join(dir, "test", "images", "agnhost"), nil
}

// output is cmd's one line of output, its stderr shown.
func output(cmd *exec.Cmd) (string, error) {
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err == nil && strings.TrimSpace(string(out)) == "" {
		err = fmt.Errorf("%s printed nothing", cmd.Path)
	}
	return strings.TrimSpace(string(out)), err
}
