# Weir: `make demo` runs the main job on the built-in lab, `make test` runs
# every test. Both work on a fresh machine of this kind (root, Go installed).

GO        ?= go
BIN       := $(CURDIR)/bin
PKGS      := ./...
# Tests create network namespaces, links, pins and cgroups; they need root.
TEST_FLAGS ?= -count=1 -timeout 30m

.PHONY: all build generate check-generate deps-bpf deps-test deps-bench k8s vet fmt-check test bench demo demo-k8s clean

all: build

build:
	@mkdir -p $(BIN)
	$(GO) build -o $(BIN)/weir-agent ./cmd/agent
	$(GO) build -o $(BIN)/weir ./cmd/weir
	$(GO) build -o $(BIN)/weir-cni ./cmd/weir-cni

# Regenerate the BPF objects and their Go bindings from bpf/ (needs clang-16).
generate: deps-bpf
	$(GO) generate ./...

# CI: the committed objects must be exactly what the sources produce.
check-generate: generate
	@git diff --exit-code --stat -- '*.go' '*.o' || { \
	  echo "generated BPF files differ from bpf/ sources: run 'make generate' and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- '*_bpfel.go' '*_bpfel.o')" || { \
	  echo "untracked generated BPF files: run 'make generate' and commit"; exit 1; }

# clang-16 and friends from Debian, only for `make generate`.
deps-bpf:
	@command -v clang-16 >/dev/null && command -v llvm-strip-16 >/dev/null && test -f /usr/include/bpf/bpf_helpers.h || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang-16 llvm-16 libbpf-dev linux-libc-dev >/dev/null; }

# kube-apiserver and kube-controller-manager for the Kubernetes tests, built
# from the Go module proxy into ~/.cache/weir/k8s-<version> (reused by
# fresh clones; a miss rebuilds, a few minutes on 2 cores).
k8s:
	@./tools/k8s/build.sh >/dev/null

# Debian's etcd for the control plane; util-linux (nsenter) and iproute2
# are part of the base system.
deps-test:
	@command -v etcd >/dev/null && command -v dig >/dev/null && command -v curl >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server dnsutils curl >/dev/null; }

# iptables for the benchmarks' kube-proxy-shaped baselines.
deps-bench:
	@command -v iptables >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables >/dev/null; }

vet:
	$(GO) vet $(PKGS)

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); test -z "$$out" || { echo "gofmt needed: $$out"; exit 1; }

test: fmt-check vet deps-test k8s
	$(GO) test $(TEST_FLAGS) $(PKGS)

# The main job on the built-in lab: a node, a client and three backends,
# requests to a ClusterIP, and which backend answered each.
demo: build
	./examples/lab/demo.sh

# The same on a real Kubernetes control plane: pods through weir-cni,
# slices from the EndpointSlice controller, a scale-down.
demo-k8s: build deps-test k8s
	./examples/lab/demo-k8s.sh

clean:
	rm -rf $(BIN)

# Benchmarks: each scenario once, with its baseline from the same run.
bench: build deps-test deps-bench k8s
	$(GO) test -run '^$$' -bench . -benchtime 1x -timeout 60m ./core/lab/ ./core/datapath/ ./core/lbmap/ ./modules/... ./plugins/...
