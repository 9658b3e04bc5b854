#!/bin/sh
# Builds Kubernetes binaries from the Go module proxy into cache folders
# keyed by their versions. Idempotent: a binary already there is left alone;
# each is renamed into place last, so an interrupted build is never taken
# for a cached one.
#
#   build.sh          kube-apiserver and etcd, for the agent's tests
#                     (harness/kubeapi); prints the folder
#   build.sh cluster  the rest of a cluster and its conformance suite
#                     (harness/kubecluster): kubelet, kube-controller-manager,
#                     kube-scheduler, kube-proxy, kubectl, agnhost, e2e.test,
#                     ginkgo, coredns (from ../coredns);
#                     prints the folder
set -eu
cd "$(dirname "$0")"
k8s=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
etcd=$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/servicepath/kube
minor=$(echo "$k8s" | cut -d. -f2)
v=k8s.io/component-base/version
# Stamped so that --version, the API's /version and e2e's version checks
# say the real release instead of v0.0.0-master.
stamp="-s -w -X $v.gitVersion=$k8s -X $v.gitMajor=1 -X $v.gitMinor=$minor"

# build DIR NAME PACKAGE [test]: go build (or go test -c) PACKAGE to DIR/NAME.
build() {
	[ -x "$1/$2" ] && return 0
	echo "building $2 ($k8s) into $1" >&2
	start=$(date +%s)
	if [ "${4:-}" = test ]; then
		# -o naming a file makes go 1.26 build nothing for a package of
		# another module; a folder works.
		rm -rf "$1/$2.tmp"
		go test -c -ldflags "$stamp" -o "$1/$2.tmp/" "$3"
		mv "$1/$2.tmp/$(basename "$3").test" "$1/$2.tmp.bin"
		rmdir "$1/$2.tmp"
		mv "$1/$2.tmp.bin" "$1/$2.tmp"
	else
		go build -ldflags "$stamp" -o "$1/$2.tmp" "$3"
	fi
	mv "$1/$2.tmp" "$1/$2"
	echo "built $2 in $(($(date +%s) - start)) s" >&2
}

case "${1:-}" in
"")
	dir=${SERVICEPATH_KUBE_ASSETS:-$cache/kube-apiserver-$k8s-etcd-$etcd}
	mkdir -p "$dir"
	build "$dir" kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
	build "$dir" etcd go.etcd.io/etcd/server/v3
	;;
cluster)
	dir=${SERVICEPATH_CLUSTER_ASSETS:-$cache/cluster-$k8s}
	mkdir -p "$dir"
	for c in kubelet kube-controller-manager kube-scheduler kube-proxy kubectl; do
		build "$dir" $c k8s.io/kubernetes/cmd/$c
	done
	build "$dir" agnhost k8s.io/kubernetes/test/images/agnhost
	# agnhost's image carries porter's TLS key pair from its source.
	src=$(go list -m -f '{{.Dir}}' k8s.io/kubernetes)/test/images/agnhost
	mkdir -p "$dir/agnhost-src/porter"
	cp "$src/porter/localhost.crt" "$src/porter/localhost.key" "$dir/agnhost-src/porter/"
	build "$dir" e2e.test k8s.io/kubernetes/test/e2e test
	# The ginkgo CLI runs e2e.test's tests in parallel processes.
	build "$dir" ginkgo github.com/onsi/ginkgo/v2/ginkgo
	# The cluster DNS, static: it runs in an image of its own.
	(cd ../coredns && CGO_ENABLED=0 build "$dir" coredns github.com/coredns/coredns)
	;;
*)
	echo "usage: $0 [cluster]" >&2
	exit 2
	;;
esac
echo "$dir"
