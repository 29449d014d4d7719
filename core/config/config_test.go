package config

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/weirnet/weir/core/module"
	"github.com/weirnet/weir/core/strictyaml"
)

// lines joins a document's lines, so that a test's line numbers can be
// read off the list.
func lines(l ...string) string { return strings.Join(l, "\n") + "\n" }

func TestParseErrors(t *testing.T) {
	cases := []struct {
		name string
		doc  string
		want string // the whole error text
	}{
		{
			name: "unknown module",
			doc:  lines("modules: [endpoints, lb, lbx]"),
			want: `weir.yaml:1:26: modules[2]: unknown module "lbx"; known modules: bridge, endpoints, lb, socketlb, tunnel`,
		},
		{
			name: "duplicate module",
			doc: lines(
				"modules:",
				"  - endpoints",
				"  - lb",
				"  - endpoints",
			),
			want: `weir.yaml:4:5: modules[2]: module "endpoints" is already enabled by modules[0]`,
		},
		{
			name: "missing requirement",
			doc:  lines("modules: [lb]"),
			want: `weir.yaml:1:10: modules: module "lb" (modules[0]) requires module "endpoints", which is not enabled`,
		},
		{
			name: "excluded pair",
			doc:  lines("modules: [endpoints, lb, socketlb]"),
			want: `weir.yaml:1:10: modules: modules "socketlb" (modules[2]) and "lb" (modules[1]) exclude each other; enable only one`,
		},
		{
			name: "two modules claim one slot",
			doc:  lines("modules: [tunnel, bridge]"),
			want: `weir.yaml:1:10: modules: modules "bridge" (modules[1]) and "tunnel" (modules[0]) both claim slot pod-egress/forward (forwarding mode); enable only one`,
		},
		{
			name: "unknown settings key",
			doc: lines(
				"modules: [endpoints]",
				"settings:",
				"  foo:",
				"    x: 1",
			),
			want: `weir.yaml:3:3: settings.foo: unknown module "foo"; known modules: bridge, endpoints, lb, socketlb, tunnel`,
		},
		{
			name: "settings for a module without settings",
			doc: lines(
				"modules: [endpoints, lb]",
				"settings:",
				"  lb: {}",
			),
			want: `weir.yaml:3:3: settings.lb: module "lb" has no settings; modules with settings: endpoints, tunnel`,
		},
		{
			name: "bad settings value",
			doc: lines(
				"modules: [endpoints]",
				"settings:",
				"  endpoints:",
				"    mtu: 1400",
				"    gatewayIP: 300.1.1.1",
			),
			want: `weir.yaml:5:16: settings.endpoints.gatewayIP: "300.1.1.1" is not an IP address`,
		},
		{
			name: "bad settings value in a list",
			doc: lines(
				"modules: [endpoints]",
				"settings:",
				"  endpoints:",
				"    routes:",
				"      - {cidr: 10.0.0.0/8, via: 10.0.0.1}",
				"      - {cidr: 10.1.0.0/16, via: nowhere}",
			),
			want: `weir.yaml:6:34: settings.endpoints.routes[1].via: "nowhere" is not an IP address`,
		},
		{
			name: "bad settings value in a section of a module not enabled",
			doc: lines(
				"modules: [endpoints]",
				"settings:",
				"  tunnel: {protocol: gre}",
			),
			want: `weir.yaml:3:22: settings.tunnel.protocol: "gre" is not one of vxlan, geneve`,
		},
		{
			name: "unknown field in a settings section",
			doc: lines(
				"modules: [endpoints]",
				"settings:",
				"  endpoints:",
				"    gatewayIp: 10.0.0.1",
			),
			want: `weir.yaml:4:5: settings.endpoints: unknown field "gatewayIp"; allowed fields: gatewayIP, mtu, routes`,
		},
		{
			name: "wrong type in a settings section",
			doc: lines(
				"modules: [endpoints]",
				"settings:",
				"  endpoints: {mtu: big}",
			),
			want: `weir.yaml:3:20: settings.endpoints.mtu: "big" is not an integer`,
		},
		{
			name: "pool after a catch-all pool",
			doc: lines(
				"modules: [endpoints]",
				"nodePools:",
				"  - name: edge",
				"    modules: {enable: [tunnel]}",
				"  - name: core",
				"    nodeSelector: {matchLabels: {pool: core}}",
				"    modules: {enable: [tunnel]}",
			),
			want: `weir.yaml:5:5: nodePools[1]: pool "core" can never apply: nodePools[0] ("edge") has an empty nodeSelector, which matches every node first; move this pool before it`,
		},
		{
			name: "bad settings value in a pool",
			doc: lines(
				"modules: [endpoints]",
				"settings:",
				"  tunnel: {port: 6081}",
				"nodePools:",
				"  - name: edge",
				"    nodeSelector: {matchLabels: {pool: edge}}",
				"  - name: core",
				"    nodeSelector: {matchLabels: {pool: core}}",
				"    modules: {enable: [tunnel]}",
				"    settings:",
				"      tunnel:",
				"        protocol: gre",
			),
			want: `weir.yaml:12:19: nodePools[1].settings.tunnel.protocol: "gre" is not one of vxlan, geneve`,
		},
		{
			name: "unknown field in a pool settings section",
			doc: lines(
				"modules: [endpoints]",
				"nodePools:",
				"  - name: edge",
				"    settings:",
				"      endpoints: {gateway: 10.0.0.1}",
			),
			want: `weir.yaml:5:19: nodePools[0].settings.endpoints: unknown field "gateway"; allowed fields: gatewayIP, mtu, routes`,
		},
		{
			name: "unknown settings key in a pool",
			doc: lines(
				"modules: [endpoints]",
				"nodePools:",
				"  - name: edge",
				"    settings: {tunel: {}}",
			),
			want: `weir.yaml:4:16: nodePools[0].settings.tunel: unknown module "tunel"; known modules: bridge, endpoints, lb, socketlb, tunnel`,
		},
		{
			name: "pool with a bad operator",
			doc: lines(
				"modules: [endpoints]",
				"nodePools:",
				"  - name: edge",
				"    nodeSelector:",
				"      matchExpressions:",
				"        - key: zone",
				"          operator: Equals",
				"          values: [a]",
			),
			want: `weir.yaml:7:21: nodePools[0].nodeSelector.matchExpressions[0].operator: "Equals" is not one of In, NotIn, Exists, DoesNotExist`,
		},
		{
			name: "pool with a missing operator",
			doc: lines(
				"nodePools:",
				"  - name: edge",
				"    nodeSelector:",
				"      matchExpressions: [{key: zone}]",
			),
			want: `weir.yaml:4:26: nodePools[0].nodeSelector.matchExpressions[0].operator: missing; use one of In, NotIn, Exists, DoesNotExist`,
		},
		{
			name: "In without values",
			doc: lines(
				"nodePools:",
				"  - name: edge",
				"    nodeSelector:",
				"      matchExpressions: [{key: zone, operator: In}]",
			),
			want: `weir.yaml:4:26: nodePools[0].nodeSelector.matchExpressions[0].values: operator In needs at least one value`,
		},
		{
			name: "Exists with values",
			doc: lines(
				"nodePools:",
				"  - name: edge",
				"    nodeSelector:",
				"      matchExpressions: [{key: zone, operator: Exists, values: [a]}]",
			),
			want: `weir.yaml:4:64: nodePools[0].nodeSelector.matchExpressions[0].values: operator Exists takes no values; remove them`,
		},
		{
			name: "requirement without a key",
			doc: lines(
				"nodePools:",
				"  - name: edge",
				"    nodeSelector:",
				"      matchExpressions: [{operator: Exists}]",
			),
			want: `weir.yaml:4:26: nodePools[0].nodeSelector.matchExpressions[0].key: missing; each requirement needs the label key it tests`,
		},
		{
			name: "empty label key",
			doc: lines(
				"nodePools:",
				"  - name: edge",
				"    nodeSelector:",
				`      matchLabels: {"": x}`,
			),
			want: `weir.yaml:4:21: nodePools[0].nodeSelector.matchLabels[""]: label key is empty; use a label name such as node.weir.dev/pool`,
		},
		{
			name: "pool without a name",
			doc: lines(
				"nodePools:",
				"  - nodeSelector: {matchLabels: {a: b}}",
			),
			want: `weir.yaml:2:5: nodePools[0].name: missing; every pool needs a name, unique among nodePools`,
		},
		{
			name: "pool name duplicate",
			doc: lines(
				"nodePools:",
				"  - name: edge",
				"    nodeSelector: {matchLabels: {a: b}}",
				"  - name: edge",
				"    nodeSelector: {matchLabels: {a: c}}",
			),
			want: `weir.yaml:4:11: nodePools[1].name: "edge" is already used by nodePools[0]`,
		},
		{
			name: "disable of a module that is not enabled",
			doc: lines(
				"modules: [endpoints]",
				"nodePools:",
				"  - name: edge",
				"    modules:",
				"      disable: [endpoints, lb]",
			),
			want: `weir.yaml:5:28: nodePools[0].modules.disable[1]: module "lb" is not enabled by modules, so there is nothing to disable; modules enables: endpoints`,
		},
		{
			name: "enable and disable one module",
			doc: lines(
				"modules: [endpoints]",
				"nodePools:",
				"  - name: edge",
				"    modules: {enable: [tunnel], disable: [tunnel]}",
			),
			want: `weir.yaml:4:43: nodePools[0].modules.disable[0]: module "tunnel" is also enabled by nodePools[0].modules.enable[0]; a pool may enable a module or disable it, not both`,
		},
		{
			name: "enable of an unknown module",
			doc: lines(
				"modules: [endpoints]",
				"nodePools:",
				"  - name: edge",
				"    modules: {enable: [tunnel, vxlan]}",
			),
			want: `weir.yaml:4:32: nodePools[0].modules.enable[1]: unknown module "vxlan"; known modules: bridge, endpoints, lb, socketlb, tunnel`,
		},
		{
			name: "enable of a module already enabled",
			doc: lines(
				"modules: [endpoints, lb]",
				"nodePools:",
				"  - name: edge",
				"    modules: {enable: [lb]}",
			),
			want: `weir.yaml:4:24: nodePools[0].modules.enable[0]: module "lb" is already enabled by modules[1]`,
		},
		{
			name: "pool disables a requirement",
			doc: lines(
				"modules: [endpoints, lb]",
				"nodePools:",
				"  - name: edge",
				"    modules: {disable: [endpoints]}",
			),
			want: `weir.yaml:4:14: nodePools[0] ("edge"): module "lb" (modules[1]) requires module "endpoints", which is not enabled`,
		},
		{
			name: "pool enables a conflicting slot claimant",
			doc: lines(
				"modules: [endpoints, tunnel]",
				"nodePools:",
				"  - name: edge",
				"    modules:",
				"      enable: [bridge]",
			),
			want: `weir.yaml:5:7: nodePools[0] ("edge"): modules "bridge" (nodePools[0].modules.enable[0]) and "tunnel" (modules[1]) both claim slot pod-egress/forward (forwarding mode); enable only one`,
		},
		{
			name: "ctMaxEntries out of range",
			doc: lines(
				"modules: [endpoints]",
				"datapath:",
				"  ctMaxEntries: 100",
			),
			want: `weir.yaml:3:17: datapath.ctMaxEntries: 100 is out of range; allowed 1024 to 16777216 (default 262144)`,
		},
		{
			name: "ctMaxEntries beyond uint32",
			doc: lines(
				"datapath:",
				"  ctMaxEntries: 5000000000",
			),
			want: `weir.yaml:2:17: datapath.ctMaxEntries: 5000000000 is out of range (0 to 4294967295)`,
		},
		{
			name: "unknown top-level field",
			doc: lines(
				"modulez: [endpoints]",
			),
			want: `weir.yaml:1:1: unknown field "modulez"; allowed fields: datapath, modules, nodePools, plugins, settings`,
		},
		{
			name: "malformed YAML",
			doc: lines(
				"modules: [endpoints]",
				"settings:",
				"  endpoints: {mtu: 1500",
				"datapath: {}",
			),
			want: `weir.yaml:3: not valid YAML: did not find expected ',' or '}'`,
		},
		{
			name: "tabs",
			doc: lines(
				"modules: [endpoints]",
				"settings:",
				"\tendpoints: {}",
			),
			want: `weir.yaml:3: not valid YAML: found character that cannot start any token`,
		},
	}
	cat := testCatalog(t)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse("weir.yaml", []byte(tc.doc), cat)
			if err == nil {
				t.Fatalf("accepted; pools: %+v", c.File.NodePools)
			}
			var e *strictyaml.Error
			if !errors.As(err, &e) {
				t.Errorf("error is %T, want *strictyaml.Error", err)
			}
			if err.Error() != tc.want {
				t.Errorf("got  %s\nwant %s", err, tc.want)
			}
		})
	}
}

func TestParseDefaults(t *testing.T) {
	cat := testCatalog(t)
	c, err := Parse("weir.yaml", []byte("modules: [endpoints, lb]\n"), cat)
	if err != nil {
		t.Fatal(err)
	}
	eff, err := c.Resolve(nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := names(eff.Modules); !reflect.DeepEqual(got, []string{"endpoints", "lb"}) {
		t.Errorf("modules = %v", got)
	}
	if eff.Datapath.CTMaxEntries != DefaultCTMaxEntries {
		t.Errorf("ctMaxEntries = %d, want the default %d", eff.Datapath.CTMaxEntries, DefaultCTMaxEntries)
	}
	want := map[string]module.Settings{"endpoints": &endpointsSettings{GatewayIP: "169.254.1.1", MTU: 1500}}
	if !reflect.DeepEqual(eff.Settings, want) {
		t.Errorf("settings = %+v, want defaults %+v", eff.Settings, want)
	}

	// An empty file is a valid configuration that runs nothing.
	c, err = Parse("empty.yaml", nil, cat)
	if err != nil {
		t.Fatal(err)
	}
	if eff, err := c.Resolve(map[string]string{"a": "b"}); err != nil || len(eff.Modules) != 0 || eff.Pool != "" {
		t.Errorf("empty file resolves to %+v, %v", eff, err)
	}
}

func TestStartOrderFollowsRequirements(t *testing.T) {
	c, err := Parse("weir.yaml", []byte("modules: [lb, tunnel, endpoints]\n"), testCatalog(t))
	if err != nil {
		t.Fatal(err)
	}
	eff, _ := c.Resolve(nil)
	if got, want := names(eff.Modules), []string{"endpoints", "lb", "tunnel"}; !reflect.DeepEqual(got, want) {
		t.Errorf("start order %v, want %v", got, want)
	}
}

func TestResolve(t *testing.T) {
	c, err := Load(filepath.Join("testdata", "node-pools.yaml"), testCatalog(t))
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name    string
		labels  map[string]string
		pool    string
		modules []string
	}{
		{"no labels", nil, "", []string{"endpoints", "lb"}},
		{"matchLabels", map[string]string{"node.weir.dev/pool": "edge"}, "edge", []string{"endpoints", "lb", "tunnel"}},
		{"matchLabels value differs", map[string]string{"node.weir.dev/pool": "core"}, "", []string{"endpoints", "lb"}},
		{"first match wins", map[string]string{"node.weir.dev/pool": "edge", "topology.kubernetes.io/zone": "a"}, "edge", []string{"endpoints", "lb", "tunnel"}},
		{"In", map[string]string{"topology.kubernetes.io/zone": "b"}, "zoned", []string{"endpoints"}},
		{"In, value not listed", map[string]string{"topology.kubernetes.io/zone": "c"}, "", []string{"endpoints", "lb"}},
		{"Exists and NotIn without the label", map[string]string{"rack": "r1"}, "racked", []string{"endpoints", "lb"}},
		{"NotIn with a listed value", map[string]string{"rack": "r1", "gpu": "true"}, "", []string{"endpoints", "lb"}},
		{"NotIn with another value", map[string]string{"rack": "r1", "gpu": "false"}, "racked", []string{"endpoints", "lb"}},
		{"DoesNotExist", map[string]string{"tier": "bare"}, "bare", []string{"endpoints", "lb"}},
		{"DoesNotExist, label present", map[string]string{"tier": "bare", "node-role.kubernetes.io/control-plane": ""}, "", []string{"endpoints", "lb"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			eff, err := c.Resolve(tc.labels)
			if err != nil {
				t.Fatal(err)
			}
			if eff.Pool != tc.pool || !reflect.DeepEqual(names(eff.Modules), tc.modules) {
				t.Errorf("got pool %q modules %v, want pool %q modules %v", eff.Pool, names(eff.Modules), tc.pool, tc.modules)
			}
			if eff.Datapath.CTMaxEntries != 524288 {
				t.Errorf("ctMaxEntries = %d", eff.Datapath.CTMaxEntries)
			}
			for _, f := range eff.Modules {
				if _, ok := eff.Settings[f.Name]; ok != (f.NewSettings != nil) {
					t.Errorf("settings for %s present=%v, want %v", f.Name, ok, f.NewSettings != nil)
				}
			}
		})
	}
}

func TestPoolSettingsDeepMerge(t *testing.T) {
	c, err := Load(filepath.Join("testdata", "node-pools.yaml"), testCatalog(t))
	if err != nil {
		t.Fatal(err)
	}
	edge, err := c.Resolve(map[string]string{"node.weir.dev/pool": "edge"})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]module.Settings{
		// protocol from the pool, port from the top-level section.
		"tunnel": &tunnelSettings{Protocol: "geneve", Port: 4789},
		// mtu from the pool, gatewayIP from the top level.
		"endpoints": &endpointsSettings{GatewayIP: "169.254.1.1", MTU: 1400},
	}
	if !reflect.DeepEqual(edge.Settings, want) {
		t.Errorf("edge settings = %s, want %s", dump(edge.Settings), dump(want))
	}
	top, _ := c.Resolve(nil)
	want = map[string]module.Settings{"endpoints": &endpointsSettings{GatewayIP: "169.254.1.1", MTU: 1450}}
	if !reflect.DeepEqual(top.Settings, want) {
		t.Errorf("top-level settings = %s, want %s (the pool's merge must not leak)", dump(top.Settings), dump(want))
	}
	if _, ok := top.Settings["tunnel"]; ok {
		t.Error("settings for tunnel, which the top level does not enable")
	}
}

func TestMergeRules(t *testing.T) {
	doc := lines(
		"modules: [endpoints]",
		"settings:",
		"  endpoints:",
		"    mtu: 9000",
		"    routes:",
		"      - {cidr: 10.0.0.0/8, via: 10.0.0.1}",
		"      - {cidr: 10.1.0.0/16, via: 10.0.0.2}",
		"nodePools:",
		"  - name: replace-list",
		"    nodeSelector: {matchLabels: {p: a}}",
		"    settings:",
		"      endpoints:",
		"        routes: [{cidr: 0.0.0.0/0, via: 10.9.9.9}]",
		"  - name: null-section",
		"    nodeSelector: {matchLabels: {p: b}}",
		"    settings:",
		"      endpoints:",
	)
	c, err := Parse("weir.yaml", []byte(doc), testCatalog(t))
	if err != nil {
		t.Fatal(err)
	}
	a, _ := c.Resolve(map[string]string{"p": "a"})
	wantA := &endpointsSettings{GatewayIP: "169.254.1.1", MTU: 9000, Routes: []route{{CIDR: "0.0.0.0/0", Via: "10.9.9.9"}}}
	if !reflect.DeepEqual(a.Settings["endpoints"], wantA) {
		t.Errorf("sequences are replaced, not merged: got %+v, want %+v", a.Settings["endpoints"], wantA)
	}
	b, _ := c.Resolve(map[string]string{"p": "b"})
	top, _ := c.Resolve(nil)
	if !reflect.DeepEqual(b.Settings, top.Settings) {
		t.Errorf("an empty pool section changed settings: %s vs %s", dump(b.Settings), dump(top.Settings))
	}
}

func TestEmptySelectorMatchesEveryNode(t *testing.T) {
	doc := lines(
		"modules: [endpoints]",
		"nodePools:",
		"  - name: zoned",
		"    nodeSelector:",
		"      matchExpressions: [{key: zone, operator: Exists}]",
		"  - name: rest",
		"    modules: {enable: [lb]}",
	)
	c, err := Parse("weir.yaml", []byte(doc), testCatalog(t))
	if err != nil {
		t.Fatal(err)
	}
	for labels, want := range map[string]string{"zone": "zoned", "other": "rest"} {
		eff, err := c.Resolve(map[string]string{labels: "x"})
		if err != nil || eff.Pool != want {
			t.Errorf("label %s: pool %q, %v; want %q", labels, eff.Pool, err, want)
		}
	}
	if eff, _ := c.Resolve(nil); eff.Pool != "rest" {
		t.Errorf("no labels: pool %q, want rest", eff.Pool)
	}
}

func TestResolveReturnsACopy(t *testing.T) {
	c, err := Parse("weir.yaml", []byte("modules: [endpoints, lb]\n"), testCatalog(t))
	if err != nil {
		t.Fatal(err)
	}
	first, _ := c.Resolve(nil)
	first.Modules[0] = module.Factory{}
	delete(first.Settings, "endpoints")
	second, _ := c.Resolve(nil)
	if second.Modules[0].Name != "endpoints" || second.Settings["endpoints"] == nil {
		t.Errorf("changing one result changed the next: %+v", second)
	}
}

func TestResolveOnUnparsedConfig(t *testing.T) {
	var nilConfig *Config
	for _, c := range []*Config{nilConfig, {}} {
		if _, err := c.Resolve(nil); err == nil {
			t.Errorf("Resolve on %+v succeeded", c)
		}
	}
}

func TestLoadErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "absent.yaml")
	_, err := Load(missing, testCatalog(t))
	if !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), missing) {
		t.Errorf("got %v, want a not-exist error naming %s", err, missing)
	}
	if _, err := Parse("weir.yaml", []byte("modules: []\n"), nil); err == nil || !strings.Contains(err.Error(), "weir.yaml") {
		t.Errorf("nil catalog: got %v", err)
	}
}

// FuzzParse checks that no input makes Parse panic.
func FuzzParse(f *testing.F) {
	data, err := os.ReadFile(filepath.Join("testdata", "node-pools.yaml"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(string(data))
	f.Add("settings: {endpoints: &a {routes: [*a]}}\nnodePools: [{name: x, settings: {endpoints: *a}}]\n")
	cat := testCatalog(f)
	f.Fuzz(func(t *testing.T, doc string) {
		c, err := Parse("f.yaml", []byte(doc), cat)
		if err == nil {
			if _, err := c.Resolve(map[string]string{"a": "b"}); err != nil {
				t.Fatalf("Resolve failed on a parsed config: %v", err)
			}
		}
	})
}

func TestFieldPathRoundTrip(t *testing.T) {
	for _, s := range []string{"gatewayIP", "routes[1].via", "a.b[2][3].c"} {
		if got := parseFieldPath(s).String(); got != s {
			t.Errorf("parseFieldPath(%q).String() = %q", s, got)
		}
	}
}

func names(facs []module.Factory) []string {
	var out []string
	for _, f := range facs {
		out = append(out, f.Name)
	}
	return out
}

func dump(m map[string]module.Settings) string {
	var b strings.Builder
	for _, k := range slices.Sorted(maps.Keys(m)) {
		fmt.Fprintf(&b, "%s:%+v ", k, m[k])
	}
	return b.String()
}

// Pools that tunnel differently could not reach each other; pools that do
// not tunnel mix freely with those that do.
func TestPoolsMustTunnelAlike(t *testing.T) {
	base := "modules: [endpoints, tunnel]\nnodePools:\n  - name: edge\n    nodeSelector: {matchLabels: {a: b}}\n"
	_, err := Parse("weir.yaml", []byte(base+"    settings: {tunnel: {protocol: geneve, port: 6081}}\n"), testCatalog(t))
	want := `pool "edge" tunnels with geneve/6081 but the top-level modules tunnel with vxlan/8472`
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("pools tunnelling differently: %v", err)
	}
	if _, err := Parse("weir.yaml", []byte(base+"    modules: {disable: [tunnel]}\n"), testCatalog(t)); err != nil {
		t.Fatalf("a pool that does not tunnel: %v", err)
	}
	if _, err := Parse("weir.yaml", []byte(base+"    settings: {tunnel: {protocol: vxlan}}\n"), testCatalog(t)); err != nil {
		t.Fatalf("a pool that tunnels alike: %v", err)
	}
}

func TestConntrackGCIntervals(t *testing.T) {
	for _, c := range []struct {
		doc, want string
	}{
		{"datapath: {ctGCInterval: soon}", `datapath.ctGCInterval: "soon" is not a duration (such as 30s, 5m, 1h)`},
		{"datapath: {ctGCMinInterval: 100ms}", "datapath.ctGCMinInterval: 100ms is shorter than the allowed 1s"},
		{"datapath: {ctGCInterval: 1m, ctGCMinInterval: 2m}", "datapath.ctGCInterval: 1m0s is not between ctGCMinInterval 2m0s and ctGCMaxInterval 12h0m0s"},
	} {
		_, err := Parse("agent.yaml", []byte("modules: [endpoints]\n"+c.doc+"\n"), testCatalog(t))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want %q", c.doc, err, c.want)
		}
	}
	cfg, err := Parse("agent.yaml", []byte("modules: [endpoints]\ndatapath: {ctGCInterval: 1s}\n"), testCatalog(t))
	if err != nil {
		t.Fatal(err)
	}
	iv, lo, hi, _, err := cfg.File.Datapath.GCIntervals()
	if err != nil || iv != time.Second || lo != time.Second || hi != 12*time.Hour {
		t.Fatalf("intervals %v %v %v (%v), want 1s 1s 12h", iv, lo, hi, err)
	}
}

// The plugins section is read on its own, before the catalog exists, and
// every mistake in it names the entry and what is allowed.
func TestReadPlugins(t *testing.T) {
	const sum = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	write := func(doc string) string {
		p := filepath.Join(t.TempDir(), "weir.yaml")
		if err := os.WriteFile(p, []byte(doc), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	got, err := ReadPlugins(write("modules: [lb]\nplugins:\n  - {name: ratelimit, path: /opt/weir/ratelimit, sha256: " + sum + ", failurePolicy: closed, callTimeout: 3s}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Name != "ratelimit" || got[0].FailurePolicy != FailClosed || got[0].Timeout() != 3*time.Second {
		t.Fatalf("%+v", got)
	}
	if got, err := ReadPlugins(write("modules: [lb]\n")); err != nil || len(got) != 0 {
		t.Fatalf("no plugins: %v %v", got, err)
	}
	for doc, want := range map[string]string{
		"plugins:\n  - {name: rl, path: ratelimit, sha256: " + sum + "}\n":                                         `plugins[0]: path "ratelimit" is not an absolute path to the plugin binary`,
		"plugins:\n  - {name: rl, path: /x, sha256: abc}\n":                                                        `plugins[0]: sha256 "abc" is not a SHA-256 checksum (64 hex digits; sha256sum prints it)`,
		"plugins:\n  - {name: rl, path: /x, sha256: " + sum + ", failurePolicy: fail}\n":                           `plugins[0]: failurePolicy "fail" is not one of open, closed`,
		"plugins:\n  - {name: rl, path: /x, sha256: " + sum + ", callTimeout: soon}\n":                             `plugins[0]: callTimeout "soon" is not a positive duration (such as 10s)`,
		"plugins:\n  - {name: rl, path: /x, sha256: " + sum + ", checksum: x}\n":                                   `unknown field "checksum"`,
		"plugins:\n  - {name: rl, path: /x, sha256: " + sum + "}\n  - {name: rl, path: /y, sha256: " + sum + "}\n": `plugins[1].name: plugin "rl" is already declared as plugins[0]`,
	} {
		_, err := ReadPlugins(write(doc))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want %s", doc, err, want)
		}
	}
}
