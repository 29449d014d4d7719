package module

import (
	"fmt"
	"slices"
	"strings"
)

// Enabled is a module chosen by configuration, with the config field that
// chose it, so errors can point at the line to change.
type Enabled struct {
	Name  string
	Field string // e.g. "modules[2]" or "nodePools[0].modules.enable[1]"
}

// Check validates a module set: every name known, every requirement
// present, no excluded pair, no slot claimed twice. where names the set in
// messages (e.g. "modules" or `nodePools[1] ("edge")`). It returns the
// modules in start order: each after the modules it requires, otherwise in
// name order.
func Check(cat Catalog, where string, set []Enabled) ([]Factory, error) {
	byName := map[string]Enabled{}
	var facs []Factory
	for _, e := range set {
		f, ok := cat.Lookup(e.Name)
		if !ok {
			return nil, fmt.Errorf("%s: unknown module %q; known modules: %s", e.Field, e.Name, strings.Join(cat.Names(), ", "))
		}
		if prev, dup := byName[e.Name]; dup {
			return nil, fmt.Errorf("%s: module %q is already enabled by %s", e.Field, e.Name, prev.Field)
		}
		byName[e.Name] = e
		facs = append(facs, f)
	}
	for _, f := range facs {
		e := byName[f.Name]
		for _, r := range f.Requires {
			if _, ok := byName[r]; !ok {
				return nil, fmt.Errorf("%s: module %q (%s) requires module %q, which %s does not enable", where, f.Name, e.Field, r, where)
			}
		}
		for _, x := range f.Excludes {
			if other, ok := byName[x]; ok {
				return nil, fmt.Errorf("%s: modules %q (%s) and %q (%s) exclude each other; enable only one", where, f.Name, e.Field, x, other.Field)
			}
		}
	}
	claimed := map[string]string{}
	for _, f := range sortedByName(facs) {
		for _, c := range f.Slots {
			if other, ok := claimed[c.Slot]; ok {
				return nil, fmt.Errorf("%s: modules %q (%s) and %q (%s) both claim slot %s; enable only one", where, other, byName[other].Field, f.Name, byName[f.Name].Field, c.Slot)
			}
			claimed[c.Slot] = f.Name
		}
	}
	return startOrder(facs), nil
}

func sortedByName(facs []Factory) []Factory {
	out := slices.Clone(facs)
	slices.SortFunc(out, func(a, b Factory) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// startOrder puts every module after the modules it requires, otherwise in
// name order. Modules that require each other in a cycle cannot be ordered;
// they keep name order.
func startOrder(facs []Factory) []Factory {
	pending := sortedByName(facs)
	done := map[string]bool{}
	var out []Factory
	for len(pending) > 0 {
		progressed := false
		for i := 0; i < len(pending); i++ {
			f := pending[i]
			ready := true
			for _, r := range f.Requires {
				if !done[r] {
					ready = false
					break
				}
			}
			if ready {
				out = append(out, f)
				done[f.Name] = true
				pending = slices.Delete(pending, i, i+1)
				progressed = true
				break
			}
		}
		if !progressed {
			out = append(out, pending...)
			break
		}
	}
	return out
}
