package datapath

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"

	"github.com/cilium/ebpf"
)

// LayoutVersion numbers the key and value layouts of the pinned maps
// (bpf/include/weir/maps.h). Bump it with every change to a layout and list
// the maps that changed, with how their entries carry over, in
// layoutChanges; TestLayoutVersionFollowsTheHeader fails until both are
// done.
const LayoutVersion = 2

// layoutPin holds the LayoutVersion of the maps pinned beside it. Pin
// directories of agents from before it existed hold version 1.
const layoutPin = "weir_layout"

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
	dir  string
	from uint32
	log  *slog.Logger
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
}

// pinnedVersion is the layout of the maps in dir: 0 when it holds none.
func pinnedVersion(dir string) (uint32, error) {
	if _, err := os.Stat(filepath.Join(dir, MapServices)); errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	mp, err := ebpf.LoadPinnedMap(filepath.Join(dir, layoutPin), nil)
	if errors.Is(err, os.ErrNotExist) {
		return 1, nil
	}
	if err != nil {
		return 0, fmt.Errorf("reading the layout version in %s: %w", dir, err)
	}
	defer mp.Close()
	var v uint32
	if err := mp.Lookup(uint32(0), &v); err != nil {
		return 0, fmt.Errorf("reading the layout version in %s: %w", dir, err)
	}
	return v, nil
}

// writeVersion records LayoutVersion in dir.
func writeVersion(dir string) error {
	path := filepath.Join(dir, layoutPin)
	mp, err := ebpf.LoadPinnedMap(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		mp, err = ebpf.NewMap(&ebpf.MapSpec{Name: layoutPin, Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
		if err == nil {
			if perr := mp.Pin(path); perr != nil {
				mp.Close()
				return fmt.Errorf("pinning the layout version: %w", perr)
			}
		}
	}
	if err != nil {
		return fmt.Errorf("recording the layout version: %w", err)
	}
	defer mp.Close()
	return mp.Put(uint32(0), uint32(LayoutVersion))
}

// planMigration compares the pinned maps of dir with the spec about to be
// loaded and prepares a replacement for every map that does not fit.
// It returns nil when everything fits (or nothing is pinned yet).
func planMigration(dir string, spec *ebpf.CollectionSpec, log *slog.Logger) (*migration, error) {
	from, err := pinnedVersion(dir)
	if err != nil || from == 0 {
		return nil, err
	}
	m := &migration{dir: dir, from: from, log: log, old: map[string]*ebpf.Map{}, replaced: map[string]*ebpf.Map{}, fill: map[string]converter{}}
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

// layoutChange says whether the map's layout changed since the pinned
// version, and how to carry its entries over.
func (m *migration) layoutChange(name string) (converter, bool) {
	if m.from == LayoutVersion {
		return nil, false
	}
	if m.from == LayoutVersion-1 {
		conv, ok := layoutChanges[LayoutVersion][name]
		return conv, ok
	}
	// A layout this agent does not know (a newer agent's, or an older
	// one's without a path here): nothing can be read safely.
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
			m.log.Warn("map recreated empty: its layout cannot be carried over", "map", name, "from_layout", m.from, "to_layout", LayoutVersion)
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
	case lost > 0:
		m.log.Warn("map carried over; some entries could not be", "map", name, "kept", kept, "lost", lost, "from_layout", m.from)
	default:
		m.log.Info("map carried over", "map", name, "kept", kept, "from_layout", m.from)
	}
}

// commit gives the pins to the replacements (the programs loaded with
// them already). The old maps stay open: old programs still use them,
// and a prog array whose last user reference goes is emptied.
func (m *migration) commit() error {
	for _, name := range sortedKeys(m.replaced) {
		path := filepath.Join(m.dir, name)
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("unpinning the old %s: %w", name, err)
		}
		if err := m.replaced[name].Pin(path); err != nil {
			return fmt.Errorf("pinning the new %s: %w", name, err)
		}
	}
	return nil
}

// finish carries over what old programs wrote since prefill and lets the
// old maps go.
func (m *migration) finish() {
	for _, name := range sortedKeys(m.fill) {
		if name == MapCT {
			m.carry(name, true)
		}
	}
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
