package nodeport

import (
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/model"
)

// MaglevM is the size of a frontend's Maglev table (WEIR_MAGLEV_M, a
// prime well above any frontend's backend count).
const MaglevM = 16381

// maglevTable is Maglev's lookup table (Eisenbud et al., NSDI 2016) of size
// m over backends named by names: each entry an index into names. Every
// backend fills entries along its own permutation of the table, in turn,
// so each gets about m/len(names) entries and a backend that goes takes
// with it little more than its own share. The permutations depend only on
// the names: every node computes the same table.
func maglevTable(names []string, m int) []int {
	if len(names) == 0 || m < 2 {
		return nil
	}
	n := len(names)
	offset, skip, next := make([]uint64, n), make([]uint64, n), make([]uint64, n)
	for i, name := range names {
		h1, h2 := fnv.New64a(), fnv.New64()
		h1.Write([]byte(name))
		h2.Write([]byte(name))
		offset[i] = h1.Sum64() % uint64(m)
		skip[i] = h2.Sum64()%uint64(m-1) + 1
	}
	table := make([]int, m)
	for i := range table {
		table[i] = -1
	}
	for filled := 0; ; {
		for i := range n {
			c := (offset[i] + next[i]*skip[i]) % uint64(m)
			for table[c] >= 0 {
				next[i]++
				c = (offset[i] + next[i]*skip[i]) % uint64(m)
			}
			table[c] = i
			next[i]++
			if filled++; filled == m {
				return table
			}
		}
	}
}

// maglevFront is a frontend chosen by Maglev, with the backends its table
// spreads flows over.
type maglevFront struct {
	key      model.FrontendKey
	backends []netip.AddrPort // sorted
}

// maglevFronts are the frontends of svc served from outside, with the
// backends that take new flows on a node at t, as core's reconciler
// chooses them for the slots (topology hints included: the nodes of a
// zone agree on a zone's table). externalTrafficPolicy Local frontends
// keep their own node's backends and need no agreement between nodes.
func maglevFronts(svc *model.Service, t model.Topology) []maglevFront {
	var out []maglevFront
	for i := range svc.Frontends {
		f := &svc.Frontends[i]
		if f.Type == model.ClusterIP || f.ExternalLocal {
			continue
		}
		chosen, _ := f.ClusterBackends(t)
		bes := make([]netip.AddrPort, len(chosen))
		for i, b := range chosen {
			bes[i] = b.Addr
		}
		slices.SortFunc(bes, func(a, b netip.AddrPort) int { return a.Compare(b) })
		bes = slices.Compact(bes)
		out = append(out, maglevFront{key: f.Key(), backends: bes})
	}
	return out
}

// maglevWriter keeps weir_maglev as the services say: a table per
// frontend served from outside, built in a new inner map and swapped in
// whole, so a lookup sees the old table or the new one, never a mix.
type maglevWriter struct {
	outer    *ebpf.Map
	inner    *ebpf.MapSpec
	services func() (svcs, addrs *ebpf.Map, err error)

	// node and zone are where the tables serve: the zone from the last
	// full delta (a change of zone makes one).
	node, zone string
	byService  map[model.ServiceName][]maglevFront
	// applied is each table's input (backend ids, in order) by reverse
	// NAT id; nil until the map was read.
	applied map[uint32]string
}

// apply follows a change of services.
func (w *maglevWriter) apply(d model.Delta) error {
	if w.outer == nil {
		return errors.New("the Maglev map is not loaded")
	}
	svcs, addrs, err := w.services()
	if err != nil {
		return err
	}
	// What the map holds: tables written by this writer keep their
	// inputs across full passes (a retry is one), so only tables whose
	// input changed are built again; others (a restarted agent's) are
	// written again once.
	if w.applied == nil || d.Full {
		if w.applied == nil {
			w.applied = map[uint32]string{}
		}
		var k uint32
		var id uint32
		it := w.outer.Iterate()
		for it.Next(&k, &id) {
			if _, ok := w.applied[k]; !ok {
				w.applied[k] = ""
			}
		}
		if err := it.Err(); err != nil {
			return fmt.Errorf("reading weir_maglev: %w", err)
		}
	}
	if d.Full {
		clear(w.byService)
		w.zone = d.Zone
	}
	for name, svc := range d.Services {
		if svc == nil {
			delete(w.byService, name)
			continue
		}
		w.byService[name] = maglevFronts(svc, model.Topology{Node: w.node, Zone: w.zone})
	}
	var errs []error
	desired := map[uint32]bool{}
	for _, fronts := range w.byService {
		for _, f := range fronts {
			rev, ids, err := w.resolve(svcs, addrs, f)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			desired[rev] = true
			sig := fmt.Sprint(ids)
			if have, ok := w.applied[rev]; ok && have == sig {
				continue
			}
			if err := w.write(rev, f, ids); err != nil {
				errs = append(errs, fmt.Errorf("Maglev table of %s: %w", f.key, err))
				continue
			}
			w.applied[rev] = sig
		}
	}
	// Tables of frontends that went: their flows fall back to random
	// choice, as any frontend without a table. (A frontend not resolved
	// this pass keeps no table either: random choice until it is.)
	for rev := range w.applied {
		if desired[rev] {
			continue
		}
		if err := w.outer.Delete(rev); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("removing a Maglev table: %w", err))
			continue
		}
		delete(w.applied, rev)
	}
	return errors.Join(errs...)
}

// resolve finds the frontend's reverse NAT id and its backends' ids in the
// maps core's reconciler wrote (not yet written: an error, tried again).
func (w *maglevWriter) resolve(svcs, addrs *ebpf.Map, f maglevFront) (uint32, []uint32, error) {
	a := f.key.Addr
	var master datapath.ServiceValue
	key := datapath.ServiceKey{Addr: datapath.AddrToBE(a.Addr()), Port: datapath.PortToBE(a.Port()), Proto: uint8(f.key.Proto), Scope: datapath.ScopeExternal}
	if err := svcs.Lookup(key, &master); err != nil {
		return 0, nil, fmt.Errorf("frontend %s not in the service map yet: %w", f.key, err)
	}
	ids := make([]uint32, 0, len(f.backends))
	for _, b := range f.backends {
		var id uint32
		ak := datapath.BackendAddrKey{Addr: datapath.AddrToBE(b.Addr()), Port: datapath.PortToBE(b.Port()), Proto: uint8(f.key.Proto)}
		if err := addrs.Lookup(ak, &id); err != nil {
			return 0, nil, fmt.Errorf("backend %s of %s not in the backend map yet: %w", b, f.key, err)
		}
		ids = append(ids, id)
	}
	return master.RevNat, ids, nil
}

// write builds the table over the frontend's backends (named by address,
// as every node names them) in a new inner map of their ids here, and
// swaps it in.
func (w *maglevWriter) write(rev uint32, f maglevFront, ids []uint32) error {
	if len(ids) == 0 {
		err := w.outer.Delete(rev)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			err = nil
		}
		return err
	}
	names := make([]string, len(f.backends))
	for i, b := range f.backends {
		names[i] = b.String()
	}
	table := maglevTable(names, MaglevM)
	keys := make([]uint32, len(table))
	vals := make([]uint32, len(table))
	for i, b := range table {
		keys[i], vals[i] = uint32(i), ids[b]
	}
	inner, err := ebpf.NewMap(w.inner)
	if err != nil {
		return fmt.Errorf("creating a table: %w", err)
	}
	defer inner.Close()
	if _, err := inner.BatchUpdate(keys, vals, nil); err != nil {
		return fmt.Errorf("filling a table: %w", err)
	}
	if err := w.outer.Put(rev, inner); err != nil {
		return fmt.Errorf("swapping a table in: %w", err)
	}
	return nil
}
