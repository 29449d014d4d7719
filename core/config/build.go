package config

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/weirnet/weir/core/module"
	"github.com/weirnet/weir/core/portrange"
	"github.com/weirnet/weir/core/strictyaml"
)

// builder validates a decoded File and computes the Effective result of the
// top level and of every pool.
type builder struct {
	file string
	cat  module.Catalog
	root *yaml.Node // nil for an empty file
	f    *File
}

// entry is a module chosen by the file and the field that chose it.
type entry struct {
	name string
	at   fieldPath
}

// scope is the top level or one pool: where its set is written, how
// messages name it, and its settings sections after merging.
type scope struct {
	where    string
	set      fieldPath // where the module set is written, for Check's errors
	settings fieldPath
	keys     []string // settings sections written in this scope, in file order
	section  func(name string) *yaml.Node
}

func (b *builder) build() (*Effective, []*Effective, error) {
	dp := b.f.Datapath
	for _, sz := range dp.MapSizes() {
		if sz.Value < sz.Min || sz.Value > MaxMapEntries {
			return nil, nil, b.fail(fieldPath{"datapath", sz.Field}, "%d is out of range; allowed %d to %d (default %d)",
				sz.Value, sz.Min, MaxMapEntries, sz.Default)
		}
	}
	if _, _, _, field, err := dp.GCIntervals(); err != nil {
		return nil, nil, b.fail(fieldPath{"datapath", field}, "%v", err)
	}
	top, err := b.topLevel()
	if err != nil {
		return nil, nil, err
	}
	pools := make([]*Effective, len(b.f.NodePools))
	names := map[string]int{}
	catchAll := -1 // first pool with an empty selector
	for i, p := range b.f.NodePools {
		if pools[i], err = b.pool(i, names); err != nil {
			return nil, nil, err
		}
		if catchAll >= 0 {
			return nil, nil, b.fail(fieldPath{"nodePools", i}, "pool %q can never apply: nodePools[%d] (%q) has an empty nodeSelector, which matches every node first; move this pool before it",
				p.Name, catchAll, b.f.NodePools[catchAll].Name)
		}
		if p.NodeSelector.Empty() {
			catchAll = i
		}
	}
	if err := b.sameEncapsulation(top, pools); err != nil {
		return nil, nil, err
	}
	return top, pools, nil
}

// sameEncapsulation refuses pools that tunnel differently: their nodes
// could not decapsulate each other's packets. Pools that do not tunnel may
// mix with ones that do (peers are then reached natively).
func (b *builder) sameEncapsulation(top *Effective, pools []*Effective) error {
	first := module.EncapsulationKey(top.Settings)
	where := "the top-level modules"
	for i, p := range pools {
		k := module.EncapsulationKey(p.Settings)
		if k == "" {
			continue
		}
		if first == "" {
			first, where = k, fmt.Sprintf("nodePools[%d] (%q)", i, b.f.NodePools[i].Name)
			continue
		}
		if k != first {
			return b.fail(fieldPath{"nodePools", i}, "pool %q tunnels with %s but %s tunnel with %s: their nodes could not decapsulate each other's traffic; use the same tunnel settings everywhere",
				b.f.NodePools[i].Name, k, where, first)
		}
	}
	return nil
}

func (b *builder) topLevel() (*Effective, error) {
	var set []entry
	for i, name := range b.f.Modules {
		set = append(set, entry{name, fieldPath{"modules"}.idx(i)})
	}
	for _, name := range orderedKeys(b.f.Settings) {
		if _, err := b.settingsModule(fieldPath{"settings"}.key(name)); err != nil {
			return nil, err
		}
	}
	return b.effective(set, scope{
		where:    "modules",
		set:      fieldPath{"modules"},
		settings: fieldPath{"settings"},
		keys:     orderedKeys(b.f.Settings),
		section:  func(name string) *yaml.Node { return sectionOf(b.f.Settings, name) },
	})
}

func (b *builder) pool(i int, names map[string]int) (*Effective, error) {
	p := b.f.NodePools[i]
	at := fieldPath{"nodePools", i}
	if p.Name == "" {
		return nil, b.fail(at.key("name"), "missing; every pool needs a name, unique among nodePools")
	}
	if prev, dup := names[p.Name]; dup {
		return nil, b.fail(at.key("name"), "%q is already used by nodePools[%d]", p.Name, prev)
	}
	names[p.Name] = i
	if err := b.checkSelector(at.key("nodeSelector"), p.NodeSelector); err != nil {
		return nil, err
	}
	set, err := b.poolSet(at.key("modules"), p.Modules)
	if err != nil {
		return nil, err
	}
	// A pool section is only a fragment until merged, so it is checked
	// for shape on its own (to report its own lines and paths) but
	// validated only after merging.
	keys := orderedKeys(p.Settings)
	for _, name := range keys {
		sp := at.key("settings").key(name)
		f, err := b.settingsModule(sp)
		if err != nil {
			return nil, err
		}
		if err := strictyaml.DecodeNode(b.file, sectionOf(p.Settings, name), sp.String(), f.NewSettings()); err != nil {
			return nil, err
		}
	}
	eff, err := b.effective(set, scope{
		where:    fmt.Sprintf("%s (%q)", at, p.Name),
		set:      at.key("modules"),
		settings: at.key("settings"),
		keys:     keys,
		section: func(name string) *yaml.Node {
			return merge(sectionOf(b.f.Settings, name), sectionOf(p.Settings, name))
		},
	})
	if err != nil {
		return nil, err
	}
	eff.Pool = p.Name
	return eff, nil
}

// effective checks a scope's module set and settles the settings of every
// module it enables or writes a section for.
func (b *builder) effective(set []entry, sc scope) (*Effective, error) {
	if err := b.checkNames(set); err != nil {
		return nil, err
	}
	enabled := make([]module.Enabled, len(set))
	for i, e := range set {
		enabled[i] = module.Enabled{Name: e.name, Field: e.at.String()}
	}
	facs, err := module.Check(b.cat, sc.where, enabled)
	if err != nil {
		// Check's message already starts with the scope and names the
		// fields involved; the position is that of the set.
		_, n := locate(b.root, sc.set)
		return nil, strictyaml.At(b.file, n, "", err.Error())
	}
	eff := &Effective{Modules: facs, Settings: map[string]module.Settings{}, Datapath: b.f.Datapath}
	// Sections first, in file order, then defaults of enabled modules
	// without one: sections of modules this scope does not run are still
	// validated, since a typo there is still a typo.
	for _, name := range sc.keys {
		f, _ := b.cat.Lookup(name)
		s, err := b.settle(f, sc.section(name), sc.settings.key(name))
		if err != nil {
			return nil, err
		}
		if slices.ContainsFunc(facs, func(f module.Factory) bool { return f.Name == name }) {
			eff.Settings[name] = s
		}
	}
	for _, f := range facs {
		if _, done := eff.Settings[f.Name]; done || f.NewSettings == nil {
			continue
		}
		s, err := b.settle(f, sc.section(f.Name), sc.settings.key(f.Name))
		if err != nil {
			return nil, err
		}
		eff.Settings[f.Name] = s
	}
	if err := b.checkPortRanges(eff, sc); err != nil {
		return nil, err
	}
	return eff, nil
}

// checkPortRanges refuses a node whose modules serve ports (NodePorts)
// that another range hands to translated flows: a reply to such a flow
// would be taken for a request.
func (b *builder) checkPortRanges(eff *Effective, sc scope) error {
	var names []string
	ranges := map[string][]portrange.Named{}
	for _, f := range eff.Modules {
		if h, ok := eff.Settings[f.Name].(portrange.Holder); ok {
			names = append(names, f.Name)
			ranges[f.Name] = h.PortRanges()
		}
	}
	slices.Sort(names)
	for _, c := range portrange.Clashes(names, ranges) {
		return b.fail(sc.settings.key(c.ModB).key(c.B.Field), "%s overlaps %s.%s %s: ports that serve services cannot also be given to translated flows",
			c.B.Range, c.ModA, c.A.Field, c.A.Range)
	}
	return nil
}

// checkNames reports unknown and repeated modules with their own line,
// which module.Check could only name without one.
func (b *builder) checkNames(set []entry) error {
	seen := map[string]fieldPath{}
	for _, e := range set {
		if err := b.known(e); err != nil {
			return err
		}
		if prev, dup := seen[e.name]; dup {
			return b.fail(e.at, "module %q is already enabled by %s", e.name, prev)
		}
		seen[e.name] = e.at
	}
	return nil
}

func (b *builder) known(e entry) error {
	if _, ok := b.cat.Lookup(e.name); !ok {
		return b.fail(e.at, "unknown module %q; known modules: %s", e.name, strings.Join(b.cat.Names(), ", "))
	}
	return nil
}

// poolSet is the top-level set without the pool's disabled modules, then
// the pool's enabled ones.
func (b *builder) poolSet(at fieldPath, pm PoolModules) ([]entry, error) {
	enabledAt := map[string]fieldPath{}
	for j, name := range pm.Enable {
		if _, seen := enabledAt[name]; !seen {
			enabledAt[name] = at.key("enable").idx(j)
		}
	}
	disabled := map[string]fieldPath{}
	for j, name := range pm.Disable {
		e := entry{name, at.key("disable").idx(j)}
		if err := b.known(e); err != nil {
			return nil, err
		}
		if prev, dup := disabled[name]; dup {
			return nil, b.fail(e.at, "module %q is already disabled by %s", name, prev)
		}
		if en, both := enabledAt[name]; both {
			return nil, b.fail(e.at, "module %q is also enabled by %s; a pool may enable a module or disable it, not both", name, en)
		}
		if !slices.Contains(b.f.Modules, name) {
			return nil, b.fail(e.at, "module %q is not enabled by modules, so there is nothing to disable; modules enables: %s", name, listOrNone(b.f.Modules))
		}
		disabled[name] = e.at
	}
	var set []entry
	for i, name := range b.f.Modules {
		if _, off := disabled[name]; !off {
			set = append(set, entry{name, fieldPath{"modules"}.idx(i)})
		}
	}
	for j, name := range pm.Enable {
		set = append(set, entry{name, at.key("enable").idx(j)})
	}
	return set, nil
}

func (b *builder) checkSelector(at fieldPath, s Selector) error {
	if _, ok := s.MatchLabels[""]; ok {
		return b.failKey(at.key("matchLabels").key(""), "label key is empty; use a label name such as node.weir.dev/pool")
	}
	for j, r := range s.MatchExpressions {
		rp := at.key("matchExpressions").idx(j)
		if r.Key == "" {
			return b.fail(rp.key("key"), "missing; each requirement needs the label key it tests")
		}
		switch r.Operator {
		case OpIn, OpNotIn:
			if len(r.Values) == 0 {
				return b.fail(rp.key("values"), "operator %s needs at least one value", r.Operator)
			}
		case OpExists, OpDoesNotExist:
			if len(r.Values) > 0 {
				return b.fail(rp.key("values"), "operator %s takes no values; remove them", r.Operator)
			}
		case "":
			return b.fail(rp.key("operator"), "missing; use one of %s", strings.Join(operators, ", "))
		default:
			return b.fail(rp.key("operator"), "%q is not one of %s", r.Operator, strings.Join(operators, ", "))
		}
	}
	return nil
}

// settingsModule returns the module a settings section at p (whose last
// step is the module name) belongs to, which must exist and have settings.
func (b *builder) settingsModule(p fieldPath) (module.Factory, error) {
	name, _ := p[len(p)-1].(string)
	f, ok := b.cat.Lookup(name)
	if !ok {
		return f, b.failKey(p, "unknown module %q; known modules: %s", name, strings.Join(b.cat.Names(), ", "))
	}
	if f.NewSettings == nil {
		var with []string
		for _, n := range b.cat.Names() {
			if g, _ := b.cat.Lookup(n); g.NewSettings != nil {
				with = append(with, n)
			}
		}
		return f, b.failKey(p, "module %q has no settings; modules with settings: %s", name, listOrNone(with))
	}
	return f, nil
}

// settle decodes a module's section over its defaults and validates the
// result.
func (b *builder) settle(f module.Factory, section *yaml.Node, at fieldPath) (module.Settings, error) {
	s := f.NewSettings()
	if s == nil {
		return nil, b.fail(at, "module %q has no settings value to decode into (its NewSettings returned nil)", f.Name)
	}
	if rs, ok := s.(module.RawSettings); ok {
		if err := rs.SetYAML(section); err != nil {
			return nil, b.validationError(section, at, err)
		}
	} else if err := strictyaml.DecodeNode(b.file, section, at.String(), s); err != nil {
		return nil, err
	}
	if err := s.Validate(); err != nil {
		return nil, b.validationError(section, at, err)
	}
	return s, nil
}

// validationError places a Validate error: a *module.FieldError's path is
// relative to the section, and points at the field's line when the field
// is written (in a merged section, wherever it was written).
func (b *builder) validationError(section *yaml.Node, at fieldPath, err error) error {
	var n *yaml.Node
	if section != nil {
		n = section
	} else {
		_, n = locate(b.root, at)
	}
	var fe *module.FieldError
	if !errors.As(err, &fe) {
		return strictyaml.At(b.file, n, at.String(), err.Error())
	}
	if section != nil {
		_, n = locate(section, parseFieldPath(fe.Path))
	}
	path := at.String()
	switch {
	case fe.Path == "":
	case strings.HasPrefix(fe.Path, "["):
		path += fe.Path
	default:
		path += "." + fe.Path
	}
	return strictyaml.At(b.file, n, path, fe.Msg)
}

// fail reports an error about the value at p.
func (b *builder) fail(p fieldPath, format string, args ...any) error {
	_, n := locate(b.root, p)
	return strictyaml.At(b.file, n, p.String(), fmt.Sprintf(format, args...))
}

// failKey reports an error about the mapping key that ends p, so a block
// value below it does not move the position to the next line.
func (b *builder) failKey(p fieldPath, format string, args ...any) error {
	k, n := locate(b.root, p)
	if k != nil {
		n = k
	}
	return strictyaml.At(b.file, n, p.String(), fmt.Sprintf(format, args...))
}

func sectionOf(m map[string]yaml.Node, name string) *yaml.Node {
	n, ok := m[name]
	if !ok {
		return nil
	}
	return &n
}

func listOrNone(names []string) string {
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ", ")
}
