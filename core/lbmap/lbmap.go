// Package lbmap writes the desired services into the node's service,
// backend and reverse-NAT maps. Writes are make-before-break: backends,
// then backend slots, then reverse NAT, then the master entry, and leftovers
// last, so a packet never finds a slot count larger than the filled slots
// or a slot pointing at a missing backend. IDs are restored from the pinned
// maps at start, so a restarted agent keeps the IDs live connections use.
package lbmap

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"time"

	"github.com/cilium/ebpf"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/model"
)

type frontendKey struct {
	addr  netip.AddrPort
	proto model.Proto
	scope uint8
}

func (k frontendKey) svcKey(slot uint16) datapath.ServiceKey {
	return datapath.ServiceKey{
		Addr:  datapath.AddrToBE(k.addr.Addr()),
		Port:  datapath.PortToBE(k.addr.Port()),
		Slot:  slot,
		Proto: uint8(k.proto),
		Scope: k.scope,
	}
}

type backendKey struct {
	addr  netip.AddrPort
	proto model.Proto
}

func (k backendKey) addrKey() datapath.BackendAddrKey {
	return datapath.BackendAddrKey{Addr: datapath.AddrToBE(k.addr.Addr()), Port: datapath.PortToBE(k.addr.Port()), Proto: uint8(k.proto)}
}

// frontendState is what the maps hold for one frontend.
type frontendState struct {
	master datapath.ServiceValue
	// slots[i] is the backend id in slot i+1; it may be longer than
	// master.Count when leftovers of an interrupted write remain.
	slots []uint32
}

// Map is the part of *ebpf.Map the reconciler uses.
type Map interface {
	Put(key, value any) error
	Delete(key any) error
	Iterate() *ebpf.MapIterator
}

// Maps are the maps a reconciler writes. BackendAddrs indexes backends by
// address, so the datapath can tell a backend address from any other.
type Maps struct {
	Services, Backends, BackendAddrs, RevNAT, Affinity Map
}

// Reconciler owns the content of the service, backend and reverse-NAT maps,
// and keeps the affinity map free of choices that are no longer valid.
type Reconciler struct {
	maps                                               func() Maps
	services, backends, backendAddrs, revnat, affinity Map
	log                                                *slog.Logger

	frontends  map[frontendKey]*frontendState
	backendIDs map[backendKey]uint32
	backendsBy map[uint32]datapath.Backend
	// indexed are the backends in the BackendAddrs map, by the id there.
	indexed    map[backendKey]uint32
	revnatUsed map[uint32]netip.AddrPort
	nextBE     uint32
	nextRevNAT uint32
	node       string
	// dirty forces a read of the maps before the next apply: at first, to
	// restore what a previous agent wrote, and after a write failed
	// part-way.
	dirty bool
}

// New returns a reconciler over the maps. It reads them (restoring the IDs
// in use) on its first Apply.
func New(m Maps, log *slog.Logger) *Reconciler {
	return newReconciler(func() Maps { return m }, log)
}

// NewFromDatapath is New over a datapath's shared maps, which need not be
// loaded yet.
func NewFromDatapath(dp *datapath.Datapath, log *slog.Logger) *Reconciler {
	return newReconciler(func() Maps {
		return Maps{Services: dp.Services(), Backends: dp.Backends(), BackendAddrs: dp.BackendAddrs(), RevNAT: dp.RevNAT(), Affinity: dp.Affinity()}
	}, log)
}

// SetNode names the node the maps serve, which decides the backends of
// frontends with a Local traffic policy. Call it before the first Apply.
func (r *Reconciler) SetNode(name string) { r.node = name }

func newReconciler(maps func() Maps, log *slog.Logger) *Reconciler {
	if log == nil {
		log = slog.Default()
	}
	return &Reconciler{maps: maps, log: log, dirty: true}
}

func (r *Reconciler) restore() error {
	m := r.maps()
	r.services, r.backends, r.backendAddrs, r.revnat, r.affinity = m.Services, m.Backends, m.BackendAddrs, m.RevNAT, m.Affinity
	r.frontends = map[frontendKey]*frontendState{}
	r.backendIDs = map[backendKey]uint32{}
	r.backendsBy = map[uint32]datapath.Backend{}
	r.indexed = map[backendKey]uint32{}
	r.revnatUsed = map[uint32]netip.AddrPort{}
	r.nextBE, r.nextRevNAT = 1, 1

	var (
		k datapath.ServiceKey
		v datapath.ServiceValue
	)
	it := r.services.Iterate()
	for it.Next(&k, &v) {
		fk := frontendKey{
			addr:  netip.AddrPortFrom(datapath.AddrFromBE(k.Addr), datapath.PortFromBE(k.Port)),
			proto: model.Proto(k.Proto),
			scope: k.Scope,
		}
		st := r.frontends[fk]
		if st == nil {
			st = &frontendState{}
			r.frontends[fk] = st
		}
		if k.Slot == 0 {
			st.master = v
			continue
		}
		for len(st.slots) < int(k.Slot) {
			st.slots = append(st.slots, 0)
		}
		st.slots[k.Slot-1] = v.BackendId
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("reading services map: %w", err)
	}

	var (
		id uint32
		be datapath.Backend
	)
	bit := r.backends.Iterate()
	for bit.Next(&id, &be) {
		r.backendsBy[id] = be
		bk := backendKey{
			addr:  netip.AddrPortFrom(datapath.AddrFromBE(be.Addr), datapath.PortFromBE(be.Port)),
			proto: model.Proto(be.Proto),
		}
		if prev, ok := r.backendIDs[bk]; !ok || id < prev {
			r.backendIDs[bk] = id
		}
		if id >= r.nextBE {
			r.nextBE = id + 1
		}
	}
	if err := bit.Err(); err != nil {
		return fmt.Errorf("reading backends map: %w", err)
	}
	if r.backendAddrs != nil {
		var ak datapath.BackendAddrKey
		ait := r.backendAddrs.Iterate()
		for ait.Next(&ak, &id) {
			r.indexed[backendKey{addr: netip.AddrPortFrom(datapath.AddrFromBE(ak.Addr), datapath.PortFromBE(ak.Port)), proto: model.Proto(ak.Proto)}] = id
		}
		if err := ait.Err(); err != nil {
			return fmt.Errorf("reading backend address map: %w", err)
		}
	}

	var (
		rid uint32
		rn  datapath.RevNAT
	)
	rit := r.revnat.Iterate()
	for rit.Next(&rid, &rn) {
		r.revnatUsed[rid] = netip.AddrPortFrom(datapath.AddrFromBE(rn.Addr), datapath.PortFromBE(rn.Port))
		if rid >= r.nextRevNAT {
			r.nextRevNAT = rid + 1
		}
	}
	if err := rit.Err(); err != nil {
		return fmt.Errorf("reading reverse NAT map: %w", err)
	}
	if r.nextRevNAT == 0 {
		r.nextRevNAT = 1
	}
	r.dirty = false
	return nil
}

// allocBackend returns a fresh backend id. IDs increase monotonically and
// wrap, so an id is not reused while conntrack may still remember it.
func (r *Reconciler) allocBackend() (uint32, error) {
	for range 1 << 20 {
		id := r.nextBE
		r.nextBE++
		if r.nextBE == 0 {
			r.nextBE = 1
		}
		if _, used := r.backendsBy[id]; !used && id != 0 {
			return id, nil
		}
	}
	return 0, errors.New("no free backend id")
}

func (r *Reconciler) allocRevNAT() (uint32, error) {
	for range 1 << 20 {
		id := r.nextRevNAT
		r.nextRevNAT++
		if r.nextRevNAT == 0 {
			r.nextRevNAT = 1
		}
		if _, used := r.revnatUsed[id]; !used && id != 0 {
			return id, nil
		}
	}
	return 0, errors.New("no free reverse NAT id")
}

type desiredFrontend struct {
	typ      model.FrontendType
	affinity uint32
	flags2   uint8
	slots    []backendKey
}

// Apply makes the maps hold exactly the frontends of snap. On error the
// maps are still consistent for packets (within a frontend every step is
// make-before-break);
// the next Apply re-reads them and finishes the job.
func (r *Reconciler) Apply(snap *model.Snapshot) error {
	if r.dirty {
		if err := r.restore(); err != nil {
			return err
		}
	}
	err := r.apply(snap)
	if err != nil {
		r.dirty = true
	}
	return err
}

// affinityKey is a (reverse NAT id, backend id) pair whose affinity
// entries must go: the backend left the frontend.
type affinityKey struct {
	revNAT  uint32
	backend uint32
}

func (r *Reconciler) apply(snap *model.Snapshot) error {
	// Affinity entries pointing where a client may no longer go.
	lost := map[affinityKey]bool{}
	gone := map[uint32]bool{}
	defer func() { r.pruneAffinity(lost, gone) }()
	desired := map[frontendKey]*desiredFrontend{}
	// A backend address used by several frontends is one backend; it takes
	// new flows when any frontend lists it as active.
	wantBE := map[backendKey]model.BackendState{}
	var order []frontendKey
	for _, fo := range snap.Frontends() {
		for _, sf := range r.scoped(fo) {
			for _, bk := range sf.all {
				if st, ok := wantBE[bk.key]; !ok || st == model.Terminating {
					wantBE[bk.key] = bk.state
				}
			}
			desired[sf.key] = sf.df
			order = append(order, sf.key)
		}
	}

	// 1. Frontends nobody wants any more go first: they share nothing with
	// the others, and their room may be needed. Master first, so no new
	// flow picks a slot that is about to go. An internal scope whose
	// external entry stays waits until that entry no longer sends
	// in-cluster lookups to it (step 3b).
	var stale, staleScopes []frontendKey
	for fk := range r.frontends {
		if _, ok := desired[fk]; ok {
			continue
		}
		ext := fk
		ext.scope = datapath.ScopeExternal
		if _, stays := desired[ext]; fk.scope == datapath.ScopeInternal && stays {
			staleScopes = append(staleScopes, fk)
			continue
		}
		stale = append(stale, fk)
	}
	slices.SortFunc(stale, compareFrontendKeys)
	slices.SortFunc(staleScopes, compareFrontendKeys)
	for _, fk := range stale {
		if sib := r.sibling(fk); sib == nil || sib.master.RevNat != r.frontends[fk].master.RevNat {
			gone[r.frontends[fk].master.RevNat] = true
		}
		if err := r.deleteFrontend(fk); err != nil {
			return err
		}
	}

	// 2. Backends before the slots that point at them.
	beKeys := make([]backendKey, 0, len(wantBE))
	for bk := range wantBE {
		beKeys = append(beKeys, bk)
	}
	slices.SortFunc(beKeys, compareBackendKeys)
	for _, bk := range beKeys {
		val := datapath.Backend{
			Addr:  datapath.AddrToBE(bk.addr.Addr()),
			Port:  datapath.PortToBE(bk.addr.Port()),
			Proto: uint8(bk.proto),
			State: datapath.BackendActive,
		}
		if wantBE[bk] == model.Terminating {
			val.State = datapath.BackendTerminating
		}
		id, ok := r.backendIDs[bk]
		if !ok || r.backendsBy[id] != val {
			if !ok {
				var err error
				if id, err = r.allocBackend(); err != nil {
					return err
				}
			}
			if err := r.backends.Put(id, val); err != nil {
				return fmt.Errorf("writing backend %d (%s): %w", id, bk.addr, err)
			}
			r.backendIDs[bk] = id
			r.backendsBy[id] = val
		}
		if r.backendAddrs != nil {
			if cur, ok := r.indexed[bk]; !ok || cur != id {
				if err := r.backendAddrs.Put(bk.addrKey(), id); err != nil {
					return fmt.Errorf("indexing backend %d (%s): %w", id, bk.addr, err)
				}
				r.indexed[bk] = id
			}
		}
	}

	// 3. Frontends: reverse NAT, slots, master, then leftover slots.
	// Internal scopes before external ones: an external master flagged
	// with two scopes sends in-cluster lookups to its internal entry,
	// which must be there first.
	slices.SortStableFunc(order, func(a, b frontendKey) int { return int(b.scope) - int(a.scope) })
	for _, fk := range order {
		if st := r.frontends[fk]; st != nil {
			keep := map[uint32]bool{}
			for _, bk := range desired[fk].slots {
				keep[r.backendIDs[bk]] = true
			}
			for _, id := range st.slots {
				if !keep[id] {
					lost[affinityKey{st.master.RevNat, id}] = true
				}
			}
		}
		if err := r.writeFrontend(fk, desired[fk]); err != nil {
			return err
		}
	}
	// 3b. Internal scopes their external entry (now without the flag) no
	// longer points to.
	for _, fk := range staleScopes {
		if err := r.deleteFrontend(fk); err != nil {
			return err
		}
	}

	// 4. Backends nobody references.
	var unused []uint32
	for id, be := range r.backendsBy {
		bk := backendKey{addr: netip.AddrPortFrom(datapath.AddrFromBE(be.Addr), datapath.PortFromBE(be.Port)), proto: model.Proto(be.Proto)}
		if _, ok := wantBE[bk]; ok && r.backendIDs[bk] == id {
			continue
		}
		unused = append(unused, id)
	}
	slices.Sort(unused)
	for _, id := range unused {
		if err := r.backends.Delete(id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("deleting backend %d: %w", id, err)
		}
		be := r.backendsBy[id]
		bk := backendKey{addr: netip.AddrPortFrom(datapath.AddrFromBE(be.Addr), datapath.PortFromBE(be.Port)), proto: model.Proto(be.Proto)}
		if r.backendIDs[bk] == id {
			delete(r.backendIDs, bk)
		}
		delete(r.backendsBy, id)
	}
	// The index only says which addresses are backends: it follows them.
	var unindex []backendKey
	for bk := range r.indexed {
		if _, ok := wantBE[bk]; !ok {
			unindex = append(unindex, bk)
		}
	}
	slices.SortFunc(unindex, compareBackendKeys)
	for _, bk := range unindex {
		if err := r.backendAddrs.Delete(bk.addrKey()); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("unindexing backend %s: %w", bk.addr, err)
		}
		delete(r.indexed, bk)
	}
	return nil
}

// sibling is the frontend's entry in the other scope, if any.
func (r *Reconciler) sibling(fk frontendKey) *frontendState {
	other := fk
	other.scope = datapath.ScopeExternal
	if fk.scope == datapath.ScopeExternal {
		other.scope = datapath.ScopeInternal
	}
	return r.frontends[other]
}

func (r *Reconciler) writeFrontend(fk frontendKey, df *desiredFrontend) error {
	st := r.frontends[fk]
	if st == nil {
		// Both scopes of a frontend are one frontend to its flows: they
		// share its reverse NAT id, so a flow does not lose its backend
		// when a scope appears or goes (a backend starting on another
		// node under externalTrafficPolicy Local).
		var id uint32
		if sib := r.sibling(fk); sib != nil && sib.master.RevNat != 0 {
			id = sib.master.RevNat
		} else {
			var err error
			if id, err = r.allocRevNAT(); err != nil {
				return err
			}
		}
		st = &frontendState{master: datapath.ServiceValue{RevNat: id}}
	}
	if st.master.RevNat == 0 {
		id, err := r.allocRevNAT()
		if err != nil {
			return err
		}
		st.master.RevNat = id
	}
	r.frontends[fk] = st
	rid := st.master.RevNat
	if r.revnatUsed[rid] != fk.addr {
		val := datapath.RevNAT{Addr: datapath.AddrToBE(fk.addr.Addr()), Port: datapath.PortToBE(fk.addr.Port())}
		if err := r.revnat.Put(rid, val); err != nil {
			return fmt.Errorf("writing reverse NAT %d for %s: %w", rid, fk.addr, err)
		}
		r.revnatUsed[rid] = fk.addr
	}

	ids := make([]uint32, len(df.slots))
	for i, bk := range df.slots {
		ids[i] = r.backendIDs[bk]
	}
	for i, id := range ids {
		if i < len(st.slots) && st.slots[i] == id {
			continue
		}
		if err := r.services.Put(fk.svcKey(uint16(i+1)), datapath.ServiceValue{BackendId: id, RevNat: rid}); err != nil {
			return fmt.Errorf("writing slot %d of %s: %w", i+1, fk.addr, err)
		}
		if i < len(st.slots) {
			st.slots[i] = id
		} else {
			st.slots = append(st.slots, id)
		}
	}

	master := datapath.ServiceValue{Count: uint16(len(ids)), RevNat: rid, Type: uint8(df.typ), Flags2: df.flags2}
	if df.affinity > 0 {
		master.AffinityTimeout = df.affinity
	}
	if st.master != master {
		if err := r.services.Put(fk.svcKey(0), master); err != nil {
			return fmt.Errorf("writing service %s: %w", fk.addr, err)
		}
		st.master = master
	}

	for i := len(st.slots) - 1; i >= len(ids); i-- {
		if err := r.services.Delete(fk.svcKey(uint16(i + 1))); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("deleting slot %d of %s: %w", i+1, fk.addr, err)
		}
		st.slots = st.slots[:i]
	}
	return nil
}

func (r *Reconciler) deleteFrontend(fk frontendKey) error {
	st := r.frontends[fk]
	if err := r.services.Delete(fk.svcKey(0)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("deleting service %s: %w", fk.addr, err)
	}
	for i := len(st.slots); i >= 1; i-- {
		if err := r.services.Delete(fk.svcKey(uint16(i))); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("deleting slot %d of %s: %w", i, fk.addr, err)
		}
	}
	if sib := r.sibling(fk); sib != nil && sib.master.RevNat == st.master.RevNat {
		delete(r.frontends, fk) // the other scope keeps the id
		return nil
	}
	if rid := st.master.RevNat; rid != 0 {
		if err := r.revnat.Delete(rid); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("deleting reverse NAT %d: %w", rid, err)
		}
		delete(r.revnatUsed, rid)
	}
	delete(r.frontends, fk)
	return nil
}

type scopedBackend struct {
	key   backendKey
	state model.BackendState
}

// scopedFrontend is one map frontend (an address in one scope) derived
// from a model frontend.
type scopedFrontend struct {
	key frontendKey
	df  *desiredFrontend
	// all are the frontend's backends in this scope, terminating ones
	// included: they stay in the backend map for their flows.
	all []scopedBackend
}

// scoped turns a model frontend into the map frontends this node needs.
// A ClusterIP serves in-cluster traffic only: one entry, with the node's
// own backends under internalTrafficPolicy Local. An external-facing
// frontend with externalTrafficPolicy Local gets two: the external scope
// with the node's own backends (flagged, so in-cluster lookups move on)
// and the internal scope with every backend.
func (r *Reconciler) scoped(fo model.FrontendOf) []scopedFrontend {
	f := fo.Frontend
	all := f.Backends
	local := make([]model.Backend, 0, len(all))
	for _, b := range all {
		if b.NodeName == r.node {
			local = append(local, b)
		}
	}
	mk := func(scope uint8, bes []model.Backend, flags2 uint8) scopedFrontend {
		sf := scopedFrontend{
			key: frontendKey{addr: f.Addr, proto: f.Proto, scope: scope},
			df:  &desiredFrontend{typ: f.Type, affinity: fo.Service.AffinityTimeout, flags2: flags2},
		}
		if sf.df.affinity > 0 {
			sf.df.flags2 |= datapath.SvcFlagAffinity
		}
		var active, terminating []backendKey
		seen := map[backendKey]bool{}
		for _, b := range bes {
			bk := backendKey{addr: b.Addr, proto: f.Proto}
			if seen[bk] {
				continue
			}
			seen[bk] = true
			sf.all = append(sf.all, scopedBackend{bk, b.State})
			if b.State == model.Active {
				active = append(active, bk)
			} else {
				terminating = append(terminating, bk)
			}
		}
		// Serving-but-terminating backends take new flows only when
		// nothing else can.
		sf.df.slots = active
		if len(active) == 0 {
			sf.df.slots = terminating
		}
		slices.SortFunc(sf.df.slots, compareBackendKeys)
		return sf
	}
	if f.Type == model.ClusterIP {
		if f.InternalLocal {
			return []scopedFrontend{mk(datapath.ScopeExternal, local, 0)}
		}
		return []scopedFrontend{mk(datapath.ScopeExternal, all, 0)}
	}
	if f.ExternalLocal && len(local) != len(all) {
		return []scopedFrontend{
			mk(datapath.ScopeExternal, local, datapath.SvcFlagTwoScopes),
			mk(datapath.ScopeInternal, all, 0),
		}
	}
	if f.ExternalLocal {
		return []scopedFrontend{mk(datapath.ScopeExternal, local, 0)}
	}
	return []scopedFrontend{mk(datapath.ScopeExternal, all, 0)}
}

// pruneAffinity deletes the affinity entries of deleted frontends and of
// backends that left a frontend, so a returning client is not sent where
// the frontend no longer goes.
func (r *Reconciler) pruneAffinity(lost map[affinityKey]bool, gone map[uint32]bool) {
	if r.affinity == nil || len(lost) == 0 && len(gone) == 0 {
		return
	}
	var (
		k     datapath.AffinityKey
		v     datapath.Affinity
		stale []datapath.AffinityKey
	)
	it := r.affinity.Iterate()
	for it.Next(&k, &v) {
		if gone[k.RevNat] || lost[affinityKey{k.RevNat, v.BackendId}] {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		r.log.Warn("reading the affinity map", "err", err)
	}
	for _, k := range stale {
		if err := r.affinity.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			r.log.Warn("deleting an affinity entry", "err", err)
		}
	}
}

func compareBackendKeys(a, b backendKey) int {
	if c := a.addr.Addr().Compare(b.addr.Addr()); c != 0 {
		return c
	}
	if a.addr.Port() != b.addr.Port() {
		return int(a.addr.Port()) - int(b.addr.Port())
	}
	return int(a.proto) - int(b.proto)
}

func compareFrontendKeys(a, b frontendKey) int {
	if c := compareBackendKeys(backendKey{a.addr, a.proto}, backendKey{b.addr, b.proto}); c != 0 {
		return c
	}
	return int(a.scope) - int(b.scope)
}

// Run applies the store's snapshot whenever it changes, once every
// expected source has synced, retrying failures with backoff until ctx
// ends.
func (r *Reconciler) Run(ctx context.Context, store *model.Store) {
	model.Follow(ctx, store, r.log, "writing services to the datapath", func(snap *model.Snapshot) error {
		start := time.Now()
		if err := r.Apply(snap); err != nil {
			return err
		}
		r.log.Info("services written to the datapath", "services", len(snap.Services), "took", time.Since(start).Round(time.Microsecond))
		return nil
	})
}
