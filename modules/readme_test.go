package modules

import (
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
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
			if f.NewSettings == nil {
				return
			}
			typ := reflect.TypeOf(f.NewSettings()).Elem()
			for i := range typ.NumField() {
				name, _, _ := strings.Cut(typ.Field(i).Tag.Get("yaml"), ",")
				if name == "" || name == "-" {
					continue
				}
				if !strings.Contains(sections["Settings"], "`"+name+"`") {
					t.Errorf("section Settings does not document `%s`", name)
				}
			}
		})
	}
}
