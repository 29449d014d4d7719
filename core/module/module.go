// Package module is the contract every Weir module satisfies, whether it is
// compiled in (modules/) or runs out of tree as a go-plugin binary: a name,
// the BPF object it owns, the tail-call slots it claims, the modules it
// requires or excludes, its settings section, and a lifecycle.
package module

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"go.uber.org/fx"
	"gopkg.in/yaml.v3"

	"github.com/weirnet/weir/core/slots"
)

// SlotClaim says that the module's program Program runs in slot Slot.
type SlotClaim struct {
	Slot    string
	Program string
}

// CgroupClaim says that the module's program Program is attached to the
// node's cgroup at the socket hook Hook ("cgroup/connect4", ...).
type CgroupClaim struct {
	Hook    string
	Program string
}

// RawSettings is implemented by settings that take their section as the
// YAML written (a plugin's, which the plugin validates itself) instead of
// being decoded field by field.
type RawSettings interface {
	Settings
	SetYAML(section *yaml.Node) error
}

// Settings is a module's typed configuration section. Implementations are
// pointers to structs with yaml tags; Validate reports the first invalid
// field by its yaml name (the caller prefixes the section path).
type Settings interface {
	Validate() error
}

// FieldError is a validation error about one field; config prefixes Path
// with the section's own path ("settings.lb.").
type FieldError struct {
	Path string
	Msg  string
}

func (e *FieldError) Error() string { return e.Path + ": " + e.Msg }

// MTUOverhead is the room a module's encapsulation takes from each packet;
// forwarding modules provide it into the "mtu-overhead" group and pod
// interfaces get the uplink's MTU minus the largest overhead.
type MTUOverhead int

// MTUOverheadTag is the fx value-group tag of MTUOverhead values.
const MTUOverheadTag = `group:"mtu-overhead"`

// Encapsulation is implemented by the settings of modules that tunnel
// traffic between nodes. Two nodes exchange encapsulated traffic only when
// both report the same key (protocol, port, VNI); nodes with different keys
// cannot decapsulate each other's packets.
type Encapsulation interface {
	EncapsulationKey() string
}

// EncapsulationKey returns the key of the first settings that tunnel, or
// "" when none does.
func EncapsulationKey(settings map[string]Settings) string {
	names := make([]string, 0, len(settings))
	for n := range settings {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		if e, ok := settings[n].(Encapsulation); ok {
			return e.EncapsulationKey()
		}
	}
	return ""
}

// Descriptor is what is known about a module before anything runs: enough
// to validate a configuration and to assign slots.
type Descriptor struct {
	Name string
	// Summary is one line for listings and errors.
	Summary  string
	Requires []string
	Excludes []string
	Slots    []SlotClaim
	// Cgroup are the socket hooks of the node's cgroup the module claims.
	Cgroup []CgroupClaim
	// NewSettings returns the module's settings with defaults filled in,
	// or is nil when the module has no settings section.
	NewSettings func() Settings
	// Plugin is set for out-of-tree modules: they claim only the slots
	// reserved for plugins (slots.GroupPlugin), in-tree modules none of
	// those.
	Plugin bool
}

// Validate checks a descriptor's own consistency (slots exist, no
// self-reference). Registries run it for every module they list.
func (d Descriptor) Validate() error {
	if d.Name == "" || strings.ContainsAny(d.Name, " \t/") {
		return fmt.Errorf("module name %q is not a plain word", d.Name)
	}
	seen := map[string]bool{}
	for _, c := range d.Slots {
		s, ok := slots.Lookup(c.Slot)
		if !ok {
			return fmt.Errorf("module %s claims unknown slot %q; slots: %s", d.Name, c.Slot, strings.Join(slots.Names(), ", "))
		}
		if forPlugins := s.Group == slots.GroupPlugin; forPlugins != d.Plugin {
			if d.Plugin {
				return fmt.Errorf("plugin %s claims slot %s, which belongs to in-tree modules; plugin slots: %s", d.Name, c.Slot, strings.Join(slots.PluginSlots(), ", "))
			}
			return fmt.Errorf("module %s claims slot %s, which is reserved for plugins", d.Name, c.Slot)
		}
		if seen[c.Slot] {
			return fmt.Errorf("module %s claims slot %s twice", d.Name, c.Slot)
		}
		seen[c.Slot] = true
		if c.Program == "" {
			return fmt.Errorf("module %s claims slot %s without naming a program", d.Name, c.Slot)
		}
	}
	hooks := map[string]bool{}
	for _, c := range d.Cgroup {
		if _, ok := slots.LookupCgroupHook(c.Hook); !ok {
			return fmt.Errorf("module %s claims unknown cgroup hook %q; cgroup hooks: %s", d.Name, c.Hook, strings.Join(slots.CgroupHookNames(), ", "))
		}
		if hooks[c.Hook] {
			return fmt.Errorf("module %s claims cgroup hook %s twice", d.Name, c.Hook)
		}
		hooks[c.Hook] = true
		if c.Program == "" {
			return fmt.Errorf("module %s claims cgroup hook %s without naming a program", d.Name, c.Hook)
		}
	}
	if slices.Contains(d.Requires, d.Name) || slices.Contains(d.Excludes, d.Name) {
		return fmt.Errorf("module %s requires or excludes itself", d.Name)
	}
	for _, r := range d.Requires {
		if slices.Contains(d.Excludes, r) {
			return fmt.Errorf("module %s both requires and excludes %s", d.Name, r)
		}
	}
	return nil
}

// Module is a composed module. What it does beyond owning BPF comes from
// the optional interfaces it implements (as Caddy's modules do): Loaded,
// Starter, Stopper. A module implements only those it has work for.
type Module interface {
	// Name is the Descriptor's name.
	Name() string
	// Object returns the module's BPF object with its load-time constants
	// set, or nil when the module owns no BPF. Programs named by the
	// descriptor's slot claims must be in it.
	Object() (*ebpf.CollectionSpec, error)
}

// Starter is implemented by modules with control-plane work: Start runs
// after the module's programs fill their slots (at agent start, and when
// a module set that includes it is applied live).
type Starter interface {
	Start(ctx context.Context) error
}

// Stopper is implemented by modules whose Start leaves something running:
// Stop runs in reverse start order when the agent stops or the module set
// changes. It may not remove pinned state: the datapath keeps forwarding
// with the module's programs until the next set replaces them.
//
// Settings changes need no Reconfigure: a module set with new settings is
// a new layer, built and verified beside the running one (see
// core/agent).
type Stopper interface {
	Stop(ctx context.Context) error
}

// Loaded is implemented by modules that use their loaded programs beyond
// the slots and hooks core fills (iterators a module runs itself). Core
// calls it once every object passed the verifier and before Start; the
// collection stays open until after Stop.
type Loaded interface {
	Loaded(coll *ebpf.Collection) error
}

// Factory is a registry entry: the descriptor and how to build the module.
type Factory struct {
	Descriptor
	// Provide returns fx options that provide the Module into the
	// "modules" value group, given the module's validated settings (nil
	// when the module has none).
	Provide func(settings Settings) fx.Option
}

// GroupTag is the fx value-group tag modules are provided under. The group
// only collects them: slot numbers and start order never depend on its
// (random) order.
const GroupTag = `group:"modules"`

// Provide is the usual Factory.Provide body: the constructor's Module result
// joins the modules group.
func Provide(constructor any) fx.Option {
	return fx.Provide(fx.Annotate(constructor, fx.As(new(Module)), fx.ResultTags(GroupTag)))
}

// Catalog looks modules up by name.
type Catalog interface {
	Lookup(name string) (Factory, bool)
	Names() []string
}

// Registry is a Catalog over a fixed list of factories.
type Registry struct {
	byName map[string]Factory
	names  []string
}

// NewRegistry checks every descriptor and indexes the factories.
func NewRegistry(factories ...Factory) (*Registry, error) {
	r := &Registry{byName: map[string]Factory{}}
	for _, f := range factories {
		if err := f.Validate(); err != nil {
			return nil, err
		}
		if _, dup := r.byName[f.Name]; dup {
			return nil, fmt.Errorf("module %s is registered twice", f.Name)
		}
		if f.Provide == nil {
			return nil, fmt.Errorf("module %s has no Provide", f.Name)
		}
		r.byName[f.Name] = f
		r.names = append(r.names, f.Name)
	}
	slices.Sort(r.names)
	// A typo in a requirement would make a module impossible to enable.
	for _, f := range factories {
		for _, dep := range slices.Concat(f.Requires, f.Excludes) {
			if _, ok := r.byName[dep]; !ok {
				return nil, fmt.Errorf("module %s names module %q in its requires or excludes, which is not registered; registered: %s", f.Name, dep, strings.Join(r.names, ", "))
			}
		}
	}
	return r, nil
}

// Lookup implements Catalog.
func (r *Registry) Lookup(name string) (Factory, bool) {
	f, ok := r.byName[name]
	return f, ok
}

// Names implements Catalog: every module name, sorted.
func (r *Registry) Names() []string { return slices.Clone(r.names) }

// Extend returns a catalog of cat's modules and extra ones (plugins): a
// name both have is an error, as is a requirement no module of the result
// has.
func Extend(cat Catalog, extra ...Factory) (Catalog, error) {
	var all []Factory
	for _, n := range cat.Names() {
		f, _ := cat.Lookup(n)
		all = append(all, f)
	}
	for _, f := range extra {
		if _, clash := cat.Lookup(f.Name); clash {
			return nil, fmt.Errorf("plugin %s has the name of an in-tree module; rename the plugin", f.Name)
		}
	}
	return NewRegistry(append(all, extra...)...)
}
