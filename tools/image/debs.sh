#!/bin/sh
# Unpacks Debian packages for images, without installing them (nginx's
# would start a server on this machine): apt-get download into a cache
# folder keyed by the packages' versions, then dpkg-deb -x into one root.
# Idempotent: a root that is already there is left alone. Prints the root.
# usage: debs.sh PACKAGE...
set -eu
[ $# -gt 0 ] || { echo "usage: $0 PACKAGE..." >&2; exit 2; }
cache=${XDG_CACHE_HOME:-$HOME/.cache}/servicepath/debs
key=$(for p in "$@"; do printf '%s=%s ' "$p" "$(apt-cache policy "$p" | awk '/Candidate:/ {print $2}')"; done)
case "$key" in *"=(none)"*|*"= "*) echo "$0: not all of $* are known to apt (apt-get update?)" >&2; exit 1 ;; esac
root=$cache/root-$(printf '%s' "$key" | sha256sum | cut -c1-16)
if [ -d "$root" ]; then
	echo "$root"
	exit 0
fi
mkdir -p "$cache"
tmp=$(mktemp -d "$cache/tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download -q "$@" >/dev/null 2>&1) || {
	echo "$0: apt-get download $* failed" >&2; exit 1; }
mkdir "$tmp/root"
for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$tmp/root"; done
# Renamed last so that an interrupted unpack is never taken for a cached one.
mv "$tmp/root" "$root"
echo "$root"
