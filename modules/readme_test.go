package modules

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
)

// Every module's README says what the code does, in the fixed sections,
// and cannot drift from it: each slot the module claims (with the program
// that fills it), each module it requires, and each setting its settings
// type decodes appear there (as CoreDNS checks its plugin READMEs).
func TestREADMEsFollowTheCode(t *testing.T) {
	for _, f := range Factories {
		t.Run(f.Name, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join(f.Name, "README.md"))
			if err != nil {
				t.Fatalf("module %s has no README.md: %v", f.Name, err)
			}
			doc := string(b)
			sections := map[string]string{}
			parts := regexp.MustCompile(`(?m)^## `).Split(doc, -1)
			for _, p := range parts[1:] {
				title, body, _ := strings.Cut(p, "\n")
				sections[strings.TrimSpace(title)] = body
			}
			for _, s := range []string{"What it does", "Slots", "Maps", "Settings", "How it is tested"} {
				if _, ok := sections[s]; !ok {
					t.Errorf("README has no %q section", s)
				}
			}
			for _, c := range f.Slots {
				if !strings.Contains(sections["Slots"], "`"+c.Slot+"`") || !strings.Contains(sections["Slots"], "`"+c.Program) {
					t.Errorf("section Slots does not name slot `%s` filled by `%s`", c.Slot, c.Program)
				}
			}
			for _, c := range f.Cgroup {
				if !strings.Contains(sections["Slots"], "`"+c.Hook+"`") || !strings.Contains(sections["Slots"], "`"+c.Program) {
					t.Errorf("section Slots does not name cgroup hook `%s` taken by `%s`", c.Hook, c.Program)
				}
			}
			for _, r := range f.Requires {
				if !strings.Contains(sections["Slots"]+sections["What it does"], "`"+r+"`") {
					t.Errorf("README does not say the module requires `%s`", r)
				}
			}
			// The maps the module's object owns (not core's weir_*, not
			// its constants): dispatch modules share nodeport's object.
			if spec, err := ebpf.LoadCollectionSpec(filepath.Join(f.Name, strings.ReplaceAll(f.Name, "-", "")+"_bpfel.o")); err == nil {
				for name := range spec.Maps {
					if strings.HasPrefix(name, "weir_") || strings.HasPrefix(name, ".") {
						continue
					}
					if !strings.Contains(sections["Maps"], "`"+name+"`") {
						t.Errorf("section Maps does not name `%s`, which its object owns", name)
					}
				}
			} else if !os.IsNotExist(errors.Unwrap(err)) && !errors.Is(err, os.ErrNotExist) {
				t.Errorf("reading the module's object: %v", err)
			}
			if f.NewSettings == nil {
				return
			}
			defaults := reflect.ValueOf(f.NewSettings()).Elem()
			typ := defaults.Type()
			for i := range typ.NumField() {
				name, _, _ := strings.Cut(typ.Field(i).Tag.Get("yaml"), ",")
				if name == "" || name == "-" {
					continue
				}
				if !strings.Contains(sections["Settings"], "`"+name+"`") {
					t.Errorf("section Settings does not document `%s`", name)
					continue
				}
				// The default, where it is a value: on the setting's
				// line (a table row or a list item).
				v := defaults.Field(i)
				if v.IsZero() || (v.Kind() != reflect.String && v.Kind() != reflect.Bool && !v.CanInt() && !v.CanUint()) {
					continue
				}
				want := fmt.Sprint(v.Interface())
				def := regexp.MustCompile("(?m)^\\s*(\\| |- )`" + regexp.QuoteMeta(name) + "`.*$").FindString(sections["Settings"])
				if def != "" && !strings.Contains(def, want) {
					t.Errorf("section Settings gives `%s` without its default %s: %s", name, want, def)
				}
			}
		})
	}
}
