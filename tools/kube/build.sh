#!/bin/sh
# Builds kube-apiserver and etcd from the Go module proxy into a cache
# folder keyed by their versions, for the agent's tests (harness/kubeapi).
# Idempotent: a folder that already holds both binaries is left alone.
# Prints the folder.
set -eu
cd "$(dirname "$0")"
k8s=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
etcd=$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
dir=${SERVICEPATH_KUBE_ASSETS:-${XDG_CACHE_HOME:-$HOME/.cache}/servicepath/kube/kube-apiserver-$k8s-etcd-$etcd}
if [ -x "$dir/kube-apiserver" ] && [ -x "$dir/etcd" ]; then
	echo "$dir"
	exit 0
fi
mkdir -p "$dir"
minor=$(echo "$k8s" | cut -d. -f2)
v=k8s.io/component-base/version
go build -ldflags "-s -w -X $v.gitVersion=$k8s -X $v.gitMajor=1 -X $v.gitMinor=$minor" \
	-o "$dir/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver
go build -ldflags "-s -w" -o "$dir/etcd.tmp" go.etcd.io/etcd/server/v3
# Renamed last so that an interrupted build is never taken for a cached one.
mv "$dir/kube-apiserver.tmp" "$dir/kube-apiserver"
mv "$dir/etcd.tmp" "$dir/etcd"
echo "$dir"
