package kubecluster

import (
	"github.com/servicepath/servicepath/tools/image"
)

// CoreDNSTag is the cluster DNS image, as kubeadm v1.34 names it.
const CoreDNSTag = "registry.k8s.io/coredns/coredns:v1.12.1"

// BuildImages writes the images every node imports into dir: e2e's
// (agnhost, pause, busybox, jessie-dnsutils) and CoreDNS, all from binaries
// built by tools/kube. It returns the tarballs; image.PauseTag is the
// sandbox image.
func BuildImages(dir string) ([]string, error) {
	specs, err := image.ClusterSpecs(image.ClusterOptions{
		Agnhost: Bin("agnhost"), AgnhostSource: Bin("agnhost-src"), BusyBox: busyboxPath,
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
