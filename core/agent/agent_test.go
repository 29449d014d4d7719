package agent

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"go.uber.org/fx"

	"github.com/weirnet/weir/core/module"
)

type fake struct{ name string }

func (f *fake) Name() string                          { return f.name }
func (f *fake) Object() (*ebpf.CollectionSpec, error) { return nil, nil }
func (f *fake) Start(context.Context) error           { return nil }
func (f *fake) Stop(context.Context) error            { return nil }

// A catalog shaped like the real one plus two forwarding modules that
// compete for one slot.
func catalog(t *testing.T) module.Catalog {
	t.Helper()
	provide := func(name string) func(module.Settings) fx.Option {
		return func(module.Settings) fx.Option { return module.Provide(func() *fake { return &fake{name} }) }
	}
	reg, err := module.NewRegistry(
		module.Factory{Descriptor: module.Descriptor{Name: "endpoints", Slots: []module.SlotClaim{{Slot: "pod-ingress/deliver", Program: "d"}}}, Provide: provide("endpoints")},
		module.Factory{Descriptor: module.Descriptor{Name: "lb", Requires: []string{"endpoints"}, Slots: []module.SlotClaim{{Slot: "pod-egress/lb", Program: "l"}}}, Provide: provide("lb")},
		module.Factory{Descriptor: module.Descriptor{Name: "tunnel", Slots: []module.SlotClaim{{Slot: "pod-egress/forward", Program: "t"}}}, Provide: provide("tunnel")},
		module.Factory{Descriptor: module.Descriptor{Name: "nativerouting", Slots: []module.SlotClaim{{Slot: "pod-egress/forward", Program: "n"}}}, Provide: provide("nativerouting")},
	)
	if err != nil {
		t.Fatal(err)
	}
	return reg
}

func opts(t *testing.T, config string) Options {
	dir := t.TempDir()
	p := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(p, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	return Options{ConfigPath: p, NodeName: "n1", PinDir: filepath.Join(dir, "never-created"), StateDir: dir, APISocket: filepath.Join(dir, "s"), Standalone: true}
}

// Standalone is explicit: an in-cluster environment the agent inherits
// (a test or lab run inside a pod) is not used, and asking for both a
// kubeconfig and standalone is refused.
func TestStandaloneIgnoresAnInClusterEnvironment(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
	t.Setenv("KUBERNETES_SERVICE_PORT", "443")
	if _, err := New(opts(t, "modules: [endpoints]\n"), catalog(t)); err != nil {
		t.Fatalf("standalone agent in an in-cluster environment: %v", err)
	}
	o := opts(t, "modules: [endpoints]\n")
	o.Standalone = false
	if _, err := New(o, catalog(t)); err == nil || !strings.Contains(err.Error(), "in-cluster Kubernetes configuration") {
		t.Fatalf("without --standalone the environment is used: %v", err)
	}
	o.Standalone, o.Kubeconfig = true, "/some/kubeconfig"
	if _, err := New(o, catalog(t)); err == nil || !strings.Contains(err.Error(), "--standalone and --kubeconfig exclude each other") {
		t.Fatalf("standalone with a kubeconfig: %v", err)
	}
}

// The agent refuses to start on a bad module set, before touching the
// node, with a message naming the modules, the slot and the field.
func TestAgentRefusesBadModuleSets(t *testing.T) {
	cases := map[string]struct {
		config string
		labels map[string]string
		want   []string
	}{
		"unknown module": {"modules: [endpoints, lbx]\n", nil,
			[]string{"config.yaml:1:", "modules[1]", `unknown module "lbx"`, "endpoints, lb, nativerouting, tunnel"}},
		"missing requirement": {"modules: [lb]\n", nil,
			[]string{`module "lb" (modules[0]) requires module "endpoints"`}},
		"two modules claim one slot": {"modules: [endpoints, tunnel, nativerouting]\n", nil,
			[]string{`"nativerouting" (modules[2])`, `"tunnel" (modules[1])`, "slot pod-egress/forward"}},
		"a pool that breaks the set": {"modules: [endpoints, lb]\nnodePools:\n  - name: edge\n    nodeSelector: {matchLabels: {pool: edge}}\n    modules: {disable: [endpoints]}\n", nil,
			[]string{`nodePools[0] ("edge")`, `requires module "endpoints"`}},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			o := opts(t, c.config)
			o.NodeLabels = c.labels
			_, err := New(o, catalog(t))
			if err == nil {
				t.Fatal("agent accepted the configuration")
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func TestAgentResolvesItsPool(t *testing.T) {
	o := opts(t, "modules: [endpoints]\nnodePools:\n  - name: edge\n    nodeSelector: {matchLabels: {pool: edge}}\n    modules: {enable: [lb, tunnel]}\n")
	o.NodeLabels = map[string]string{"pool": "edge"}
	// Composing touches nothing (the pin dir does not even exist): the
	// datapath loads when the agent starts.
	a, err := New(o, catalog(t))
	if err != nil {
		t.Fatal(err)
	}
	eff := a.Effective
	if _, err := os.Stat(o.PinDir); !os.IsNotExist(err) {
		t.Fatalf("composing the agent created %s", o.PinDir)
	}
	var names []string
	for _, f := range eff.Modules {
		names = append(names, f.Name)
	}
	if eff.Pool != "edge" || strings.Join(names, ",") != "endpoints,lb,tunnel" {
		t.Fatalf("pool %q modules %v", eff.Pool, names)
	}
}

func TestAgentNeedsItsFlags(t *testing.T) {
	_, err := New(Options{}, catalog(t))
	if err == nil {
		t.Fatal("agent accepted empty options")
	}
	for _, f := range []string{"--config", "--node-name", "--pin-dir", "--state-dir", "--api-socket"} {
		if !strings.Contains(err.Error(), f) {
			t.Errorf("error %q does not name %s", err, f)
		}
	}
}
