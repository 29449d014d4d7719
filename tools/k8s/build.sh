#!/usr/bin/env bash
# Builds kube-apiserver and kube-controller-manager from the Go module proxy
# (this helper module requires k8s.io/kubernetes and points each k8s.io
# staging module at its published version) into a cache outside the
# checkout, keyed by version, so fresh clones reuse it. Prints the cache
# directory. Nothing is fetched but Go modules.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=$(awk '$1 == "k8s.io/kubernetes" {print $2; exit}' "$here/go.mod")
minor=$(echo "$version" | cut -d. -f2)
cache=${WEIR_CACHE:-$HOME/.cache/weir}/k8s-$version
mkdir -p "$cache"
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
for cmd in kube-apiserver kube-controller-manager; do
  if [ -x "$cache/$cmd" ] && "$cache/$cmd" --version 2>/dev/null | grep -q "$version"; then
    continue
  fi
  echo "building $cmd $version into $cache (a few minutes the first time)" >&2
  (cd "$here" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$cache/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd")
  mv "$cache/$cmd.tmp" "$cache/$cmd"
done
echo "$cache"
