package modules

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/weirnet/weir/core/config"
)

// The real registry's requirements reach the user as configuration errors
// naming the module, the field and what to enable.
func TestRequirementsOfTheInTreeModules(t *testing.T) {
	reg, err := Registry()
	if err != nil {
		t.Fatal(err)
	}
	cases := map[string]string{
		"modules: [endpoints, socketlb]\n": `modules: module "socketlb" (modules[1]) requires module "lb", which is not enabled`,
		"modules: [socketlb, lb]\n":        `modules: module "lb" (modules[1]) requires module "endpoints", which is not enabled`,
	}
	for yaml, want := range cases {
		path := filepath.Join(t.TempDir(), "weir.yaml")
		if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := config.Load(path, reg)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v; want %q", yaml, err, want)
		}
	}
	path := filepath.Join(t.TempDir(), "weir.yaml")
	if err := os.WriteFile(path, []byte("modules: [endpoints, lb, socketlb]\nsettings:\n  socketlb:\n    hostNamespaceOnly: true\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := config.Load(path, reg); err != nil {
		t.Errorf("endpoints, lb, socketlb: %v", err)
	}
}
