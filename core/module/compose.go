package module

import (
	"fmt"
	"slices"
	"strings"

	"github.com/weirnet/weir/core/slots"
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
				return nil, fmt.Errorf("%s: module %q (%s) requires module %q, which is not enabled", where, f.Name, e.Field, r)
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
				what := "slot " + c.Slot
				if s, _ := slots.Lookup(c.Slot); s.Group != "" {
					what += " (" + s.Group + ")"
				}
				return nil, fmt.Errorf("%s: modules %q (%s) and %q (%s) both claim %s; enable only one", where, other, byName[other].Field, f.Name, byName[f.Name].Field, what)
			}
			claimed[c.Slot] = f.Name
		}
		for _, c := range f.Cgroup {
			if other, ok := claimed[c.Hook]; ok {
				return nil, fmt.Errorf("%s: modules %q (%s) and %q (%s) both claim cgroup hook %s; enable only one", where, other, byName[other].Field, f.Name, byName[f.Name].Field, c.Hook)
			}
			claimed[c.Hook] = f.Name
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
// name order. Modules that require each other in a cycle cannot all come
// after each other: when only such modules are left, the first by name
// among those on a cycle goes next, and the rest follow as usual.
func startOrder(facs []Factory) []Factory {
	pending := sortedByName(facs)
	byName := map[string]Factory{}
	for _, f := range facs {
		byName[f.Name] = f
	}
	done := map[string]bool{}
	var out []Factory
	take := func(i int) {
		out = append(out, pending[i])
		done[pending[i].Name] = true
		pending = slices.Delete(pending, i, i+1)
	}
	for len(pending) > 0 {
		next := slices.IndexFunc(pending, func(f Factory) bool {
			return !slices.ContainsFunc(f.Requires, func(r string) bool { return !done[r] })
		})
		if next < 0 {
			next = slices.IndexFunc(pending, func(f Factory) bool { return onCycle(f.Name, byName, done) })
		}
		if next < 0 {
			next = 0 // unreachable: a stall needs a cycle among the pending
		}
		take(next)
	}
	return out
}

// onCycle reports whether name can reach itself through requirements not
// yet started.
func onCycle(name string, byName map[string]Factory, done map[string]bool) bool {
	seen := map[string]bool{}
	var reach func(n string) bool
	reach = func(n string) bool {
		for _, r := range byName[n].Requires {
			if done[r] {
				continue
			}
			if r == name {
				return true
			}
			if !seen[r] {
				seen[r] = true
				if reach(r) {
					return true
				}
			}
		}
		return false
	}
	return reach(name)
}
