// Command kubeapi runs the test harness's etcd and kube-apiserver on
// 127.0.0.1 until interrupted, and prints a kubeconfig path for
// `servicepath agent` and kubectl.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/servicepath/servicepath/harness/kubeapi"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "kubeapi: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	dir, err := os.MkdirTemp("", "servicepath-kubeapi-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	srv, err := kubeapi.Start(kubeapi.Options{Dir: dir})
	if err != nil {
		return err
	}
	defer srv.Stop()
	fmt.Printf("kube-apiserver %s ready at %s\nexport KUBECONFIG=%s\n(interrupt to stop; everything is removed)\n",
		kubeapi.KubernetesVersion, srv.Config.Host, srv.Kubeconfig)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	<-stop
	return nil
}
