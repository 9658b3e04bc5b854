package kubecluster

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/servicepath/servicepath/tools/image"
)

// CoreDNSTag is the cluster DNS image, as kubeadm v1.34 names it.
const CoreDNSTag = "registry.k8s.io/coredns/coredns:v1.12.1"

// BuildImages writes the images every node imports into dir: e2e's
// (agnhost, pause, busybox, jessie-dnsutils) and CoreDNS, all from binaries
// built by tools/kube, and nginx from Debian's unpacked by
// tools/image/debs.sh in repo. It returns the tarballs; image.PauseTag is
// the sandbox image.
func BuildImages(dir, repo string) ([]string, error) {
	out, err := exec.Command(filepath.Join(repo, "tools", "image", "debs.sh"), "nginx", "nginx-common").Output()
	if err != nil {
		return nil, fmt.Errorf("unpack nginx for its image: %w", err)
	}
	specs, err := image.ClusterSpecs(image.ClusterOptions{
		Agnhost: Bin("agnhost"), AgnhostSource: Bin("agnhost-src"), BusyBox: busyboxPath,
		NginxRoot: strings.TrimSpace(string(out)),
	})
	if err != nil {
		return nil, err
	}
	coredns, err := image.Program(Bin("coredns"), "/coredns")
	if err != nil {
		return nil, err
	}
	specs = append(specs, image.Spec{Tag: CoreDNSTag, Files: coredns, Entrypoint: []string{"/coredns"}})
	built, err := image.Write(dir, specs)
	if err != nil {
		return nil, err
	}
	var files []string
	for _, b := range built {
		files = append(files, b.File)
	}
	return files, nil
}

// Debian's busybox-static.
const busyboxPath = "/bin/busybox"
