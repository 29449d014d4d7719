package lab

import (
	"reflect"
	"testing"

	"gopkg.in/yaml.v3"
)

// A services file gets the lab's nodes whichever way it is written: the
// quick path (text appended to a plain block mapping) gives what the full
// parse gives, and files it cannot be sure of take the full parse.
func TestWithNodesAddsTheLabsNodes(t *testing.T) {
	l := &Lab{Spec: Spec{Underlay: "192.168.100.0/24", Nodes: []NodeSpec{
		{Name: "n1", PodCIDR: "10.244.1.0/24"},
		{Name: "n2", PodCIDR: "10.244.2.0/24", Labels: map[string]string{"pool": "edge"}},
	}}}
	want := []any{
		map[string]any{"name": "n1", "ip": "192.168.100.11", "podCIDRs": []any{"10.244.1.0/24"}},
		map[string]any{"name": "n2", "ip": "192.168.100.12", "podCIDRs": []any{"10.244.2.0/24"}, "labels": map[string]any{"pool": "edge"}},
	}
	cases := map[string]struct {
		file  string
		quick bool
	}{
		"block mapping":          {"services:\n  - name: web\n    clusterIP: 10.96.0.10 # web\n", true},
		"empty list":             {"# none\nservices: []\n", true},
		"sequence at column 0":   {"services:\n- name: web\n  clusterIP: 10.96.0.10\n", false},
		"flow mapping":           {"{services: []}\n", false},
		"flow list across lines": {"services: [\n  {name: web, clusterIP: 10.96.0.10}]\n", false},
		"no newline at the end":  {"services: []", false},
		"anchor":                 {"services: &s []\n", false},
		"several documents":      {"services: []\n---\nservices: []\n", false},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			if _, ok := blockMappingKeys([]byte(c.file)); ok != c.quick {
				t.Errorf("quick path %v, want %v", ok, c.quick)
			}
			out, err := l.withNodes([]byte(c.file))
			if err != nil {
				t.Fatal(err)
			}
			var got map[string]any
			if err := yaml.Unmarshal(out, &got); err != nil {
				t.Fatalf("result is not YAML: %v\n%s", err, out)
			}
			if !reflect.DeepEqual(got["nodes"], want) {
				t.Errorf("nodes %v, want %v\n%s", got["nodes"], want, out)
			}
			if _, ok := got["services"]; !ok {
				t.Errorf("services lost:\n%s", out)
			}
		})
	}
	// A file that names its nodes keeps them.
	own := "services: []\nnodes: []\n"
	if out, _ := l.withNodes([]byte(own)); string(out) != own {
		t.Errorf("a file with nodes became %q", out)
	}
}
