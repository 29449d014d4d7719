// Package datapath loads and wires a node's BPF: the core-owned hook entry
// programs and shared maps (generated from bpf/), the objects of modules,
// the tail-call slots, and the hook attachments. Everything is pinned under
// the node's bpffs directory, so the datapath keeps forwarding while the
// agent is down and a restarted agent picks up the same maps.
package datapath

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/weirnet/weir/core/mounts"
	"github.com/weirnet/weir/core/slots"
)

// Map names shared by every object (bpf/include/weir/maps.h).
const (
	MapCalls        = "weir_calls"
	MapScratch      = "weir_scratch"
	MapServices     = "weir_services"
	MapBackends     = "weir_backends"
	MapRevNAT       = "weir_revnat"
	MapCT           = "weir_ct"
	MapFrags        = "weir_frags"
	MapBackendAddrs = "weir_backend_addrs"
	MapSlotMask     = "weir_slot_mask"
	MapEndpoints    = "weir_endpoints"
	MapAffinity     = "weir_affinity"
	MapNAT          = "weir_nat"
	MapNATStats     = "weir_nat_stats"
	MapSrcRanges    = "weir_src_ranges"
	MapIPCache      = "weir_ipcache"
	MapMetrics      = "weir_metrics"
	MapEvents       = "weir_events"
	MapSockRev      = "weir_sock_rev"
	MapSockAffinity = "weir_sock_affinity"
	MapSockTerm     = "weir_sock_term"
)

// Options configure a node's datapath.
type Options struct {
	// PinDir is the node's directory on bpffs; maps and links are pinned
	// there. Required.
	PinDir string
	// Cgroup is the cgroup v2 directory whose sockets the socket hooks
	// see; needed only when a module claims one.
	Cgroup string
	// CTMaxEntries sizes the conntrack map; 0 keeps the object's default.
	CTMaxEntries uint32
	// MaxEntries sizes other shared maps by name; absent ones keep the
	// object's default.
	MaxEntries map[string]uint32
	// MapSpec, when set, may change the spec of every shared map before
	// any object is loaded: for tests that give the datapath maps that
	// fail (a full hash instead of an LRU, say). Never set in the agent.
	MapSpec func(name string, spec *ebpf.MapSpec)
	Logger  *slog.Logger
}

// Datapath is a node's loaded core datapath.
type Datapath struct {
	opts Options
	log  *slog.Logger
	core coreObjects

	mu     sync.Mutex
	maskMu sync.Mutex
	// migration is set between a Load that replaced pinned maps and
	// FinishMigration.
	migration *migration
	spec      *ebpf.CollectionSpec
}

// New checks the options and returns a datapath that is not loaded yet:
// nothing on the node changes until Load.
func New(opts Options) (*Datapath, error) {
	if opts.PinDir == "" {
		return nil, errors.New("datapath: a pin directory is required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	return &Datapath{opts: opts, log: opts.Logger}, nil
}

// Open is New followed by Load.
func Open(opts Options) (*Datapath, error) {
	d, err := New(opts)
	if err != nil {
		return nil, err
	}
	if err := d.Load(); err != nil {
		return nil, err
	}
	return d, nil
}

// Load loads the core object into the node's pin directory, reusing the
// maps a previous agent pinned there (so conntrack and services survive a
// restart), and mounting bpffs first when it is missing.
func (d *Datapath) Load() error {
	if err := mounts.EnsurePinDir(d.opts.PinDir); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(d.opts.PinDir, "links"), 0o700); err != nil {
		return fmt.Errorf("creating link pin directory: %w", err)
	}
	spec, err := loadCore()
	if err != nil {
		return fmt.Errorf("reading the core BPF object: %w", err)
	}
	if err := d.prepare(spec); err != nil {
		return err
	}
	mig, err := planMigration(d.opts.PinDir, spec, d.log)
	if err != nil {
		return err
	}
	opts := d.collectionOptions()
	if mig != nil {
		mig.prefill()
		opts.MapReplacements = mig.replaced
	}
	if err := spec.LoadAndAssign(&d.core, opts); err != nil {
		if mig != nil {
			mig.closeReplaced()
			mig.close()
		}
		return fmt.Errorf("loading the core BPF object into %s: %w", d.opts.PinDir, verifierDetail(err))
	}
	d.spec = spec
	if mig != nil {
		if err := mig.commit(); err != nil {
			mig.close()
			return err
		}
		d.migration = mig
	}
	return recordLayouts(d.opts.PinDir, spec, false)
}

// CatchUp carries over what the programs that ran before this load wrote
// to conntrack since it (when it replaced the conntrack map): call it once
// the new stages are in place, before hooks move to the new entry
// programs, to keep the window in which a flow is known to one side only
// short.
func (d *Datapath) CatchUp() {
	if d.migration != nil {
		d.migration.catchUp()
	}
}

// FinishMigration ends a load once every hook runs this datapath's entry
// programs. When the load replaced pinned maps (another ctMaxEntries, an
// earlier layout), what the old programs wrote to conntrack since is
// carried over and the old maps are let go; the prog arrays earlier
// programs ran on are released in any case.
func (d *Datapath) FinishMigration() error {
	if d.migration != nil {
		d.migration.finish()
		d.migration = nil
	}
	if d.spec == nil {
		return nil
	}
	return recordLayouts(d.opts.PinDir, d.spec, true)
}

// CoreSpec is the core object as the agent loads it (for tools and tests
// that need its map specs).
func CoreSpec() (*ebpf.CollectionSpec, error) { return loadCore() }

// PinDir is where this datapath pins its objects.
func (d *Datapath) PinDir() string { return d.opts.PinDir }

func (d *Datapath) collectionOptions() *ebpf.CollectionOptions {
	return &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: d.opts.PinDir}}
}

// prepare applies the node's load-time settings to a spec: the hook slot
// ranges every object's stage loop needs, and the map sizes that must match
// the pinned maps.
func (d *Datapath) prepare(spec *ebpf.CollectionSpec) error {
	first, last := slots.Ranges()
	fwd, _ := slots.Lookup("pod-egress/forward")
	for name, val := range map[string]any{"weir_hook_first": first, "weir_hook_last": last, "weir_slot_pod_forward": fwd.Index()} {
		v, ok := spec.Variables[name]
		if !ok {
			continue
		}
		if err := v.Set(val); err != nil {
			return fmt.Errorf("setting %s: %w", name, err)
		}
	}
	if m, ok := spec.Maps[MapCT]; ok && d.opts.CTMaxEntries != 0 {
		m.MaxEntries = d.opts.CTMaxEntries
	}
	for name, n := range d.opts.MaxEntries {
		if m, ok := spec.Maps[name]; ok && n != 0 {
			m.MaxEntries = n
		}
	}
	if d.opts.MapSpec != nil {
		for name, m := range spec.Maps {
			if strings.HasPrefix(name, "weir_") {
				d.opts.MapSpec(name, m)
			}
		}
	}
	return nil
}

// LoadObject loads a module's object into the node: its shared maps
// resolve to the node's pinned maps and its stage loops get the node's slot
// ranges. The caller owns the returned collection.
func (d *Datapath) LoadObject(name string, spec *ebpf.CollectionSpec) (*ebpf.Collection, error) {
	spec = spec.Copy()
	if err := d.prepare(spec); err != nil {
		return nil, fmt.Errorf("object %s: %w", name, err)
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, *d.collectionOptions())
	if err != nil {
		return nil, fmt.Errorf("loading BPF object %s: %w", name, verifierDetail(err))
	}
	return coll, nil
}

// PluginDownProgram is the stage that stands in for a plugin's programs
// while its process is down under failurePolicy closed: it drops.
func (d *Datapath) PluginDownProgram() *ebpf.Program { return d.core.WeirPluginDown }

// StageRuntimeMaps are the core maps every stage program uses to run
// (context, slots, drop accounting): plugins may use them undeclared.
var StageRuntimeMaps = []string{MapScratch, MapCalls, MapSlotMask, MapMetrics, MapEvents}

// PluginPinDir is where a plugin's own maps are pinned: they outlive the
// agent and the plugin's process, as core's maps do.
func (d *Datapath) PluginPinDir(name string) string {
	return filepath.Join(d.opts.PinDir, "plugins", name)
}

// LoadPluginObject loads a plugin's object: every core map (weir_*) it
// uses is the node's own map (the plugin cannot create or resize one),
// and its own maps are pinned in PluginPinDir. Maps its programs do not
// use are left out.
func (d *Datapath) LoadPluginObject(name string, spec *ebpf.CollectionSpec) (*ebpf.Collection, error) {
	spec = spec.Copy()
	if err := d.prepare(spec); err != nil {
		return nil, fmt.Errorf("plugin %s: %w", name, err)
	}
	used := map[string]bool{}
	for _, p := range spec.Programs {
		for _, ins := range p.Instructions {
			if ref := ins.Reference(); ref != "" && ins.IsLoadFromMap() {
				used[ref] = true
			}
		}
	}
	repl := map[string]*ebpf.Map{}
	for n, m := range spec.Maps {
		switch {
		case strings.HasPrefix(n, "."):
			// .rodata and friends: the object's constants and globals.
		case !used[n]:
			delete(spec.Maps, n)
		case strings.HasPrefix(n, "weir_"):
			core, err := d.Map(n)
			if err != nil {
				return nil, fmt.Errorf("plugin %s uses %s, which is not a shared map of the node", name, n)
			}
			repl[n] = core
		default:
			m.Pinning = ebpf.PinByName
		}
	}
	dir := d.PluginPinDir(name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("plugin %s: %w", name, err)
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: dir}, MapReplacements: repl})
	if err != nil {
		return nil, fmt.Errorf("loading the BPF object of plugin %s: %w", name, verifierDetail(err))
	}
	return coll, nil
}

// verifierDetail keeps the tail of a verifier log in the error, which is
// where the reason for a rejection is.
func verifierDetail(err error) error {
	var ve *ebpf.VerifierError
	if errors.As(err, &ve) {
		return fmt.Errorf("%w\n%-30v", err, ve)
	}
	return err
}

// SetSlot puts prog into the named slot; packets use it from the next one on.
func (d *Datapath) SetSlot(name string, prog *ebpf.Program) error {
	s, ok := slots.Lookup(name)
	if !ok {
		return fmt.Errorf("unknown slot %q; slots: %s", name, strings.Join(slots.Names(), ", "))
	}
	if err := d.core.WeirCalls.Put(s.Index(), prog); err != nil {
		return fmt.Errorf("filling slot %s (index %d): %w", name, s.Index(), err)
	}
	// Marked filled only once it is: the stage loop enters marked slots.
	if err := d.markSlot(s, true); err != nil {
		return fmt.Errorf("filling slot %s: %w", name, err)
	}
	return nil
}

// ClearSlot empties the named slot, so packets pass it by.
func (d *Datapath) ClearSlot(name string) error {
	s, ok := slots.Lookup(name)
	if !ok {
		return fmt.Errorf("unknown slot %q", name)
	}
	// Unmarked first: no packet enters a slot between its unmarking and
	// its emptying and counts a missed tail call.
	if err := d.markSlot(s, false); err != nil {
		return fmt.Errorf("clearing slot %s: %w", name, err)
	}
	err := d.core.WeirCalls.Delete(s.Index())
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("clearing slot %s: %w", name, err)
	}
	return nil
}

// markSlot sets or clears the slot's bit in weir_slot_mask.
func (d *Datapath) markSlot(s slots.Slot, filled bool) error {
	d.maskMu.Lock()
	defer d.maskMu.Unlock()
	var mask uint32
	if err := d.core.WeirSlotMask.Lookup(uint32(s.Hook), &mask); err != nil {
		return fmt.Errorf("reading the slot mask of %s: %w", s.Hook, err)
	}
	bit := uint32(1) << s.Order
	next := mask | bit
	if !filled {
		next = mask &^ bit
	}
	if next == mask {
		return nil
	}
	if err := d.core.WeirSlotMask.Put(uint32(s.Hook), next); err != nil {
		return fmt.Errorf("writing the slot mask of %s: %w", s.Hook, err)
	}
	return nil
}

// SlotFilled reports whether the named slot holds a program.
func (d *Datapath) SlotFilled(name string) (bool, error) {
	s, ok := slots.Lookup(name)
	if !ok {
		return false, fmt.Errorf("unknown slot %q", name)
	}
	var id uint32
	err := d.core.WeirCalls.Lookup(s.Index(), &id)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return false, nil
	}
	return err == nil, err
}

// Entry returns the entry program of a hook.
func (d *Datapath) Entry(h slots.Hook) (*ebpf.Program, error) {
	switch h {
	case slots.PodEgress:
		return d.core.WeirPodEgress, nil
	case slots.PodIngress:
		return d.core.WeirPodIngress, nil
	case slots.NetdevIngress:
		return d.core.WeirNetdevIngress, nil
	case slots.NetdevEgress:
		return d.core.WeirNetdevEgress, nil
	}
	return nil, fmt.Errorf("hook %s has no entry program yet", h)
}

// Map returns one of the node's shared maps by name (Map* constants).
func (d *Datapath) Map(name string) (*ebpf.Map, error) {
	m := map[string]*ebpf.Map{
		MapCalls:        d.core.WeirCalls,
		MapScratch:      d.core.WeirScratch,
		MapServices:     d.core.WeirServices,
		MapBackends:     d.core.WeirBackends,
		MapRevNAT:       d.core.WeirRevnat,
		MapCT:           d.core.WeirCt,
		MapFrags:        d.core.WeirFrags,
		MapBackendAddrs: d.core.WeirBackendAddrs,
		MapSlotMask:     d.core.WeirSlotMask,
		MapEndpoints:    d.core.WeirEndpoints,
		MapAffinity:     d.core.WeirAffinity,
		MapIPCache:      d.core.WeirIpcache,
		MapNAT:          d.core.WeirNat,
		MapNATStats:     d.core.WeirNatStats,
		MapSrcRanges:    d.core.WeirSrcRanges,
		MapMetrics:      d.core.WeirMetrics,
		MapEvents:       d.core.WeirEvents,
	}[name]
	if m == nil {
		return nil, fmt.Errorf("no shared map %q", name)
	}
	return m, nil
}

// Services is the weir_services map.
func (d *Datapath) Services() *ebpf.Map { return d.core.WeirServices }

// Backends is the weir_backends map.
func (d *Datapath) Backends() *ebpf.Map { return d.core.WeirBackends }

// BackendAddrs is the weir_backend_addrs map.
func (d *Datapath) BackendAddrs() *ebpf.Map { return d.core.WeirBackendAddrs }

// RevNAT is the weir_revnat map.
func (d *Datapath) RevNAT() *ebpf.Map { return d.core.WeirRevnat }

// CT is the weir_ct map.
func (d *Datapath) CT() *ebpf.Map { return d.core.WeirCt }

// NAT is the weir_nat map.
func (d *Datapath) NAT() *ebpf.Map { return d.core.WeirNat }

// NATStats is the weir_nat_stats map (per-CPU allocation counters).
func (d *Datapath) NATStats() *ebpf.Map { return d.core.WeirNatStats }

// IPCache is the weir_ipcache map.
func (d *Datapath) IPCache() *ebpf.Map { return d.core.WeirIpcache }

// Affinity is the weir_affinity map.
func (d *Datapath) Affinity() *ebpf.Map { return d.core.WeirAffinity }

// Endpoints is the weir_endpoints map.
func (d *Datapath) Endpoints() *ebpf.Map { return d.core.WeirEndpoints }

// Metrics is the weir_metrics map.
func (d *Datapath) Metrics() *ebpf.Map { return d.core.WeirMetrics }

// Events is the weir_events ring buffer.
func (d *Datapath) Events() *ebpf.Map { return d.core.WeirEvents }

// hookAttach says where a hook's entry program attaches on a device.
func hookAttach(h slots.Hook) (ebpf.AttachType, error) {
	switch h {
	case slots.PodEgress:
		return ebpf.AttachTCXIngress, nil
	case slots.PodIngress:
		return ebpf.AttachTCXEgress, nil
	case slots.NetdevIngress:
		return ebpf.AttachTCXIngress, nil
	case slots.NetdevEgress:
		return ebpf.AttachTCXEgress, nil
	}
	return 0, fmt.Errorf("hook %s cannot be attached to a device yet", h)
}

func (d *Datapath) linkPin(ifname string, h slots.Hook) string {
	// bpffs refuses dots in names: they are reserved for the kernel.
	return filepath.Join(d.opts.PinDir, "links", ifname+"_"+h.String())
}

// Attach runs the hook's entry program on the device (by index and name, in
// the caller's network namespace) through a TCX link pinned in the node's
// directory. A live pinned link is moved to the current entry program, which
// is how a restarted agent upgrades the datapath without a gap.
func (d *Datapath) Attach(ifindex int, ifname string, h slots.Hook) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	at, err := hookAttach(h)
	if err != nil {
		return err
	}
	prog, err := d.Entry(h)
	if err != nil {
		return err
	}
	alive := func(info *link.Info) bool {
		tcx := info.TCX()
		return tcx != nil && int(tcx.Ifindex) == ifindex && ebpf.AttachType(tcx.AttachType) == at
	}
	attach := func() (link.Link, error) {
		return link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: at})
	}
	if err := pinLink(d.linkPin(ifname, h), prog, alive, attach); err != nil {
		return fmt.Errorf("%s entry on %s (ifindex %d): %w", h, ifname, ifindex, err)
	}
	return nil
}

// pinLink makes the link pinned at pin run prog. A pinned link that alive
// recognises as attached where it should be is moved to prog in one step,
// so packets and sockets never meet a moment without the program;
// anything else pinned there (a link to a device that is gone, or to
// another cgroup) is let go, and attach's new link is pinned instead.
// Links no longer pinned nor held detach when their last descriptor
// closes.
func pinLink(pin string, prog *ebpf.Program, alive func(*link.Info) bool, attach func() (link.Link, error)) error {
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		info, ierr := l.Info()
		if ierr == nil && alive(info) {
			err := l.Update(prog)
			l.Close()
			if err != nil {
				return fmt.Errorf("updating the program: %w", err)
			}
			return nil
		}
		_ = l.Unpin()
		l.Close()
	} else if !errors.Is(err, os.ErrNotExist) {
		_ = os.Remove(pin)
	}
	l, err := attach()
	if err != nil {
		return fmt.Errorf("attaching: %w", err)
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		return fmt.Errorf("pinning the link: %w", err)
	}
	return nil
}

// Detach removes the hook's entry program from the device.
func (d *Datapath) Detach(ifname string, h slots.Hook) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := removeLink(d.linkPin(ifname, h)); err != nil {
		return fmt.Errorf("%s link of %s: %w", h, ifname, err)
	}
	return nil
}

// removeLink unpins and detaches the link pinned at pin, if any.
func removeLink(pin string) error {
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return os.Remove(pin)
	}
	defer l.Close()
	if err := l.Unpin(); err != nil {
		return fmt.Errorf("unpinning: %w", err)
	}
	// Detach now rather than when the last descriptor closes; a link whose
	// device is already gone has nothing to detach.
	_ = l.Detach()
	return nil
}

// Close releases the agent's descriptors. Pinned objects stay: the datapath
// keeps running.
// A load that replaced maps and did not finish leaves the old prog array
// pinned: the hooks still run the old programs on it.
func (d *Datapath) Close() error {
	if d.migration != nil {
		d.migration.close()
		d.migration.closeReplaced()
		d.migration = nil
	}
	return d.core.Close()
}

// Remove unpins every object of the node and closes the datapath: links are
// detached, and maps disappear once no program uses them. For tearing a node
// down, never for an agent restart.
func (d *Datapath) Remove() error {
	var errs []error
	errs = append(errs, d.FinishMigration())
	links, _ := filepath.Glob(filepath.Join(d.opts.PinDir, "links", "*"))
	for _, p := range links {
		if l, err := link.LoadPinnedLink(p, nil); err == nil {
			_ = l.Unpin()
			_ = l.Detach()
			l.Close()
		} else {
			_ = os.Remove(p)
		}
	}
	// Empty the prog array first: it holds the stage programs, which hold
	// the maps.
	for _, s := range slots.All() {
		_ = d.ClearSlot(s.Name)
	}
	errs = append(errs, d.core.Close())
	errs = append(errs, os.RemoveAll(d.opts.PinDir))
	return errors.Join(errs...)
}
