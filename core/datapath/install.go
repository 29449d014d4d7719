package datapath

import (
	"errors"
	"fmt"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/weirnet/weir/core/slots"
)

// Object is a module's BPF object and the slots its programs fill.
type Object struct {
	// Module names the owner, for errors.
	Module string
	Spec   *ebpf.CollectionSpec
	// Slots maps slot name to program name in Spec.
	Slots map[string]string
	// Cgroup maps socket hook name to program name in Spec.
	Cgroup map[string]string
	// Plugin objects come from out-of-tree plugins: their core maps are
	// the node's (replaced, never created), their own maps live under
	// the plugin's pin directory (PluginPinDir).
	Plugin bool
}

// Installation holds the loaded objects of one install; closing it releases
// the agent's descriptors while the slots keep the programs alive.
type Installation struct {
	Collections map[string]*ebpf.Collection
}

// Close releases the descriptors.
func (in *Installation) Close() {
	for _, c := range in.Collections {
		c.Close()
	}
}

// Prepared are objects loaded and verified, not yet in any slot or hook.
type Prepared struct {
	in       *Installation
	cgroupID uint64
	fills    []fill
	hooks    []hookFill
	claimed  map[string]string
}

type fill struct {
	slot string
	prog *ebpf.Program
}

type hookFill struct {
	hook slots.CgroupHook
	prog *ebpf.Program
}

// Close releases prepared objects that will not be installed.
func (p *Prepared) Close() { p.in.Close() }

// Install loads every object, and only when all of them passed the verifier
// fills their slots and socket hooks and then empties every slot and hook
// nobody claims. A failure while loading (or a cgroup that cannot take
// socket hooks) leaves the running datapath exactly as it was; slots and
// hooks are replaced one by one, each atomically, so packets and sockets
// always see either the old or the new program.
func (d *Datapath) Install(objs []Object) (*Installation, error) {
	p, err := d.Prepare(objs)
	if err != nil {
		return nil, err
	}
	return d.Fill(p)
}

// Prepare loads and verifies every object and checks their claims; the
// running datapath does not change.
func (d *Datapath) Prepare(objs []Object) (*Prepared, error) {
	in := &Installation{Collections: map[string]*ebpf.Collection{}}
	p := &Prepared{in: in, claimed: map[string]string{}}
	if slices.ContainsFunc(objs, func(o Object) bool { return len(o.Cgroup) > 0 }) {
		id, err := CheckCgroup(d.opts.Cgroup)
		if err != nil {
			return nil, err
		}
		p.cgroupID = id
	}
	claimed := p.claimed
	for _, o := range objs {
		load := d.LoadObject
		if o.Plugin {
			load = d.LoadPluginObject
		}
		coll, err := load(o.Module, o.Spec)
		if err != nil {
			in.Close()
			return nil, fmt.Errorf("module %s: %w", o.Module, err)
		}
		in.Collections[o.Module] = coll
		for slot, progName := range o.Slots {
			if owner, dup := claimed[slot]; dup {
				in.Close()
				return nil, fmt.Errorf("modules %s and %s both claim slot %s", owner, o.Module, slot)
			}
			claimed[slot] = o.Module
			prog := coll.Programs[progName]
			if prog == nil {
				in.Close()
				return nil, fmt.Errorf("module %s: slot %s names program %q, which its object does not have", o.Module, slot, progName)
			}
			if prog.Type() != ebpf.SchedCLS {
				in.Close()
				return nil, fmt.Errorf("module %s: program %s is %s; tc slots take %s programs", o.Module, progName, prog.Type(), ebpf.SchedCLS)
			}
			p.fills = append(p.fills, fill{slot, prog})
		}
		for name, progName := range o.Cgroup {
			h, ok := slots.LookupCgroupHook(name)
			if !ok {
				in.Close()
				return nil, fmt.Errorf("module %s claims unknown cgroup hook %q", o.Module, name)
			}
			if owner, dup := claimed[name]; dup {
				in.Close()
				return nil, fmt.Errorf("modules %s and %s both claim cgroup hook %s", owner, o.Module, name)
			}
			claimed[name] = o.Module
			prog := coll.Programs[progName]
			if prog == nil {
				in.Close()
				return nil, fmt.Errorf("module %s: cgroup hook %s names program %q, which its object does not have", o.Module, name, progName)
			}
			if prog.Type() != h.Program {
				in.Close()
				return nil, fmt.Errorf("module %s: program %s is %s; %s takes %s programs", o.Module, progName, prog.Type(), name, h.Program)
			}
			p.hooks = append(p.hooks, hookFill{h, prog})
		}
	}
	slices.SortFunc(p.fills, func(a, b fill) int {
		sa, _ := slots.Lookup(a.slot)
		sb, _ := slots.Lookup(b.slot)
		return int(sa.Index()) - int(sb.Index())
	})
	return p, nil
}

// Fill puts prepared objects into their slots and hooks, then empties
// every slot and hook they do not claim.
func (d *Datapath) Fill(p *Prepared) (*Installation, error) {
	in := p.in
	var errs []error
	for _, f := range p.fills {
		if err := d.SetSlot(f.slot, f.prog); err != nil {
			errs = append(errs, err)
		}
	}
	for _, s := range slots.All() {
		if _, ok := p.claimed[s.Name]; !ok {
			if err := d.ClearSlot(s.Name); err != nil {
				errs = append(errs, err)
			}
		}
	}
	d.mu.Lock()
	for _, f := range p.hooks {
		if err := d.attachCgroup(f.hook, f.prog, p.cgroupID); err != nil {
			errs = append(errs, err)
		}
	}
	for _, h := range slots.CgroupHooks() {
		if _, ok := p.claimed[h.Name]; !ok {
			if err := d.detachCgroup(h); err != nil {
				errs = append(errs, err)
			}
		}
	}
	d.mu.Unlock()
	if err := errors.Join(errs...); err != nil {
		in.Close()
		return nil, err
	}
	return in, nil
}
