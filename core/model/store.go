package model

import (
	"fmt"
	"slices"
	"strings"
	"sync"
)

// Store merges what every source wants into one desired state. Each source
// replaces or edits its own services; an update that would make the whole
// state invalid (a bad service, a frontend two services claim, more than
// the datapath can hold) is refused as a whole and the previous state
// stays. Services handed to the store belong to it: callers must not
// change them afterwards.
//
// Every update costs in proportion to the services it changes, never to
// the services the store holds: readers follow changes through a Watcher
// (the services that changed since they last looked), and the sorted
// Snapshot is built only when someone asks for it.
type Store struct {
	mu       sync.Mutex
	services map[ServiceName]*Service
	// owners says which service holds each frontend.
	owners   map[FrontendKey]ServiceName
	nodes    map[string][]*Node
	allNodes []*Node // sorted by name
	synced   map[string]bool
	expected []string
	version  uint64
	// nodesVersion and svcVersion count the changes of nodes and of
	// services.
	nodesVersion uint64
	svcVersion   uint64
	// snap caches the sorted snapshot of version snapVersion.
	snap        *Snapshot
	snapVersion uint64
	subs        []chan struct{}
	nodeSubs    []chan struct{}
	watchers    []*Watcher
	admitter    Admitter
	// zone is this node's zone (ZoneLabel), for topology hints.
	zone string
}

// Change is one service as the store holds it and as an update would
// leave it; nil stands for no service.
type Change struct {
	Old, New *Service
}

// Admitter vets updates before the store accepts them: the datapath's
// capacity, say. Admit sees every service an update changes; it returns an
// error to refuse the update (nothing changes), or a commit to run once the
// store has accepted it. The store calls it under its lock, one update at a
// time.
type Admitter interface {
	Admit(changes []Change) (commit func(), err error)
}

// NewStore returns an empty store.
func NewStore() *Store {
	return &Store{
		services: map[ServiceName]*Service{},
		owners:   map[FrontendKey]ServiceName{},
		nodes:    map[string][]*Node{},
		synced:   map[string]bool{},
	}
}

// SetAdmitter makes a vet every later update. The services already held
// are handed to it as one accepted update, so its accounting starts from
// what the store holds.
func (s *Store) SetAdmitter(a Admitter) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.admitter = a
	if a == nil || len(s.services) == 0 {
		return
	}
	changes := make([]Change, 0, len(s.services))
	for _, svc := range s.services {
		changes = append(changes, Change{New: svc})
	}
	if commit, _ := a.Admit(changes); commit != nil {
		commit()
	}
}

// Expect declares a source whose first full state must arrive before the
// store is Ready: a restarting agent must not write a partial state (which
// would delete live services) while a source is still catching up.
func (s *Store) Expect(source string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !slices.Contains(s.expected, source) {
		s.expected = append(s.expected, source)
	}
}

// Replace sets every service of a source and marks the source synced.
// Only the services that differ from what the source had are changes.
func (s *Store) Replace(source string, services []*Service) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	upserts, seen, err := s.changed(source, services)
	if err != nil {
		return err
	}
	var deletes []ServiceName
	// Replace sees every service anyway: the source's are found among
	// all rather than kept in an index of their own.
	for name, svc := range s.services {
		if svc.Source == source && !seen[name] {
			deletes = append(deletes, name)
		}
	}
	return s.update(source, upserts, deletes, true)
}

// Update adds or replaces the upserts and removes the deletes of a source
// (names the source does not hold are ignored), all or nothing.
func (s *Store) Update(source string, upserts []*Service, deletes []ServiceName) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	changed, _, err := s.changed(source, upserts)
	if err != nil {
		return err
	}
	return s.update(source, changed, deletes, s.synced[source])
}

// changed returns the services that differ from what the source holds,
// and the names of all of them; a name given twice is an error.
func (s *Store) changed(source string, services []*Service) ([]*Service, map[ServiceName]bool, error) {
	seen := make(map[ServiceName]bool, len(services))
	var out []*Service
	for _, svc := range services {
		if seen[svc.Name] {
			return nil, nil, fmt.Errorf("service %s is defined twice", svc.Name)
		}
		seen[svc.Name] = true
		if old := s.services[svc.Name]; old != nil && old.Source == source && old.Equal(svc) {
			continue
		}
		out = append(out, svc)
	}
	return out, seen, nil
}

// Upsert adds or replaces one service of a source.
func (s *Store) Upsert(source string, svc *Service) error {
	return s.Update(source, []*Service{svc}, nil)
}

// Delete removes one service of a source (a no-op when absent).
func (s *Store) Delete(source string, name ServiceName) {
	_ = s.Update(source, nil, []ServiceName{name}) // removing cannot be refused
}

// MarkSynced records that a source has delivered its initial state (for
// sources that build it with Upsert).
func (s *Store) MarkSynced(source string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.synced[source] {
		s.synced[source] = true
		s.notify(true, true)
	}
}

// update validates and installs one update of a source. Errors blame the
// incoming services and name the source already holding what they clash
// with.
func (s *Store) update(source string, upserts []*Service, deletes []ServiceName, synced bool) error {
	slices.SortFunc(upserts, func(a, b *Service) int { return compareNames(a.Name, b.Name) })
	// Services of this update, whose current frontends are released.
	touched := make(map[ServiceName]bool, len(upserts)+len(deletes))
	for _, svc := range upserts {
		if err := svc.Validate(); err != nil {
			return err
		}
		if old := s.services[svc.Name]; old != nil && old.Source != source {
			return fmt.Errorf("service %s from source %s is already defined by source %s", svc.Name, source, old.Source)
		}
		touched[svc.Name] = true
	}
	var gone []ServiceName
	for _, name := range deletes {
		if old := s.services[name]; old != nil && old.Source == source && !touched[name] {
			touched[name] = true
			gone = append(gone, name)
		}
	}
	claimed := make(map[FrontendKey]ServiceName, len(upserts))
	for _, svc := range upserts {
		for _, f := range svc.Frontends {
			k := f.Key()
			other, held := claimed[k]
			if !held {
				if o, ok := s.owners[k]; ok && !touched[o] {
					other, held = o, true
				}
			}
			if held {
				return fmt.Errorf("frontend %s of service %s (source %s) is already used by service %s (source %s)",
					k, svc.Name, source, other, s.sourceOf(other, source))
			}
			claimed[k] = svc.Name
		}
	}
	changed := len(upserts) > 0 || len(gone) > 0
	var commit func()
	if s.admitter != nil && changed {
		changes := make([]Change, 0, len(upserts)+len(gone))
		for _, svc := range upserts {
			changes = append(changes, Change{Old: s.services[svc.Name], New: svc})
		}
		for _, name := range gone {
			changes = append(changes, Change{Old: s.services[name]})
		}
		var err error
		if commit, err = s.admitter.Admit(changes); err != nil {
			return err
		}
	}

	// Accepted: install.
	syncChanged := synced && !s.synced[source]
	if synced {
		s.synced[source] = true
	}
	if !changed {
		if syncChanged {
			s.notify(true, true)
		}
		return nil
	}
	if commit != nil {
		commit()
	}
	release := func(name ServiceName) {
		if old := s.services[name]; old != nil {
			for _, f := range old.Frontends {
				if s.owners[f.Key()] == name {
					delete(s.owners, f.Key())
				}
			}
		}
	}
	for _, name := range gone {
		release(name)
		delete(s.services, name)
	}
	for _, svc := range upserts {
		release(svc.Name)
	}
	for _, svc := range upserts {
		svc.Source = source
		s.services[svc.Name] = svc
		for _, f := range svc.Frontends {
			s.owners[f.Key()] = svc.Name
		}
	}
	for _, w := range s.watchers {
		for _, name := range gone {
			w.dirty[name] = struct{}{}
		}
		for _, svc := range upserts {
			w.dirty[svc.Name] = struct{}{}
		}
	}
	s.version++
	s.svcVersion++
	s.notify(true, syncChanged)
	return nil
}

// sourceOf names the source of a service held by the store, or of one of
// the update when it is not held yet.
func (s *Store) sourceOf(name ServiceName, updating string) string {
	if svc := s.services[name]; svc != nil {
		return svc.Source
	}
	return updating
}

func compareNames(a, b ServiceName) int {
	return strings.Compare(a.String(), b.String())
}

// notify wakes subscribers: those of services on a change of services,
// those of nodes on a change of nodes; both when readiness may have
// changed.
func (s *Store) notify(services, nodes bool) {
	wake := func(c chan struct{}) {
		select {
		case c <- struct{}{}:
		default: // a notification is pending already
		}
	}
	for _, c := range s.subs {
		wake(c)
	}
	if services {
		for _, w := range s.watchers {
			wake(w.c)
		}
	}
	if nodes {
		for _, c := range s.nodeSubs {
			wake(c)
		}
	}
}

// Snapshot returns the current desired state, its version, and whether it
// is authoritative: at least one source is expected and every expected
// source has synced. Only an authoritative snapshot may be written to the
// datapath; with no source at all, nothing manages services and the maps
// must be left as they are. It sorts every service: readers that follow
// changes use a Watcher instead.
func (s *Store) Snapshot() (*Snapshot, uint64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.snap == nil || s.snapVersion != s.version {
		all := make([]*Service, 0, len(s.services))
		for _, svc := range s.services {
			all = append(all, svc)
		}
		slices.SortFunc(all, func(a, b *Service) int { return compareNames(a.Name, b.Name) })
		s.snap, s.snapVersion = &Snapshot{Services: all, Nodes: s.allNodes}, s.version
	}
	return s.snap, s.version, s.authoritative()
}

func (s *Store) authoritative() bool { return len(s.expected) > 0 && s.readyLocked() }

// Service returns the service of that name, or nil.
func (s *Store) Service(name ServiceName) *Service {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.services[name]
}

// Len is the number of services held.
func (s *Store) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.services)
}

// ServicesVersion counts the accepted changes of services: a reader that
// applied a Delta of this version (or later) holds them.
func (s *Store) ServicesVersion() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.svcVersion
}

// Ready reports whether every expected source has synced.
func (s *Store) Ready() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.readyLocked()
}

func (s *Store) readyLocked() bool {
	for _, src := range s.expected {
		if !s.synced[src] {
			return false
		}
	}
	return true
}

// Subscribe returns a channel that receives a value after changes; several
// changes may be coalesced into one notification.
func (s *Store) Subscribe() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := make(chan struct{}, 1)
	c <- struct{}{} // the current state counts as a change
	s.subs = append(s.subs, c)
	return c
}

// SubscribeNodes is Subscribe for changes of nodes (and of readiness)
// only: readers of nodes are not woken by every change of a service.
func (s *Store) SubscribeNodes() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := make(chan struct{}, 1)
	c <- struct{}{}
	s.nodeSubs = append(s.nodeSubs, c)
	return c
}

// Watcher follows the services of a store as changes: which services
// changed since the watcher last looked, whatever the number of services
// that did not.
type Watcher struct {
	s     *Store
	c     chan struct{}
	dirty map[ServiceName]struct{}
	full  bool
}

// Delta is what a Watcher reports.
type Delta struct {
	// Full says Services holds every service: whatever the reader holds
	// that is not in it is gone.
	Full bool
	// Services are the services that changed, as they are now; nil for
	// one that is gone.
	Services map[ServiceName]*Service
	// Version is the store's ServicesVersion the delta brings the
	// reader to.
	Version uint64
	// Zone is the node's zone the services are to be served in. A change
	// of zone makes the next Delta of every watcher Full, so a reader
	// that takes it from Full deltas serves every service in one zone.
	Zone string
}

// Watch returns a watcher whose first Delta is Full.
func (s *Store) Watch() *Watcher {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := &Watcher{s: s, c: make(chan struct{}, 1), dirty: map[ServiceName]struct{}{}, full: true}
	w.c <- struct{}{}
	s.watchers = append(s.watchers, w)
	return w
}

// C receives a value when there may be changes to read.
func (w *Watcher) C() <-chan struct{} { return w.c }

// Next returns the changes since the previous call, or false while the
// store is not authoritative (the changes wait).
func (w *Watcher) Next() (Delta, bool) {
	s := w.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.authoritative() {
		return Delta{}, false
	}
	d := Delta{Full: w.full, Version: s.svcVersion, Zone: s.zone}
	if w.full {
		d.Services = make(map[ServiceName]*Service, len(s.services))
		for name, svc := range s.services {
			d.Services[name] = svc
		}
	} else {
		d.Services = make(map[ServiceName]*Service, len(w.dirty))
		for name := range w.dirty {
			d.Services[name] = s.services[name]
		}
	}
	w.full = false
	clear(w.dirty)
	return d, true
}

// SetZone sets the zone of the node the store's services are served on
// (its ZoneLabel): topology hints choose backends by it, so every
// watcher's next Delta is Full.
func (s *Store) SetZone(zone string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.zone == zone {
		return
	}
	s.zone = zone
	for _, w := range s.watchers {
		w.full = true
		select {
		case w.c <- struct{}{}:
		default:
		}
	}
}

// Zone is the zone SetZone set.
func (s *Store) Zone() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.zone
}

// Resync makes the next Delta Full: for a reader that lost track of what
// it holds.
func (w *Watcher) Resync() {
	w.s.mu.Lock()
	w.full = true
	w.s.mu.Unlock()
	select {
	case w.c <- struct{}{}:
	default:
	}
}

// Equal reports whether two services serve the same: every field but the
// source that defined them.
func (s *Service) Equal(o *Service) bool {
	if s == o {
		return true
	}
	if s == nil || o == nil {
		return false
	}
	return s.Name == o.Name && s.AffinityTimeout == o.AffinityTimeout && s.HealthCheckNodePort == o.HealthCheckNodePort &&
		s.ForwardingMode == o.ForwardingMode &&
		slices.Equal(s.SourceRanges, o.SourceRanges) &&
		slices.Equal(s.Unserved, o.Unserved) && slices.EqualFunc(s.Frontends, o.Frontends, func(a, b Frontend) bool {
		return a.Addr == b.Addr && a.Proto == b.Proto && a.Type == b.Type && a.PortName == b.PortName &&
			a.InternalLocal == b.InternalLocal && a.ExternalLocal == b.ExternalLocal && slices.EqualFunc(a.Backends, b.Backends, Backend.Equal)
	})
}
