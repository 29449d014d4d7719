#!/usr/bin/env bash
# The demo `make demo-k8s` runs: a lab with a real Kubernetes control plane,
# pods wired by weir-cni through the lab's kubelet, slices from the real
# EndpointSlice controller, requests to the ClusterIP, a scale-down, then a
# clean teardown (also when a step fails).
set -euo pipefail
cd "$(dirname "$0")/../.."
weir=bin/weir
lab=k8s

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

$weir lab down $lab >/dev/null 2>&1 || true
trap 'step "weir lab down $lab"; $weir lab down $lab' EXIT

step "weir lab up -f examples/lab/k8s.yaml (etcd, kube-apiserver, kube-controller-manager, a node, a client pod)"
$weir lab up -f examples/lab/k8s.yaml

step "weir lab kube apply $lab -f examples/k8s/web.yaml (three pods, a Service)"
$weir lab kube apply $lab -f examples/k8s/web.yaml

step "12 HTTP requests from pod client to the ClusterIP 10.96.100.10 (waiting for the slices first)"
$weir lab curl $lab --pod client -n 12 --wait 60s http://10.96.100.10/

step "weir service list --lab $lab"
$weir service list --lab $lab

step "weir lab kube delete $lab -f examples/k8s/web-3.yaml (scale down)"
$weir lab kube delete $lab -f examples/k8s/web-3.yaml
sleep 2

step "12 more requests: web-3 gets none"
$weir lab curl $lab --pod client -n 12 http://10.96.100.10/
