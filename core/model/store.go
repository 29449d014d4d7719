package model

import (
	"fmt"
	"slices"
	"strings"
	"sync"
)

// Store merges what every source wants into one Snapshot. Each source
// replaces or edits its own services; an update that would make the whole
// state invalid (a bad service, or a frontend two services claim) is
// refused as a whole and the previous state stays. Services handed to the
// store belong to it: callers must not change them afterwards.
type Store struct {
	mu       sync.Mutex
	sources  map[string]map[ServiceName]*Service
	nodes    map[string][]*Node
	synced   map[string]bool
	expected []string
	snap     *Snapshot
	version  uint64
	subs     []chan struct{}
}

// NewStore returns an empty store.
func NewStore() *Store {
	return &Store{
		sources: map[string]map[ServiceName]*Service{},
		nodes:   map[string][]*Node{},
		synced:  map[string]bool{},
		snap:    &Snapshot{},
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
func (s *Store) Replace(source string, services []*Service) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	next := map[ServiceName]*Service{}
	for _, svc := range services {
		if err := svc.Validate(); err != nil {
			return err
		}
		if _, dup := next[svc.Name]; dup {
			return fmt.Errorf("service %s is defined twice", svc.Name)
		}
		next[svc.Name] = svc
	}
	return s.commit(source, next, true)
}

// Upsert adds or replaces one service of a source.
func (s *Store) Upsert(source string, svc *Service) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := svc.Validate(); err != nil {
		return err
	}
	next := cloneSource(s.sources[source])
	next[svc.Name] = svc
	return s.commit(source, next, s.synced[source])
}

// Delete removes one service of a source (a no-op when absent).
func (s *Store) Delete(source string, name ServiceName) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.sources[source][name]; !ok {
		return
	}
	next := cloneSource(s.sources[source])
	delete(next, name)
	_ = s.commit(source, next, s.synced[source]) // removing cannot create a conflict
}

// MarkSynced records that a source has delivered its initial state (for
// sources that build it with Upsert).
func (s *Store) MarkSynced(source string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.synced[source] {
		s.synced[source] = true
		s.notify()
	}
}

func cloneSource(m map[ServiceName]*Service) map[ServiceName]*Service {
	out := make(map[ServiceName]*Service, len(m)+1)
	for k, v := range m {
		out[k] = v
	}
	return out
}

// commit validates the union of all sources with source replaced by next,
// and installs it only when valid. Errors blame the incoming services and
// name the source already holding what they clash with.
func (s *Store) commit(source string, next map[ServiceName]*Service, synced bool) error {
	type owned struct {
		svc    *Service
		source string
	}
	names := map[ServiceName]string{}
	frontends := map[FrontendKey]owned{}
	var all []*Service
	var srcs []string
	for src := range s.sources {
		if src != source {
			srcs = append(srcs, src)
		}
	}
	slices.Sort(srcs)
	for _, src := range srcs {
		for _, svc := range s.sources[src] {
			all = append(all, svc)
			names[svc.Name] = src
			for _, f := range svc.Frontends {
				frontends[f.Key()] = owned{svc, src}
			}
		}
	}
	incoming := make([]*Service, 0, len(next))
	for _, svc := range next {
		incoming = append(incoming, svc)
	}
	slices.SortFunc(incoming, func(a, b *Service) int { return strings.Compare(a.Name.String(), b.Name.String()) })
	for _, svc := range incoming {
		if other, ok := names[svc.Name]; ok {
			return fmt.Errorf("service %s from source %s is already defined by source %s", svc.Name, source, other)
		}
		names[svc.Name] = source
		for _, f := range svc.Frontends {
			if o, ok := frontends[f.Key()]; ok {
				return fmt.Errorf("frontend %s of service %s (source %s) is already used by service %s (source %s)", f.Key(), svc.Name, source, o.svc.Name, o.source)
			}
			frontends[f.Key()] = owned{svc, source}
		}
		all = append(all, svc)
	}
	slices.SortFunc(all, func(a, b *Service) int {
		return strings.Compare(a.Name.String(), b.Name.String())
	})
	s.sources[source] = next
	if synced {
		s.synced[source] = true
	}
	s.snap = &Snapshot{Services: all, Nodes: s.snap.Nodes}
	s.version++
	s.notify()
	return nil
}

func (s *Store) notify() {
	for _, c := range s.subs {
		select {
		case c <- struct{}{}:
		default: // a notification is pending already
		}
	}
}

// Snapshot returns the current desired state, its version, and whether it
// is authoritative: at least one source is expected and every expected
// source has synced. Only an authoritative snapshot may be written to the
// datapath; with no source at all, nothing manages services and the maps
// must be left as they are.
func (s *Store) Snapshot() (*Snapshot, uint64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.snap, s.version, len(s.expected) > 0 && s.readyLocked()
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
