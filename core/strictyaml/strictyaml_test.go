package strictyaml

import (
	"errors"
	"math"
	"reflect"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

type tunnel struct {
	Protocol string `yaml:"protocol"`
	Port     uint16 `yaml:"port,omitempty"`
}

type pool struct {
	Name     string               `yaml:"name"`
	Labels   map[string]string    `yaml:"labels"`
	Settings map[string]yaml.Node `yaml:"settings"`
	Tunnel   *tunnel              `yaml:"tunnel"`
}

type limits struct {
	I8  int8    `yaml:"i8"`
	I64 int64   `yaml:"i64"`
	U8  uint8   `yaml:"u8"`
	U16 uint16  `yaml:"u16"`
	U32 uint32  `yaml:"u32"`
	U64 uint64  `yaml:"u64"`
	F32 float32 `yaml:"f32"`
	F64 float64 `yaml:"f64"`
}

type file struct {
	Modules  []string             `yaml:"modules"`
	Settings map[string]yaml.Node `yaml:"settings"`
	Datapath struct {
		CT uint32 `yaml:"ctMaxEntries"`
	} `yaml:"datapath"`
	NodePools []pool     `yaml:"nodePools"`
	Enabled   bool       `yaml:"enabled"`
	Limits    limits     `yaml:"limits"`
	Raw       *yaml.Node `yaml:"raw"`
	Skipped   string     `yaml:"-"`
	Untagged  string
}

func TestDecodeErrors(t *testing.T) {
	cases := []struct {
		name string
		doc  string
		path string
		line int
		col  int
		msg  string // substring of Msg
	}{
		{
			name: "unknown top-level field",
			doc:  "modules: []\nmodulez: [lb]\n",
			line: 2, col: 1,
			msg: `unknown field "modulez"; allowed fields: datapath, enabled, limits, modules, nodePools, raw, settings, untagged`,
		},
		{
			name: "unknown nested field",
			doc:  "nodePools:\n  - name: a\n  - name: b\n    tunnel:\n      protocl: geneve\n",
			path: "nodePools[1].tunnel", line: 5, col: 7,
			msg: `unknown field "protocl"; allowed fields: port, protocol`,
		},
		{
			name: "yaml:\"-\" field is unknown",
			doc:  "Skipped: x\n",
			line: 1, col: 1,
			msg: `unknown field "Skipped"`,
		},
		{
			name: "duplicate key in struct",
			doc:  "modules: [a]\nenabled: true\nmodules: [b]\n",
			line: 3, col: 1,
			msg: `duplicate key "modules" (first at line 1)`,
		},
		{
			name: "duplicate key in map",
			doc:  "nodePools:\n  - labels:\n      zone: a\n      zone: b\n",
			path: "nodePools[0].labels", line: 4, col: 7,
			msg: `duplicate key "zone" (first at line 3)`,
		},
		{
			name: "sequence where a mapping is expected",
			doc:  "datapath: [1, 2]\n",
			path: "datapath", line: 1, col: 11,
			msg: "expected a mapping, found a sequence",
		},
		{
			name: "mapping where a sequence is expected",
			doc:  "modules:\n  lb: true\n",
			path: "modules", line: 2, col: 3,
			msg: "expected a sequence, found a mapping",
		},
		{
			name: "scalar where a mapping is expected",
			doc:  "nodePools: [edge]\n",
			path: "nodePools[0]", line: 1, col: 13,
			msg: `expected a mapping, found the scalar "edge"`,
		},
		{
			name: "mapping where a string is expected",
			doc:  "modules: [{a: b}]\n",
			path: "modules[0]", line: 1, col: 11,
			msg: "expected a scalar, found a mapping",
		},
		{
			name: "not an integer",
			doc:  "datapath:\n  ctMaxEntries: abc\n",
			path: "datapath.ctMaxEntries", line: 2, col: 17,
			msg: `"abc" is not an integer`,
		},
		{
			name: "quoted integer",
			doc:  "limits: {u16: \"80\"}\n",
			path: "limits.u16", line: 1, col: 15,
			msg: `"80" is a quoted string, not an integer`,
		},
		{
			name: "float for an integer",
			doc:  "limits: {u16: 1.5}\n",
			path: "limits.u16", line: 1, col: 15,
			msg: `"1.5" is not an integer`,
		},
		{
			name: "uint16 overflow",
			doc:  "nodePools:\n  - tunnel:\n      port: 70000\n",
			path: "nodePools[0].tunnel.port", line: 3, col: 13,
			msg: "70000 is out of range (0 to 65535)",
		},
		{
			name: "negative for unsigned",
			doc:  "limits:\n  u32: -1\n",
			path: "limits.u32", line: 2, col: 8,
			msg: "-1 is out of range (0 to 4294967295)",
		},
		{
			name: "int8 underflow",
			doc:  "limits: {i8: -129}\n",
			path: "limits.i8", line: 1, col: 14,
			msg: "-129 is out of range (-128 to 127)",
		},
		{
			name: "beyond 64 bits",
			doc:  "limits: {u64: 18446744073709551616}\n",
			path: "limits.u64",
			line: 1, col: 15,
			msg: "18446744073709551616 is out of range (0 to 18446744073709551615)",
		},
		{
			name: "hex overflow",
			doc:  "limits: {u8: 0x100}\n",
			path: "limits.u8", line: 1, col: 14,
			msg: "0x100 is out of range (0 to 255)",
		},
		{
			name: "double sign",
			doc:  "limits: {i64: --1}\n",
			path: "limits.i64", line: 1, col: 15,
			msg: `"--1" is not an integer`,
		},
		{
			name: "yes is not a bool",
			doc:  "enabled: yes\n",
			path: "enabled", line: 1, col: 10,
			msg: `"yes" is not a boolean; use true or false`,
		},
		{
			name: "True is not a bool",
			doc:  "enabled: True\n",
			path: "enabled", line: 1, col: 10,
			msg: `"True" is not a boolean`,
		},
		{
			name: "quoted bool",
			doc:  "enabled: 'true'\n",
			path: "enabled", line: 1, col: 10,
			msg: `"true" is a quoted string, not a boolean`,
		},
		{
			name: "not a float",
			doc:  "limits: {f64: fast}\n",
			path: "limits.f64", line: 1, col: 15,
			msg: `"fast" is not a number`,
		},
		{
			name: "float32 overflow",
			doc:  "limits: {f32: 1e39}\n",
			path: "limits.f32", line: 1, col: 15,
			msg: "1e39 is out of range for a 32-bit float",
		},
		{
			name: "map key with dots is bracketed",
			doc:  "nodePools:\n  - labels:\n      node.weir.dev/pool: [edge]\n",
			path: `nodePools[0].labels["node.weir.dev/pool"]`, line: 3, col: 27,
			msg: "expected a scalar, found a sequence",
		},
		{
			name: "alias",
			doc:  "nodePools:\n  - name: &n a\n  - name: *n\n",
			path: "nodePools[1].name", line: 3, col: 11,
			msg: "aliases (*n) are not supported",
		},
		{
			name: "merge key inside a struct",
			doc:  "nodePools:\n  - <<: {name: a}\n",
			path: "nodePools[0]", line: 2, col: 5,
			msg: "merge keys (<<) are not supported",
		},
		{
			name: "complex key",
			doc:  "? [a]\n: b\n",
			line: 1, col: 3,
			msg: "expected a scalar key, found a sequence",
		},
		{
			name: "syntax error",
			doc:  "modules: []\nenabled: true\nuntagged: a: b\n",
			line: 3,
			msg:  "not valid YAML: mapping values are not allowed in this context",
		},
		{
			name: "unclosed list",
			doc:  "datapath: {}\nmodules: [lb\nsettings: {}\n",
			line: 2, // where the unclosed list starts
			msg:  "not valid YAML: did not find expected ',' or ']'",
		},
		{
			name: "bad indentation",
			doc:  "modules:\n  - lb\n bad: 1\n",
			line: 3,
			msg:  "not valid YAML: did not find expected key",
		},
		{
			name: "parser error at the end",
			doc:  "[a, b\n",
			line: 1,
			msg:  "not valid YAML: did not find expected ',' or ']'",
		},
		{
			name: "scanner error on the first line",
			doc:  "a: b: c\n",
			line: 1,
			msg:  "not valid YAML: mapping values are not allowed in this context",
		},
		{
			name: "bad encoding",
			doc:  "a: \xff\n",
			msg:  "not valid YAML: invalid leading UTF-8 octet",
		},
		{
			name: "unknown anchor",
			doc:  "a: *x\n",
			msg:  "not valid YAML: unknown anchor 'x' referenced",
		},
		{
			name: "tab indentation",
			doc:  "datapath:\n\tctMaxEntries: 1\n",
			line: 2,
			msg:  "not valid YAML: found character that cannot start any token",
		},
		{
			name: "second document",
			doc:  "modules: []\n---\nmodules: [lb]\n",
			line: 2, col: 1,
			msg: "a second YAML document starts here",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var f file
			err := Decode("weir.yaml", []byte(tc.doc), &f)
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("got %v (%T), want *Error", err, err)
			}
			if e.File != "weir.yaml" || e.Path != tc.path || e.Line != tc.line || e.Column != tc.col || !strings.Contains(e.Msg, tc.msg) {
				t.Errorf("got file=%q path=%q line=%d col=%d msg=%q\nwant path=%q line=%d col=%d msg containing %q",
					e.File, e.Path, e.Line, e.Column, e.Msg, tc.path, tc.line, tc.col, tc.msg)
			}
		})
	}
}

func TestDecodeSuccess(t *testing.T) {
	doc := `
modules: [endpoints, lb]
settings:
  endpoints: {gatewayIP: 169.254.1.1}
  lb:
datapath:
  ctMaxEntries: 0x40000
enabled: false
limits: {i8: -128, i64: -9223372036854775808, u8: 255, u16: 010, u32: 0o17, u64: 18446744073709551615, f32: 1.5, f64: -.inf}
raw: [1, {a: b}]
untagged: plain
nodePools:
  - name: edge
    labels: {node.weir.dev/pool: edge, zone: a}
    tunnel: {protocol: geneve, port: 6081}
    settings:
      tunnel: {protocol: geneve}
  - name: plain
    tunnel: ~
`
	var f file
	f.Datapath.CT = 7 // a default the document overrides
	f.Enabled = true
	if err := Decode("weir.yaml", []byte(doc), &f); err != nil {
		t.Fatal(err)
	}
	if want := []string{"endpoints", "lb"}; !reflect.DeepEqual(f.Modules, want) {
		t.Errorf("modules = %v, want %v", f.Modules, want)
	}
	if f.Datapath.CT != 0x40000 || f.Enabled || f.Untagged != "plain" {
		t.Errorf("scalars: ct=%d enabled=%v untagged=%q", f.Datapath.CT, f.Enabled, f.Untagged)
	}
	wantLimits := limits{I8: -128, I64: math.MinInt64, U8: 255, U16: 10, U32: 15, U64: math.MaxUint64, F32: 1.5, F64: math.Inf(-1)}
	if f.Limits != wantLimits {
		t.Errorf("limits = %+v, want %+v", f.Limits, wantLimits)
	}
	ep := f.Settings["endpoints"]
	if ep.Kind != yaml.MappingNode || ep.Line != 4 {
		t.Errorf("settings.endpoints captured as kind %v line %d, want a mapping at line 4", ep.Kind, ep.Line)
	}
	if lb, ok := f.Settings["lb"]; !ok || lb.ShortTag() != "!!null" {
		t.Errorf("settings.lb = %+v, want a captured null node", lb)
	}
	if f.Raw == nil || f.Raw.Kind != yaml.SequenceNode || len(f.Raw.Content) != 2 {
		t.Errorf("raw = %+v, want a two-item sequence", f.Raw)
	}
	if len(f.NodePools) != 2 {
		t.Fatalf("got %d pools, want 2", len(f.NodePools))
	}
	edge := f.NodePools[0]
	if edge.Name != "edge" || edge.Labels["node.weir.dev/pool"] != "edge" || edge.Labels["zone"] != "a" {
		t.Errorf("pool 0 = %+v", edge)
	}
	if edge.Tunnel == nil || *edge.Tunnel != (tunnel{Protocol: "geneve", Port: 6081}) {
		t.Errorf("pool 0 tunnel = %+v", edge.Tunnel)
	}
	if f.NodePools[1].Tunnel != nil {
		t.Errorf("a null pointer field was allocated: %+v", f.NodePools[1].Tunnel)
	}

	// A captured section decodes later with its own path and lines.
	sec := edge.Settings["tunnel"]
	var tun tunnel
	if err := DecodeNode("weir.yaml", &sec, "nodePools[0].settings.tunnel", &tun); err != nil || tun.Protocol != "geneve" {
		t.Fatalf("DecodeNode = %v, %+v", err, tun)
	}
	bad := f.Settings["endpoints"]
	err := DecodeNode("weir.yaml", &bad, "settings.endpoints", &tun)
	if got, want := err.Error(), `weir.yaml:4:15: settings.endpoints: unknown field "gatewayIP"; allowed fields: port, protocol`; got != want {
		t.Errorf("got %q\nwant %q", got, want)
	}
}

func TestEmptyAndNullLeaveValues(t *testing.T) {
	for _, doc := range []string{"", "# nothing\n", "---\n", "~\n", "null\n", "---\n...\n"} {
		f := file{Modules: []string{"default"}}
		if err := Decode("weir.yaml", []byte(doc), &f); err != nil {
			t.Errorf("%q: %v", doc, err)
		}
		if len(f.Modules) != 1 {
			t.Errorf("%q: defaults lost: %+v", doc, f.Modules)
		}
	}
}

func TestDecodeNodeRejectsBadTargets(t *testing.T) {
	n := &yaml.Node{Kind: yaml.ScalarNode, Value: "x"}
	var nilPtr *file
	for _, out := range []any{nil, file{}, nilPtr} {
		if err := DecodeNode("f", n, "p", out); err == nil {
			t.Errorf("%T accepted", out)
		}
	}
	var unsupported struct {
		C chan int       `yaml:"c"`
		M map[int]string `yaml:"m"`
		I any            `yaml:"i"`
	}
	for _, doc := range []string{"c: 1", "m: {1: a}", "i: 1"} {
		err := Decode("f", []byte(doc), &unsupported)
		if err == nil || !strings.Contains(err.Error(), "cannot decode into Go type") {
			t.Errorf("%q: got %v, want an unsupported type error", doc, err)
		}
	}
}

func TestErrorFormat(t *testing.T) {
	cases := []struct {
		e    Error
		want string
	}{
		{Error{File: "f.yaml", Line: 3, Column: 5, Path: "a.b", Msg: "bad"}, "f.yaml:3:5: a.b: bad"},
		{Error{File: "f.yaml", Line: 3, Msg: "bad"}, "f.yaml:3: bad"},
		{Error{File: "f.yaml", Path: "a", Msg: "bad"}, "f.yaml: a: bad"},
		{Error{Path: "a", Msg: "bad"}, "a: bad"},
		{Error{Line: 2, Column: 1, Msg: "bad"}, "2:1: bad"},
	}
	for _, tc := range cases {
		if got := tc.e.Error(); got != tc.want {
			t.Errorf("got %q, want %q", got, tc.want)
		}
	}
}

func TestPaths(t *testing.T) {
	cases := map[string]string{
		Key("", "modules"):                       "modules",
		Key("settings", "lb"):                    "settings.lb",
		Index(Key("", "nodePools"), 1):           "nodePools[1]",
		Key("matchLabels", "node.weir.dev/pool"): `matchLabels["node.weir.dev/pool"]`,
		Key("m", ""):                             `m[""]`,
	}
	for got, want := range cases {
		if got != want {
			t.Errorf("got %q, want %q", got, want)
		}
	}
}

// FuzzDecode checks that no input makes the decoder panic.
func FuzzDecode(f *testing.F) {
	f.Add("modules: [a]\nnodePools: [{name: x, tunnel: {port: 1}}]\n")
	f.Add("a: &a [*a]\nraw: *a\n")
	f.Add("limits: {u64: 0x}\n")
	f.Fuzz(func(t *testing.T, doc string) {
		var out file
		_ = Decode("f", []byte(doc), &out)
	})
}
