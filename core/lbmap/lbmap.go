// Package lbmap writes the desired services into the node's service,
// backend and reverse-NAT maps. Writes are make-before-break: backends,
// then backend slots, then reverse NAT, then the master entry, and leftovers
// last, so a packet never finds a slot count larger than the filled slots
// or a slot pointing at a missing backend. IDs are restored from the pinned
// maps at start, so a restarted agent keeps the IDs live connections use.
//
// Changes arrive as deltas (the services that changed): their cost follows
// the size of the change, not the number of services the node holds. A
// full pass, which compares everything, runs only at start and after a
// failed write.
package lbmap

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/cilium/ebpf"

	"github.com/weirnet/weir/core/cputime"
	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/model"
)

// frontendKey is a map frontend (address, port, protocol, scope) packed
// into an integer, ordered as its fields: the reconciler's maps are keyed
// by it, and integer keys keep them fast at a million entries.
type frontendKey uint64

func mkFrontendKey(a netip.AddrPort, proto model.Proto, scope uint8) frontendKey {
	b := a.Addr().As4()
	return frontendKey(uint64(binary.BigEndian.Uint32(b[:]))<<32 | uint64(a.Port())<<16 | uint64(proto)<<8 | uint64(scope))
}

func (k frontendKey) addr() netip.AddrPort {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], uint32(k>>32))
	return netip.AddrPortFrom(netip.AddrFrom4(b), uint16(k>>16))
}

func (k frontendKey) proto() model.Proto { return model.Proto(k >> 8) }
func (k frontendKey) scope() uint8       { return uint8(k) }

// withScope is the same frontend in another scope.
func (k frontendKey) withScope(scope uint8) frontendKey { return k&^0xff | frontendKey(scope) }

func (k frontendKey) svcKey(slot uint16) datapath.ServiceKey {
	a := k.addr()
	return datapath.ServiceKey{
		Addr:  datapath.AddrToBE(a.Addr()),
		Port:  datapath.PortToBE(a.Port()),
		Slot:  slot,
		Proto: uint8(k.proto()),
		Scope: k.scope(),
	}
}

// backendKey is a backend address, port and protocol packed into an
// integer, ordered as its fields.
type backendKey uint64

func mkBackendKey(a netip.AddrPort, proto model.Proto) backendKey {
	b := a.Addr().As4()
	return backendKey(uint64(binary.BigEndian.Uint32(b[:]))<<24 | uint64(a.Port())<<8 | uint64(proto))
}

func (k backendKey) addr() netip.AddrPort {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], uint32(k>>24))
	return netip.AddrPortFrom(netip.AddrFrom4(b), uint16(k>>8))
}

func (k backendKey) proto() model.Proto { return model.Proto(k) }

func (k backendKey) addrKey() datapath.BackendAddrKey {
	a := k.addr()
	return datapath.BackendAddrKey{Addr: datapath.AddrToBE(a.Addr()), Port: datapath.PortToBE(a.Port()), Proto: uint8(k.proto())}
}

func backendKeyOf(be datapath.Backend) backendKey {
	return mkBackendKey(netip.AddrPortFrom(datapath.AddrFromBE(be.Addr), datapath.PortFromBE(be.Port)), model.Proto(be.Proto))
}

// frontendState is what the maps hold for one frontend.
type frontendState struct {
	master    datapath.ServiceValue
	hasMaster bool
	// slots[i] is the backend id in slot i+1; it may be longer than
	// master.Count when leftovers of an interrupted write remain.
	slots []uint32
	// want are the backends the frontend was last written with,
	// terminating ones included (nil for entries restored from the maps
	// and not written since).
	want []scopedBackend
}

func (st *frontendState) entries() int {
	n := len(st.slots)
	if st.hasMaster {
		n++
	}
	return n
}

// refs counts the frontends that use a backend address, by the state they
// list it in: a backend takes new flows when any frontend lists it as
// active.
type refs struct{ active, terminating int32 }

func (r refs) zero() bool { return r.active == 0 && r.terminating == 0 }

// backendEntry is what the reconciler knows of one backend address: one
// map entry per address keeps a million backends within a few tens of
// megabytes.
type backendEntry struct {
	id      uint32 // its id in weir_backends, 0 when not written
	indexed uint32 // the id weir_backend_addrs says, 0 when not indexed
	state   uint8  // as written
	refs
}

// Map is the part of *ebpf.Map the reconciler uses.
type Map interface {
	BatchLookup(cursor *ebpf.MapBatchCursor, keysOut, valuesOut any, opts *ebpf.BatchOptions) (int, error)
	BatchUpdate(keys, values any, opts *ebpf.BatchOptions) (int, error)
	BatchDelete(keys any, opts *ebpf.BatchOptions) (int, error)
	Delete(key any) error
	Iterate() *ebpf.MapIterator
	MaxEntries() uint32
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

	frontends map[frontendKey]*frontendState
	// bes are the backend addresses known, ids every id weir_backends
	// holds (a restore may find two for one address); indexed counts
	// the addresses in weir_backend_addrs.
	bes        map[backendKey]backendEntry
	ids        map[uint32]backendKey
	indexed    int
	revnatUsed map[uint32]netip.AddrPort
	// byService are the map frontends each service was last written
	// with.
	byService map[model.ServiceName][]frontendKey
	// serviceEntries counts the services map's entries.
	serviceEntries int
	nextBE         uint32
	nextRevNAT     uint32
	node           string
	// zone is the node's zone, from the last full delta.
	zone string
	// dirty forces a read of the maps and a full pass before the next
	// apply: at first, to restore what a previous agent wrote, and after
	// a write failed part-way.
	dirty bool

	// departed hears of the backends that left a frontend.
	departed func([]Departure)
	// observe hears of every finished pass.
	observe func(took time.Duration, full bool)

	mu     sync.Mutex // guards status
	status Status
	// written is closed after the first pass that succeeded.
	written     chan struct{}
	writtenOnce sync.Once
}

// Written is closed once the maps hold a full state for the first time.
func (r *Reconciler) Written() <-chan struct{} { return r.written }

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
	return &Reconciler{maps: maps, log: log, dirty: true, written: make(chan struct{})}
}

func (r *Reconciler) restore() error {
	m := r.maps()
	r.services, r.backends, r.backendAddrs, r.revnat, r.affinity = m.Services, m.Backends, m.BackendAddrs, m.RevNAT, m.Affinity
	r.frontends = map[frontendKey]*frontendState{}
	r.bes = map[backendKey]backendEntry{}
	r.ids = map[uint32]backendKey{}
	r.indexed = 0
	r.revnatUsed = map[uint32]netip.AddrPort{}
	r.byService = map[model.ServiceName][]frontendKey{}
	r.serviceEntries = 0
	r.nextBE, r.nextRevNAT = 1, 1

	err := datapath.ReadAll(r.services, func(k *datapath.ServiceKey, v *datapath.ServiceValue) {
		fk := mkFrontendKey(netip.AddrPortFrom(datapath.AddrFromBE(k.Addr), datapath.PortFromBE(k.Port)), model.Proto(k.Proto), k.Scope)
		st := r.frontends[fk]
		if st == nil {
			st = &frontendState{}
			r.frontends[fk] = st
		}
		if k.Slot == 0 {
			st.master, st.hasMaster = *v, true
			return
		}
		for len(st.slots) < int(k.Slot) {
			st.slots = append(st.slots, 0)
		}
		st.slots[k.Slot-1] = v.BackendId
	})
	if err != nil {
		return fmt.Errorf("reading services map: %w", err)
	}
	// A hole below a leftover slot (a write interrupted) counts as an
	// entry until it is deleted with its frontend's other slots.
	r.serviceEntries = 0
	for _, st := range r.frontends {
		r.serviceEntries += st.entries()
	}

	err = datapath.ReadAll(r.backends, func(id *uint32, be *datapath.Backend) {
		bk := backendKeyOf(*be)
		r.ids[*id] = bk
		if e := r.bes[bk]; e.id == 0 || *id < e.id {
			e.id, e.state = *id, be.State
			r.bes[bk] = e
		}
		if *id >= r.nextBE {
			r.nextBE = *id + 1
		}
	})
	if err != nil {
		return fmt.Errorf("reading backends map: %w", err)
	}
	if r.backendAddrs != nil {
		err := datapath.ReadAll(r.backendAddrs, func(ak *datapath.BackendAddrKey, id *uint32) {
			bk := mkBackendKey(netip.AddrPortFrom(datapath.AddrFromBE(ak.Addr), datapath.PortFromBE(ak.Port)), model.Proto(ak.Proto))
			e := r.bes[bk]
			if e.indexed == 0 {
				r.indexed++
			}
			e.indexed = *id
			r.bes[bk] = e
		})
		if err != nil {
			return fmt.Errorf("reading backend address map: %w", err)
		}
	}
	err = datapath.ReadAll(r.revnat, func(rid *uint32, rn *datapath.RevNAT) {
		r.revnatUsed[*rid] = netip.AddrPortFrom(datapath.AddrFromBE(rn.Addr), datapath.PortFromBE(rn.Port))
		if *rid >= r.nextRevNAT {
			r.nextRevNAT = *rid + 1
		}
	})
	if err != nil {
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
		if _, used := r.ids[id]; !used && id != 0 {
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
	typ       model.FrontendType
	affinity  uint32
	flags2    uint8
	selection model.Selection
	slots     []backendKey
}

// errNeedFull asks for a full pass: the maps must be read again, and only
// a full state says what they must hold.
var errNeedFull = errors.New("the service maps must be read again: a full state is needed")

// Apply makes the maps hold what the delta says: in a full delta exactly
// its services, otherwise its services changed and every other as it was.
// On error the maps are still consistent for packets (within a frontend
// every step is make-before-break), and the next Apply must be full: it
// reads the maps again and finishes the job.
func (r *Reconciler) Apply(d model.Delta) error {
	// The store sends a full delta whenever the zone changes: every
	// service is served in one zone at any time.
	if d.Full {
		r.zone = d.Zone
	}
	if r.dirty {
		if !d.Full {
			return errNeedFull
		}
		if err := r.restore(); err != nil {
			return err
		}
	}
	err := r.apply(d)
	if err != nil && !errors.As(err, new(*CapacityError)) {
		r.dirty = true
	}
	return err
}

// ApplySnapshot makes the maps hold exactly the services of snap (a full
// pass).
func (r *Reconciler) ApplySnapshot(snap *model.Snapshot) error {
	d := model.Delta{Full: true, Services: make(map[model.ServiceName]*model.Service, len(snap.Services))}
	for _, svc := range snap.Services {
		d.Services[svc.Name] = svc
	}
	return r.Apply(d)
}

// affinityKey is a (reverse NAT id, backend id) pair whose affinity
// entries must go: the backend left the frontend.
type affinityKey struct {
	revNAT  uint32
	backend uint32
}

// plan is one pass: the frontends to write and to delete, and the
// backends whose use changed.
type plan struct {
	full    bool
	changed []model.ServiceName
	// desired are the map frontends of the changed services, written in
	// order (internal scopes before external ones).
	desired map[frontendKey]*scopedFrontend
	order   []frontendKey
	// owner says which service each desired frontend belongs to.
	owner map[frontendKey]model.ServiceName
	// stale frontends go first; staleScopes (internal scopes whose
	// external entry stays) after the external entry stopped pointing
	// to them.
	stale, staleScopes []frontendKey
}

func (r *Reconciler) plan(d model.Delta) *plan {
	p := &plan{full: d.Full, desired: make(map[frontendKey]*scopedFrontend, len(d.Services)), owner: make(map[frontendKey]model.ServiceName, len(d.Services))}
	for name := range d.Services {
		p.changed = append(p.changed, name)
	}
	slices.SortFunc(p.changed, func(a, b model.ServiceName) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	for _, name := range p.changed {
		svc := d.Services[name]
		if svc == nil {
			continue
		}
		for i := range svc.Frontends {
			for _, sf := range r.scoped(svc, &svc.Frontends[i]) {
				p.desired[sf.key] = &sf
				p.owner[sf.key] = name
				p.order = append(p.order, sf.key)
			}
		}
	}
	// Internal scopes before external ones: an external master flagged
	// with two scopes sends in-cluster lookups to its internal entry,
	// which must be there first.
	slices.SortStableFunc(p.order, func(a, b frontendKey) int { return int(b.scope()) - int(a.scope()) })

	// Frontends nobody wants any more: in a full pass every one not
	// desired, otherwise those the changed services had and lost.
	var candidates []frontendKey
	if d.Full {
		for fk := range r.frontends {
			candidates = append(candidates, fk)
		}
	} else {
		for _, name := range p.changed {
			candidates = append(candidates, r.byService[name]...)
		}
	}
	for _, fk := range candidates {
		if _, ok := p.desired[fk]; ok {
			continue
		}
		if _, ok := r.frontends[fk]; !ok {
			continue
		}
		ext := fk.withScope(datapath.ScopeExternal)
		if _, stays := p.desired[ext]; fk.scope() == datapath.ScopeInternal && stays {
			p.staleScopes = append(p.staleScopes, fk)
			continue
		}
		p.stale = append(p.stale, fk)
	}
	slices.SortFunc(p.stale, compareFrontendKeys)
	slices.SortFunc(p.staleScopes, compareFrontendKeys)
	return p
}

func (r *Reconciler) apply(d model.Delta) error {
	// On one thread throughout, so its CPU time is this work's (locked
	// only while working: a goroutine locked while it waits wakes later).
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	start, cpu := time.Now(), cputime.Thread()
	p := r.plan(d)
	if err := r.checkRoom(p); err != nil {
		if d.Full || len(p.changed) < 2 {
			return err
		}
		// Too big at once, though its final state fits (the store's
		// admission saw to that): one service at a time, those that
		// free room first, so no point of the way needs more.
		return r.applyInSteps(d)
	}
	if err := r.writeAndTell(p); err != nil {
		return err
	}
	r.record(p, time.Since(start), cputime.Thread()-cpu)
	return nil
}

// writeAndTell is write, then the departures it made are told.
func (r *Reconciler) writeAndTell(p *plan) error {
	if r.departed == nil {
		return r.write(p)
	}
	keys := p.keys()
	before := r.backendsByRevNAT(keys)
	if err := r.write(p); err != nil {
		return err
	}
	if d := r.departures(before, keys); len(d) > 0 {
		r.departed(d)
	}
	return nil
}

// applyInSteps applies a delta one service at a time, the services that
// shrink first.
func (r *Reconciler) applyInSteps(d model.Delta) error {
	type step struct {
		name   model.ServiceName
		growth int
	}
	var steps []step
	for name, svc := range d.Services {
		have := 0
		for _, fk := range r.byService[name] {
			if st := r.frontends[fk]; st != nil {
				have += st.entries()
			}
		}
		want := 0
		if svc != nil {
			want = serviceEntries(r.scopedAll(svc))
		}
		steps = append(steps, step{name, want - have})
	}
	slices.SortFunc(steps, func(a, b step) int {
		return cmp.Or(cmp.Compare(a.growth, b.growth), cmp.Compare(a.name.String(), b.name.String()))
	})
	for _, s := range steps {
		one := model.Delta{Version: d.Version, Services: map[model.ServiceName]*model.Service{s.name: d.Services[s.name]}}
		start, cpu := time.Now(), cputime.Thread()
		p := r.plan(one)
		if err := r.checkRoom(p); err != nil {
			return fmt.Errorf("service %s: %w", s.name, err)
		}
		if err := r.writeAndTell(p); err != nil {
			return err
		}
		r.record(p, time.Since(start), cputime.Thread()-cpu)
	}
	return nil
}

// write carries out a plan, make-before-break. Writes are queued by
// phase and each phase goes to the kernel in batches, in the order a
// reader needs: stale frontends (master before slots, reverse NAT last),
// backends and their index, reverse NAT, slots, masters (internal scopes
// first), leftover slots, internal scopes no longer pointed to, unused
// backends. Within a batch the kernel writes in order, so every point of
// the way is what one write at a time would give.
func (r *Reconciler) write(p *plan) error {
	// Affinity entries pointing where a client may no longer go.
	lost := map[affinityKey]bool{}
	gone := map[uint32]bool{}
	defer func() { r.pruneAffinity(lost, gone) }()
	q := &queue{}

	// Who uses which backend once the plan is done. Backends whose use
	// changes are the only ones to write or delete (every one in a full
	// pass).
	touched := make(map[backendKey]bool, 4*len(p.order))
	if p.full {
		for bk, e := range r.bes {
			touched[bk] = true
			e.refs = refs{}
			r.bes[bk] = e
		}
	} else {
		drop := func(fk frontendKey) {
			st := r.frontends[fk]
			if st == nil {
				return
			}
			for _, b := range st.want {
				touched[b.key] = true
				e := r.bes[b.key]
				if b.state == model.Active {
					e.active--
				} else {
					e.terminating--
				}
				r.bes[b.key] = e
			}
		}
		for _, fk := range p.stale {
			drop(fk)
		}
		for _, fk := range p.staleScopes {
			drop(fk)
		}
		for _, fk := range p.order {
			drop(fk)
		}
	}
	for _, fk := range p.order {
		for _, b := range p.desired[fk].all {
			touched[b.key] = true
			e := r.bes[b.key]
			if b.state == model.Active {
				e.active++
			} else {
				e.terminating++
			}
			r.bes[b.key] = e
		}
	}

	// 1. Frontends nobody wants any more go first: they share nothing with
	// the others, and their room may be needed. Master first, so no new
	// flow picks a slot that is about to go.
	for _, fk := range p.stale {
		st := r.frontends[fk]
		if sib := r.sibling(fk); (sib == nil || sib.master.RevNat != st.master.RevNat) && st.master.Flags2&datapath.SvcFlagAffinity != 0 {
			gone[st.master.RevNat] = true
		}
		r.deleteFrontend(fk, &q.stale)
	}
	if err := q.stale.flush(r); err != nil {
		return err
	}

	// 2. Backends before the slots that point at them.
	beKeys := make([]backendKey, 0, len(touched))
	for bk := range touched {
		if !r.bes[bk].zero() {
			beKeys = append(beKeys, bk)
		}
	}
	slices.SortFunc(beKeys, compareBackendKeys)
	for _, bk := range beKeys {
		val := datapath.Backend{
			Addr:  datapath.AddrToBE(bk.addr().Addr()),
			Port:  datapath.PortToBE(bk.addr().Port()),
			Proto: uint8(bk.proto()),
			State: datapath.BackendActive,
		}
		e := r.bes[bk]
		if e.active == 0 {
			val.State = datapath.BackendTerminating
		}
		if e.id == 0 || e.state != val.State {
			if e.id == 0 {
				var err error
				if e.id, err = r.allocBackend(); err != nil {
					return err
				}
				r.ids[e.id] = bk
			}
			q.backendIDs = append(q.backendIDs, e.id)
			q.backendVals = append(q.backendVals, val)
			e.state = val.State
		}
		if r.backendAddrs != nil && e.indexed != e.id {
			q.addrKeys = append(q.addrKeys, bk.addrKey())
			q.addrIDs = append(q.addrIDs, e.id)
			if e.indexed == 0 {
				r.indexed++
			}
			e.indexed = e.id
		}
		r.bes[bk] = e
	}
	if err := batchPut(r.backends, q.backendIDs, q.backendVals, "writing backends"); err != nil {
		return err
	}
	if err := batchPut(r.backendAddrs, q.addrKeys, q.addrIDs, "indexing backends"); err != nil {
		return err
	}

	// 3. Frontends: reverse NAT, slots, masters, then leftover slots.
	for _, fk := range p.order {
		df := p.desired[fk].df
		if st := r.frontends[fk]; st != nil && (df.affinity > 0 || st.master.Flags2&datapath.SvcFlagAffinity != 0) {
			keep := map[uint32]bool{}
			for _, bk := range df.slots {
				keep[r.bes[bk].id] = true
			}
			for _, id := range st.slots {
				if !keep[id] {
					lost[affinityKey{st.master.RevNat, id}] = true
				}
			}
		}
		if err := r.writeFrontend(fk, p.desired[fk], q); err != nil {
			return err
		}
	}
	if err := batchPut(r.revnat, q.revnatIDs, q.revnatVals, "writing reverse NAT"); err != nil {
		return err
	}
	if err := batchPut(r.services, q.slotKeys, q.slotVals, "writing backend slots"); err != nil {
		return err
	}
	if err := batchPut(r.services, q.masterKeys, q.masterVals, "writing services"); err != nil {
		return err
	}
	if err := batchDelete(r.services, q.leftovers, "deleting leftover slots"); err != nil {
		return err
	}
	// 3b. Internal scopes their external entry (now without the flag) no
	// longer points to.
	for _, fk := range p.staleScopes {
		r.deleteFrontend(fk, &q.scopes)
	}
	if err := q.scopes.flush(r); err != nil {
		return err
	}
	// Which service has which frontends now.
	if p.full {
		clear(r.byService)
	}
	for _, name := range p.changed {
		delete(r.byService, name)
	}
	for _, fk := range p.order {
		name := p.owner[fk]
		r.byService[name] = append(r.byService[name], fk)
	}

	// 4. Backends nobody references.
	var unused []uint32
	if p.full {
		// Every id but the one each used address keeps (a restore may
		// find two for one address).
		for id, bk := range r.ids {
			if e := r.bes[bk]; !e.zero() && e.id == id {
				continue
			}
			unused = append(unused, id)
		}
	} else {
		for bk := range touched {
			if e := r.bes[bk]; e.id != 0 && e.zero() {
				unused = append(unused, e.id)
			}
		}
	}
	slices.Sort(unused)
	for _, id := range unused {
		bk := r.ids[id]
		if e := r.bes[bk]; e.id == id {
			e.id, e.state = 0, 0
			r.bes[bk] = e
		}
		delete(r.ids, id)
	}
	if err := batchDelete(r.backends, unused, "deleting backends"); err != nil {
		return err
	}
	// The index only says which addresses are backends: it follows them.
	var unindex []datapath.BackendAddrKey
	for bk := range touched {
		e := r.bes[bk]
		if e.indexed != 0 && e.zero() {
			unindex = append(unindex, bk.addrKey())
			r.indexed--
			e.indexed = 0
		}
		if e == (backendEntry{}) {
			delete(r.bes, bk)
		} else {
			r.bes[bk] = e
		}
	}
	slices.SortFunc(unindex, func(a, b datapath.BackendAddrKey) int {
		return cmp.Or(cmp.Compare(a.Addr, b.Addr), cmp.Compare(a.Port, b.Port), cmp.Compare(a.Proto, b.Proto))
	})
	return batchDelete(r.backendAddrs, unindex, "unindexing backends")
}

// queue holds a pass's writes by phase.
type queue struct {
	stale, scopes removal
	backendIDs    []uint32
	backendVals   []datapath.Backend
	addrKeys      []datapath.BackendAddrKey
	addrIDs       []uint32
	revnatIDs     []uint32
	revnatVals    []datapath.RevNAT
	slotKeys      []datapath.ServiceKey
	slotVals      []datapath.ServiceValue
	masterKeys    []datapath.ServiceKey
	masterVals    []datapath.ServiceValue
	leftovers     []datapath.ServiceKey
}

// removal deletes frontends: masters, then their slots, then their
// reverse NAT.
type removal struct {
	masters, slots []datapath.ServiceKey
	revnat         []uint32
}

func (rm *removal) flush(r *Reconciler) error {
	if err := batchDelete(r.services, rm.masters, "deleting services"); err != nil {
		return err
	}
	if err := batchDelete(r.services, rm.slots, "deleting backend slots"); err != nil {
		return err
	}
	return batchDelete(r.revnat, rm.revnat, "deleting reverse NAT")
}

// batchPut writes keys[i] = vals[i] in order, in as few calls as the
// kernel allows.
func batchPut[K, V any](m Map, keys []K, vals []V, what string) error {
	if len(keys) == 0 {
		return nil
	}
	for len(keys) > 0 {
		n := min(len(keys), maxBatch)
		done, err := m.BatchUpdate(keys[:n], vals[:n], nil)
		if err != nil {
			return fmt.Errorf("%s (%d of %d written): %w", what, done, len(keys), err)
		}
		keys, vals = keys[n:], vals[n:]
	}
	return nil
}

// batchDelete deletes keys in order; keys already absent are passed over
// (the kernel stops a batch at the first one).
func batchDelete[K any](m Map, keys []K, what string) error {
	for len(keys) > 0 {
		n := min(len(keys), maxBatch)
		done, err := m.BatchDelete(keys[:n], nil)
		switch {
		case errors.Is(err, ebpf.ErrKeyNotExist):
			keys = keys[done+1:]
			continue
		case err != nil:
			return fmt.Errorf("%s: %w", what, err)
		}
		keys = keys[n:]
	}
	return nil
}

// maxBatch bounds one batch call (the kernel copies it in whole).
const maxBatch = 4096

// sibling is the frontend's entry in the other scope, if any.
func (r *Reconciler) sibling(fk frontendKey) *frontendState {
	other := fk.withScope(datapath.ScopeExternal)
	if fk.scope() == datapath.ScopeExternal {
		other = fk.withScope(datapath.ScopeInternal)
	}
	return r.frontends[other]
}

// writeFrontend queues what the maps need for one frontend to say df.
func (r *Reconciler) writeFrontend(fk frontendKey, sf *scopedFrontend, q *queue) error {
	df := sf.df
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
	st.want = sf.all
	rid := st.master.RevNat
	if a := fk.addr(); r.revnatUsed[rid] != a {
		q.revnatIDs = append(q.revnatIDs, rid)
		q.revnatVals = append(q.revnatVals, datapath.RevNAT{Addr: datapath.AddrToBE(a.Addr()), Port: datapath.PortToBE(a.Port())})
		r.revnatUsed[rid] = a
	}

	if n := len(df.slots) - len(st.slots); n > 0 {
		st.slots = slices.Grow(st.slots, n)
	}
	for i, bk := range df.slots {
		id := r.bes[bk].id
		if i < len(st.slots) && st.slots[i] == id {
			continue
		}
		q.slotKeys = append(q.slotKeys, fk.svcKey(uint16(i+1)))
		q.slotVals = append(q.slotVals, datapath.ServiceValue{BackendId: id, RevNat: rid})
		if i < len(st.slots) {
			st.slots[i] = id
		} else {
			st.slots = append(st.slots, id)
			r.serviceEntries++
		}
	}

	master := datapath.ServiceValue{Count: uint16(len(df.slots)), RevNat: rid, Type: uint8(df.typ), Flags2: df.flags2, BackendId: uint32(df.selection)}
	if df.affinity > 0 {
		master.AffinityTimeout = df.affinity
	}
	if !st.hasMaster || st.master != master {
		q.masterKeys = append(q.masterKeys, fk.svcKey(0))
		q.masterVals = append(q.masterVals, master)
		if !st.hasMaster {
			r.serviceEntries++
		}
		st.master, st.hasMaster = master, true
	}

	for i := len(st.slots) - 1; i >= len(df.slots); i-- {
		q.leftovers = append(q.leftovers, fk.svcKey(uint16(i+1)))
		st.slots = st.slots[:i]
		r.serviceEntries--
	}
	return nil
}

// deleteFrontend queues the removal of a frontend.
func (r *Reconciler) deleteFrontend(fk frontendKey, rm *removal) {
	st := r.frontends[fk]
	if st.hasMaster {
		rm.masters = append(rm.masters, fk.svcKey(0))
		st.hasMaster = false
		r.serviceEntries--
	}
	for i := len(st.slots); i >= 1; i-- {
		rm.slots = append(rm.slots, fk.svcKey(uint16(i)))
		r.serviceEntries--
	}
	st.slots = nil
	if sib := r.sibling(fk); sib != nil && sib.master.RevNat == st.master.RevNat {
		delete(r.frontends, fk) // the other scope keeps the id
		return
	}
	if rid := st.master.RevNat; rid != 0 {
		rm.revnat = append(rm.revnat, rid)
		delete(r.revnatUsed, rid)
	}
	delete(r.frontends, fk)
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

// scopedAll is scoped for every frontend of a service.
func (r *Reconciler) scopedAll(svc *model.Service) []scopedFrontend {
	var out []scopedFrontend
	for i := range svc.Frontends {
		out = append(out, r.scoped(svc, &svc.Frontends[i])...)
	}
	return out
}

// scoped turns a model frontend into the map frontends this node needs.
func (r *Reconciler) scoped(svc *model.Service, f *model.Frontend) []scopedFrontend {
	return scopeFrontend(model.Topology{Node: r.node, Zone: r.zone}, svc, f)
}

// scopeFrontend chooses the backends of each scope as kube-proxy does
// (model.Frontend.ClusterBackends, LocalBackends). A ClusterIP serves
// in-cluster traffic only: one entry, with the node's own backends under
// internalTrafficPolicy Local, else the cluster's (narrowed by topology
// hints). An external-facing frontend uses the cluster's backends; with
// externalTrafficPolicy Local it gets two entries when the two choices
// differ: the external scope with the node's own backends (flagged, so
// in-cluster lookups move on) and the internal scope with the cluster's,
// as kube-proxy short-circuits in-cluster clients.
//
// Every scope keeps all the backends it may have sent flows to in the
// backend map (terminating ones, and those hints or a traffic policy
// leave out of its choice now), so their flows go on.
func scopeFrontend(t model.Topology, svc *model.Service, f *model.Frontend) []scopedFrontend {
	all := f.Backends
	nlocal := 0
	for _, b := range all {
		if b.NodeName == t.Node {
			nlocal++
		}
	}
	local := func() []model.Backend {
		out := make([]model.Backend, 0, nlocal)
		for _, b := range all {
			if b.NodeName == t.Node {
				out = append(out, b)
			}
		}
		return out
	}
	mk := func(scope uint8, bes, chosen []model.Backend, why model.Selection, flags2 uint8) scopedFrontend {
		sf := scopedFrontend{
			key: mkFrontendKey(f.Addr, f.Proto, scope),
			df:  &desiredFrontend{typ: f.Type, affinity: svc.AffinityTimeout, flags2: flags2, selection: why},
			all: make([]scopedBackend, 0, len(bes)),
		}
		if sf.df.affinity > 0 {
			sf.df.flags2 |= datapath.SvcFlagAffinity
		}
		// loadBalancerSourceRanges restrict load-balancer IPs; the
		// nodeport module writes the ranges the flag points to.
		if f.Type == model.LoadBalancer && len(svc.SourceRanges) > 0 {
			sf.df.flags2 |= datapath.SvcFlagSourceRanges
		}
		// No usable endpoint at all (not merely none in this scope): new
		// flows are rejected at once, as kube-proxy does.
		if len(f.Backends) == 0 {
			sf.df.flags2 |= datapath.SvcFlagReject
		}
		// The service's own forwarding mode, per frontend (hybrid is DSR
		// for TCP, SNAT for the rest); without one the pool's applies.
		switch svc.ForwardingMode {
		case model.ForwardSNAT:
			sf.df.flags2 |= datapath.SvcFlagModeSNAT
		case model.ForwardDSR:
			sf.df.flags2 |= datapath.SvcFlagModeDSR
		case model.ForwardHybrid:
			if f.Proto == model.TCP {
				sf.df.flags2 |= datapath.SvcFlagModeDSR
			} else {
				sf.df.flags2 |= datapath.SvcFlagModeSNAT
			}
		}
		for _, b := range bes {
			bk := mkBackendKey(b.Addr, f.Proto)
			if slices.ContainsFunc(sf.all, func(s scopedBackend) bool { return s.key == bk }) {
				continue
			}
			sf.all = append(sf.all, scopedBackend{bk, b.State})
		}
		sf.df.slots = make([]backendKey, 0, len(chosen))
		for _, b := range chosen {
			sf.df.slots = append(sf.df.slots, mkBackendKey(b.Addr, f.Proto))
		}
		slices.SortFunc(sf.df.slots, compareBackendKeys)
		sf.df.slots = slices.Compact(sf.df.slots)
		return sf
	}
	if f.Type == model.ClusterIP {
		if f.InternalLocal {
			return []scopedFrontend{mk(datapath.ScopeExternal, local(), f.LocalBackends(t), model.SelectLocal, 0)}
		}
		cluster, why := f.ClusterBackends(t)
		return []scopedFrontend{mk(datapath.ScopeExternal, all, cluster, why, 0)}
	}
	cluster, why := f.ClusterBackends(t)
	if !f.ExternalLocal {
		return []scopedFrontend{mk(datapath.ScopeExternal, all, cluster, why, 0)}
	}
	mine := f.LocalBackends(t)
	// Every backend on this node, and the cluster's choice the same as
	// the node's: one entry serves both.
	if nlocal == len(all) && sameBackends(mine, cluster) {
		return []scopedFrontend{mk(datapath.ScopeExternal, local(), mine, model.SelectLocal, 0)}
	}
	return []scopedFrontend{
		mk(datapath.ScopeExternal, local(), mine, model.SelectLocal, datapath.SvcFlagTwoScopes),
		mk(datapath.ScopeInternal, all, cluster, why, 0),
	}
}

// sameBackends reports whether two choices hold the same addresses.
func sameBackends(a, b []model.Backend) bool {
	if len(a) != len(b) {
		return false
	}
	seen := make(map[netip.AddrPort]bool, len(a))
	for _, x := range a {
		seen[x.Addr] = true
	}
	for _, x := range b {
		if !seen[x.Addr] {
			return false
		}
	}
	return true
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

func compareBackendKeys(a, b backendKey) int { return cmp.Compare(a, b) }

func compareFrontendKeys(a, b frontendKey) int { return cmp.Compare(a, b) }

// Run applies the store's changes as they come, once every expected
// source has synced, retrying failures with backoff until ctx ends.
func (r *Reconciler) Run(ctx context.Context, store *model.Store) {
	model.FollowServices(ctx, store, r.log, "writing services to the datapath", func(d model.Delta) error {
		err := r.Apply(d)
		r.mu.Lock()
		if err != nil {
			r.status.Error = err.Error()
		} else {
			r.status.Error = ""
			r.status.AppliedVersion = d.Version
		}
		r.mu.Unlock()
		if err == nil {
			r.writtenOnce.Do(func() { close(r.written) })
			r.log.Info("services written to the datapath", "full", d.Full, "changed", len(d.Services), "version", d.Version,
				"took", r.Status().LastTook)
		}
		return err
	})
}
