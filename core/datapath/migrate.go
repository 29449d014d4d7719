package datapath

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/cilium/ebpf"
)

// LayoutVersion numbers the key and value layouts of the pinned maps
// (bpf/include/weir/maps.h). Bump it with every change to a layout and list
// the maps that changed, with how their entries carry over, in
// layoutChanges; TestLayoutVersionFollowsTheHeader fails until both are
// done.
const LayoutVersion = 2

// layoutPin is a hash map beside the pinned maps: map name -> the
// LayoutVersion its entries have. Pin directories of agents from before it
// existed hold layout 1 throughout. A map whose version is missing or
// transitionVersion (a swap was under way when an agent stopped) has an
// unknown layout and is recreated.
const layoutPin = "weir_layout"

const transitionVersion = ^uint32(0)

// prevCallsPrefix names the pins that keep a replaced prog array alive
// until this agent's entry programs run on every hook: the kernel empties
// a prog array whose last user reference goes, and old entry programs
// still tail-call into it. A crash in between leaves the pin, so the
// datapath keeps forwarding on the old programs; the next start that
// completes removes it.
const prevCallsPrefix = MapCalls + "_prev_"

func layoutKey(name string) [16]byte {
	var k [16]byte
	copy(k[:], name)
	return k
}

// layouts reads and writes the per-map layout versions of a pin
// directory.
type layouts struct {
	m      *ebpf.Map
	legacy bool // no layout map: everything pinned is layout 1
}

func openLayouts(dir string, create bool) (*layouts, error) {
	path := filepath.Join(dir, layoutPin)
	m, err := ebpf.LoadPinnedMap(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		if !create {
			return &layouts{legacy: true}, nil
		}
		m, err = ebpf.NewMap(&ebpf.MapSpec{Name: layoutPin, Type: ebpf.Hash, KeySize: 16, ValueSize: 4, MaxEntries: 64})
		if err == nil {
			if perr := m.Pin(path); perr != nil {
				m.Close()
				return nil, fmt.Errorf("pinning the layout versions: %w", perr)
			}
		}
	}
	if err != nil {
		return nil, fmt.Errorf("opening the layout versions in %s: %w", dir, err)
	}
	return &layouts{m: m}, nil
}

func (l *layouts) close() {
	if l.m != nil {
		l.m.Close()
	}
}

// of is the layout of a pinned map: its version, or 0 when unknown.
func (l *layouts) of(name string) uint32 {
	if l.legacy {
		return 1
	}
	var v uint32
	if err := l.m.Lookup(layoutKey(name), &v); err != nil || v == transitionVersion {
		return 0
	}
	return v
}

func (l *layouts) set(name string, v uint32) error {
	if err := l.m.Put(layoutKey(name), v); err != nil {
		return fmt.Errorf("recording the layout of %s: %w", name, err)
	}
	return nil
}

// A converter moves the entries of a pinned map of the previous layout
// into a map of the current one, through put. It returns how many entries
// it could not carry over.
type converter func(m *migration, old *ebpf.Map, put func(k, v any) error) (lost int, err error)

// layoutChanges[v] are the maps whose layout changed from version v-1 to
// v. A map listed with a nil converter is recreated empty.
var layoutChanges = map[uint32]map[string]converter{
	2: {
		MapServices: convertServicesV1,
		MapRevNAT:   convertRevNATV1,
		MapAffinity: convertAffinityV1,
		MapCT:       convertCTV1,
	},
}

// migration is a load over pinned maps that do not all fit the current
// objects: maps of another size (datapath.ctMaxEntries changed) or of an
// earlier layout. Replacements are filled from the pinned maps before the
// new programs load, and take the pins once they did. The programs that
// run meanwhile keep theirs: every replaced map gets the node a new prog
// array too, so old entry programs go on with old stages and old maps
// until core moves each hook to the new entry programs, and then a last
// pass (Finish) carries over what the old programs wrote in between.
type migration struct {
	dir     string
	layouts *layouts
	log     *slog.Logger
	// old holds every pinned map, opened, for converters that read one
	// map to convert another.
	old map[string]*ebpf.Map
	// replaced are the new maps, by name, with how to fill them.
	replaced map[string]*ebpf.Map
	fill     map[string]converter
}

func (m *migration) close() {
	for _, mp := range m.old {
		mp.Close()
	}
	m.old = nil
	if m.layouts != nil {
		m.layouts.close()
		m.layouts = nil
	}
}

// recordLayouts marks every pinned map of spec as of LayoutVersion (the
// load created or carried over each of them in that layout) and removes
// the pins that kept earlier prog arrays alive.
func recordLayouts(dir string, spec *ebpf.CollectionSpec, finished bool) error {
	l, err := openLayouts(dir, true)
	if err != nil {
		return err
	}
	defer l.close()
	for name, ms := range spec.Maps {
		if ms.Pinning == ebpf.PinByName {
			if err := l.set(name, LayoutVersion); err != nil {
				return err
			}
		}
	}
	if finished {
		olds, _ := filepath.Glob(filepath.Join(dir, prevCallsPrefix+"*"))
		for _, p := range olds {
			if err := os.Remove(p); err != nil {
				return fmt.Errorf("releasing an earlier prog array: %w", err)
			}
		}
	}
	return nil
}

// planMigration compares the pinned maps of dir with the spec about to be
// loaded and prepares a replacement for every map that does not fit.
// It returns nil when everything fits (or nothing is pinned yet).
func planMigration(dir string, spec *ebpf.CollectionSpec, log *slog.Logger) (*migration, error) {
	if _, err := os.Stat(filepath.Join(dir, MapServices)); errors.Is(err, os.ErrNotExist) {
		return nil, nil // nothing pinned yet
	}
	l, err := openLayouts(dir, false)
	if err != nil {
		return nil, err
	}
	m := &migration{dir: dir, layouts: l, log: log, old: map[string]*ebpf.Map{}, replaced: map[string]*ebpf.Map{}, fill: map[string]converter{}}
	names := make([]string, 0, len(spec.Maps))
	for name, ms := range spec.Maps {
		if ms.Pinning == ebpf.PinByName {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	for _, name := range names {
		old, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue // new in this version: the load creates it
		}
		if err != nil {
			m.close()
			return nil, fmt.Errorf("opening pinned map %s: %w", name, err)
		}
		m.old[name] = old
	}
	for _, name := range names {
		old, ok := m.old[name]
		if !ok {
			continue
		}
		conv, changed := m.layoutChange(name)
		if !changed && spec.Maps[name].Compatible(old) == nil {
			continue
		}
		if !changed {
			conv = copyEntries
		}
		m.fill[name] = conv
	}
	if len(m.fill) == 0 {
		m.close()
		l.close()
		return nil, nil
	}
	// A new world of stages: the prog array and its mask start empty and
	// are filled by this agent's install.
	for _, name := range []string{MapCalls, MapSlotMask} {
		if _, ok := spec.Maps[name]; ok {
			if _, ok := m.fill[name]; !ok {
				m.fill[name] = nil
			}
		}
	}
	for name := range m.fill {
		ms := spec.Maps[name].Copy()
		ms.Pinning = ebpf.PinNone
		mp, err := ebpf.NewMap(ms)
		if err != nil {
			m.closeReplaced()
			m.close()
			return nil, fmt.Errorf("creating a new %s: %w", name, err)
		}
		m.replaced[name] = mp
	}
	return m, nil
}

// layoutChange says whether the map's layout changed since it was
// pinned, and how to carry its entries over.
func (m *migration) layoutChange(name string) (converter, bool) {
	switch m.layouts.of(name) {
	case LayoutVersion:
		return nil, false
	case LayoutVersion - 1:
		conv, ok := layoutChanges[LayoutVersion][name]
		return conv, ok
	}
	// A layout this agent does not know (a newer agent's, an older one's
	// without a path here, or a swap that did not finish): nothing can
	// be read safely.
	return nil, true
}

func (m *migration) closeReplaced() {
	for _, mp := range m.replaced {
		mp.Close()
	}
	m.replaced = nil
}

// prefill fills the replacements before the new programs load.
func (m *migration) prefill() {
	for _, name := range sortedKeys(m.fill) {
		m.carry(name, false)
	}
}

// carry moves one map's entries; in catch-up mode only entries the new map
// does not have yet.
func (m *migration) carry(name string, catchUp bool) {
	conv, old, nw := m.fill[name], m.old[name], m.replaced[name]
	if conv == nil || old == nil || nw == nil {
		if old != nil && !catchUp && name != MapCalls && name != MapSlotMask {
			m.log.Warn("map recreated empty: its layout cannot be carried over", "map", name, "to_layout", LayoutVersion)
		}
		return
	}
	flags := ebpf.UpdateAny
	if catchUp {
		flags = ebpf.UpdateNoExist
	}
	kept := 0
	lost, err := conv(m, old, func(k, v any) error {
		err := nw.Update(k, v, flags)
		if catchUp && errors.Is(err, ebpf.ErrKeyExist) {
			return nil
		}
		if err == nil {
			kept++
		}
		return err
	})
	switch {
	case err != nil:
		m.log.Warn("map carried over in part", "map", name, "kept", kept, "lost", lost, "err", err)
	case catchUp:
		if kept > 0 || lost > 0 {
			m.log.Info("entries written meanwhile carried over", "map", name, "kept", kept, "lost", lost)
		}
	default:
		// A smaller LRU map evicts while it is filled: count what stayed.
		if n, err := CountEntries(nw); err == nil && n < kept {
			lost += kept - n
			kept = n
		}
		if lost > 0 {
			m.log.Warn("map carried over; some entries could not be", "map", name, "kept", kept, "lost", lost)
		} else {
			m.log.Info("map carried over", "map", name, "kept", kept)
		}
	}
}

// commit gives the pins to the replacements (the programs loaded with
// them already). The old prog array gets a pin of its own first: old
// programs still run on it. Each swap is bracketed by layout records, so
// an agent stopped half-way leaves maps whose layout says unknown, never
// a wrong one.
func (m *migration) commit() error {
	if old := m.old[MapCalls]; old != nil && m.replaced[MapCalls] != nil {
		if err := old.Pin(filepath.Join(m.dir, fmt.Sprintf("%s%d", prevCallsPrefix, time.Now().UnixNano()))); err != nil {
			return fmt.Errorf("keeping the old prog array: %w", err)
		}
	}
	l, err := openLayouts(m.dir, true)
	if err != nil {
		return err
	}
	defer l.close()
	for _, name := range sortedKeys(m.replaced) {
		if err := l.set(name, transitionVersion); err != nil {
			return err
		}
		path := filepath.Join(m.dir, name)
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("unpinning the old %s: %w", name, err)
		}
		if err := m.replaced[name].Pin(path); err != nil {
			return fmt.Errorf("pinning the new %s: %w", name, err)
		}
		if err := l.set(name, LayoutVersion); err != nil {
			return err
		}
	}
	return nil
}

// catchUp carries over what old programs wrote to conntrack since the
// replacements were filled.
func (m *migration) catchUp() {
	if _, ok := m.fill[MapCT]; ok {
		m.carry(MapCT, true)
	}
}

// finish catches up a last time and lets the old maps go (the old prog
// array's pin goes with recordLayouts).
func (m *migration) finish() {
	m.catchUp()
	m.close()
	m.closeReplaced()
}

func sortedKeys[V any](mp map[string]V) []string {
	out := make([]string, 0, len(mp))
	for k := range mp {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// copyEntries carries entries of an unchanged layout over, as bytes; a
// map type that holds no entries to copy (arrays of programs, ring
// buffers) or of another key or value size starts empty.
func copyEntries(_ *migration, old *ebpf.Map, put func(k, v any) error) (int, error) {
	info, err := old.Info()
	if err != nil {
		return 0, err
	}
	switch info.Type {
	case ebpf.Hash, ebpf.LRUHash, ebpf.LPMTrie:
	default:
		return 0, nil
	}
	k := make([]byte, info.KeySize)
	v := make([]byte, info.ValueSize)
	lost := 0
	it := old.Iterate()
	for it.Next(&k, &v) {
		if err := put(k, v); err != nil {
			lost++
		}
	}
	return lost, it.Err()
}
