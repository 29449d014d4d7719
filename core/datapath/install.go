package datapath

import (
	"bytes"
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
	// Reuse, when set, is this object already loaded and verified (by the
	// running module set, from an identical spec): it is installed as it
	// is, and belongs to the new installation from then on.
	Reuse *ebpf.Collection
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
	// On failure, what this call loaded is released; reused collections
	// stay with the module set that runs them.
	reused := map[*ebpf.Collection]bool{}
	fail := func() {
		for _, c := range in.Collections {
			if !reused[c] {
				c.Close()
			}
		}
	}
	for _, o := range objs {
		load := d.LoadObject
		if o.Plugin {
			load = d.LoadPluginObject
		}
		coll := o.Reuse
		if coll != nil {
			reused[coll] = true
		} else {
			var err error
			if coll, err = load(o.Module, o.Spec); err != nil {
				fail()
				return nil, fmt.Errorf("module %s: %w", o.Module, err)
			}
		}
		in.Collections[o.Module] = coll
		for slot, progName := range o.Slots {
			if owner, dup := claimed[slot]; dup {
				fail()
				return nil, fmt.Errorf("modules %s and %s both claim slot %s", owner, o.Module, slot)
			}
			claimed[slot] = o.Module
			prog := coll.Programs[progName]
			if prog == nil {
				fail()
				return nil, fmt.Errorf("module %s: slot %s names program %q, which its object does not have", o.Module, slot, progName)
			}
			if prog.Type() != ebpf.SchedCLS {
				fail()
				return nil, fmt.Errorf("module %s: program %s is %s; tc slots take %s programs", o.Module, progName, prog.Type(), ebpf.SchedCLS)
			}
			p.fills = append(p.fills, fill{slot, prog})
		}
		for name, progName := range o.Cgroup {
			h, ok := slots.LookupCgroupHook(name)
			if !ok {
				fail()
				return nil, fmt.Errorf("module %s claims unknown cgroup hook %q", o.Module, name)
			}
			if owner, dup := claimed[name]; dup {
				fail()
				return nil, fmt.Errorf("modules %s and %s both claim cgroup hook %s", owner, o.Module, name)
			}
			claimed[name] = o.Module
			prog := coll.Programs[progName]
			if prog == nil {
				fail()
				return nil, fmt.Errorf("module %s: cgroup hook %s names program %q, which its object does not have", o.Module, name, progName)
			}
			if prog.Type() != h.Program {
				fail()
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

// SameSpec reports whether two specs would load the same object: the same
// programs (instructions, types), the same maps (layout, size, pinning,
// contents) and the same variables (the load-time constants). reflect.DeepEqual
// cannot tell: two loads of one ELF differ in their BTF's internals.
func SameSpec(a, b *ebpf.CollectionSpec) bool {
	if a == nil || b == nil || len(a.Programs) != len(b.Programs) || len(a.Maps) != len(b.Maps) || len(a.Variables) != len(b.Variables) {
		return false
	}
	for name, va := range a.Variables {
		vb, ok := b.Variables[name]
		if !ok || va.SectionName != vb.SectionName || va.Offset != vb.Offset || !bytes.Equal(va.Value, vb.Value) {
			return false
		}
	}
	for name, pa := range a.Programs {
		pb, ok := b.Programs[name]
		if !ok || pa.Type != pb.Type || pa.AttachType != pb.AttachType || pa.SectionName != pb.SectionName ||
			fmt.Sprint(pa.Instructions) != fmt.Sprint(pb.Instructions) {
			return false
		}
	}
	for name, ma := range a.Maps {
		mb, ok := b.Maps[name]
		if !ok || ma.Type != mb.Type || ma.KeySize != mb.KeySize || ma.ValueSize != mb.ValueSize || ma.MaxEntries != mb.MaxEntries ||
			ma.Flags != mb.Flags || ma.Pinning != mb.Pinning || fmt.Sprint(ma.Contents) != fmt.Sprint(mb.Contents) {
			return false
		}
	}
	return true
}
