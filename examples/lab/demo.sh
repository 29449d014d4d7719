#!/usr/bin/env bash
# The demo `make demo` runs: a one-node lab with a client and three backends,
# the services of examples/services.yaml, requests to the ClusterIPs, a look
# at the node's maps, then a clean teardown (also when a step fails).
set -euo pipefail
cd "$(dirname "$0")/../.."
weir=bin/weir
lab=demo

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# A lab left over from an interrupted run goes first.
$weir lab down $lab >/dev/null 2>&1 || true
trap 'step "weir lab down $lab"; $weir lab down $lab' EXIT

step "weir lab up -f examples/lab/demo.yaml (three nodes: n1, n2 tunnel with VXLAN, n3 routes natively)"
$weir lab up -f examples/lab/demo.yaml

step "weir lab apply $lab -f examples/services.yaml"
$weir lab apply $lab -f examples/services.yaml

step "weir service list --lab $lab --node n1"
$weir service list --lab $lab --node n1

step "12 HTTP requests from pod client (on n1) to the ClusterIP of web, backends on n1, n2, n3"
$weir lab curl $lab --pod client -n 12 http://10.96.0.10/

step "6 UDP requests from pod client to the ClusterIP of dns"
$weir lab udp $lab --pod client -n 6 10.96.0.53:53

step "weir bpf ipcache list --lab $lab --node n1 (where each address lives, and how n1 reaches it)"
$weir bpf ipcache list --lab $lab --node n1

step "weir bpf ct list --lab $lab --node n1 (TCP entries: one service and one reply entry per connection)"
$weir bpf ct list --lab $lab --node n1 | awk 'NR == 1 || /TCP/ && n++ < 8'

step "weir bpf metrics list --lab $lab --node n1"
$weir bpf metrics list --lab $lab --node n1
