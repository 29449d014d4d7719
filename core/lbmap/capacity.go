package lbmap

import (
	"fmt"
	"sync"
	"time"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/model"
)

// Settings that size the maps this package writes (config.Datapath).
const (
	SettingServices = "datapath.servicesMaxEntries"
	SettingBackends = "datapath.backendsMaxEntries"
	SettingRevNAT   = "datapath.revNATMaxEntries"
)

// CapacityError says a map cannot hold what an update needs.
type CapacityError struct {
	Map     string // the map's name
	Setting string // the setting that sizes it
	Need    int    // entries needed, Reserve included
	Reserve int    // of which room to rewrite a service in place
	Max     int    // entries the map holds
}

func (e *CapacityError) Error() string {
	room := ""
	if e.Reserve > 0 {
		room = fmt.Sprintf(" (%d of them room to rewrite a service make-before-break)", e.Reserve)
	}
	return fmt.Sprintf("%s would need %d entries%s, more than the %d it holds: raise %s", e.Map, e.Need, room, e.Max, e.Setting)
}

// Limits are the sizes of the maps the reconciler writes; zero means
// unchecked.
type Limits struct {
	Services, Backends, RevNAT int
}

// Admission is the store's admitter for the service maps: it counts what
// the accepted services need in each map (for this node: traffic policies
// decide the backends of a scope) and refuses an update whose result would
// not fit, before anything is written. Rewriting a service needs room
// beyond its result in one map only: its new backends are written before
// the ones it drops are deleted, so the backends map keeps room for the
// largest such drop of the update (slots are rewritten in place, frontends
// that go are deleted first).
type Admission struct {
	node   string
	limits Limits

	mu       sync.Mutex
	services int
	revnat   int
	backends map[backendKey]int
}

var _ model.Admitter = (*Admission)(nil)

// NewAdmission returns an admission for the node's maps of those sizes.
func NewAdmission(node string, limits Limits) *Admission {
	return &Admission{node: node, limits: limits, backends: map[backendKey]int{}}
}

// serviceEntries is what scoped frontends take in the services map: a
// master entry and a slot per backend each.
func serviceEntries(sfs []scopedFrontend) int {
	n := 0
	for _, sf := range sfs {
		n += 1 + len(sf.df.slots)
	}
	return n
}

// cost is what one service takes in each map.
func (a *Admission) cost(svc *model.Service) (entries, revnat int, backends []backendKey) {
	seen := map[backendKey]bool{}
	fronts := map[model.FrontendKey]bool{}
	for i := range svc.Frontends {
		f := &svc.Frontends[i]
		// Counted without hints, so a change of zone never needs more
		// room than admitted: hints only narrow a scope's choice, but
		// may split an externalTrafficPolicy Local frontend whose
		// backends are all local into two scopes.
		sfs := scopeFrontend(model.Topology{Node: a.node, IgnoreHints: true}, svc, f)
		entries += serviceEntries(sfs)
		if len(sfs) == 1 && f.ExternalLocal && f.Type != model.ClusterIP && f.HasHints() {
			entries += serviceEntries(sfs)
		}
		if !fronts[f.Key()] {
			fronts[f.Key()] = true
			revnat++ // both scopes share one id
		}
		for _, sf := range sfs {
			for _, b := range sf.all {
				if !seen[b.key] {
					seen[b.key] = true
					backends = append(backends, b.key)
				}
			}
		}
	}
	return entries, revnat, backends
}

// Admit implements model.Admitter.
func (a *Admission) Admit(changes []model.Change) (func(), error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	dEntries, dRevNAT := 0, 0
	dBackends := make(map[backendKey]int, 4*len(changes))
	reserve := 0
	for _, c := range changes {
		var dropped map[backendKey]bool
		if c.Old != nil {
			e, rn, bes := a.cost(c.Old)
			dEntries -= e
			dRevNAT -= rn
			dropped = make(map[backendKey]bool, len(bes))
			for _, bk := range bes {
				dBackends[bk]--
				dropped[bk] = true
			}
		}
		if c.New != nil {
			e, rn, bes := a.cost(c.New)
			dEntries += e
			dRevNAT += rn
			for _, bk := range bes {
				dBackends[bk]++
				delete(dropped, bk)
			}
		}
		if c.New != nil {
			reserve = max(reserve, len(dropped))
		}
	}
	backends := len(a.backends)
	for bk, d := range dBackends {
		before := a.backends[bk]
		switch {
		case before == 0 && before+d > 0:
			backends++
		case before > 0 && before+d == 0:
			backends--
		}
	}
	// An update that leaves a map emptier is never refused: after the
	// sizes shrank, removing services must still work.
	check := func(m, setting string, cur, next, reserve, limit int) error {
		if limit == 0 || next < cur || next+reserve <= limit {
			return nil
		}
		return &CapacityError{Map: m, Setting: setting, Need: next + reserve, Reserve: reserve, Max: limit}
	}
	if err := check(datapath.MapServices, SettingServices, a.services, a.services+dEntries, 0, a.limits.Services); err != nil {
		return nil, err
	}
	if err := check(datapath.MapBackends, SettingBackends, len(a.backends), backends, reserve, a.limits.Backends); err != nil {
		return nil, err
	}
	if err := check(datapath.MapRevNAT, SettingRevNAT, a.revnat, a.revnat+dRevNAT, 0, a.limits.RevNAT); err != nil {
		return nil, err
	}
	return func() {
		a.mu.Lock()
		defer a.mu.Unlock()
		a.services += dEntries
		a.revnat += dRevNAT
		for bk, d := range dBackends {
			if n := a.backends[bk] + d; n > 0 {
				a.backends[bk] = n
			} else {
				delete(a.backends, bk)
			}
		}
	}, nil
}

// checkRoom refuses a plan whose writes would, at some point, not fit
// the maps: new backends are written before old ones go, and a frontend's
// new slots before its leftovers.
func (r *Reconciler) checkRoom(p *plan) error {
	entries := r.serviceEntries
	for _, fk := range p.stale {
		entries -= r.frontends[fk].entries()
	}
	newFrontends := 0
	newBackends := map[backendKey]bool{}
	newIndexed := map[backendKey]bool{}
	for _, fk := range p.order {
		sf := p.desired[fk]
		n := 1 + len(sf.df.slots)
		if st := r.frontends[fk]; st != nil {
			entries += max(0, n-st.entries())
		} else {
			entries += n
			newFrontends++
		}
		for _, b := range sf.all {
			e := r.bes[b.key]
			if e.id == 0 {
				newBackends[b.key] = true
			}
			if e.indexed == 0 {
				newIndexed[b.key] = true
			}
		}
	}
	check := func(m Map, name, setting string, need int) error {
		if m == nil {
			return nil
		}
		if limit := int(m.MaxEntries()); need > limit {
			return &CapacityError{Map: name, Setting: setting, Need: need, Max: limit}
		}
		return nil
	}
	if err := check(r.services, datapath.MapServices, SettingServices, entries); err != nil {
		return err
	}
	if err := check(r.backends, datapath.MapBackends, SettingBackends, len(r.ids)+len(newBackends)); err != nil {
		return err
	}
	if err := check(r.backendAddrs, datapath.MapBackendAddrs, SettingBackends, r.indexed+len(newIndexed)); err != nil {
		return err
	}
	return check(r.revnat, datapath.MapRevNAT, SettingRevNAT, len(r.revnatUsed)+newFrontends)
}

// MapFill is how full one map is.
type MapFill struct {
	Name       string `json:"name"`
	Entries    int    `json:"entries"`
	MaxEntries int    `json:"maxEntries"`
}

// Status is what the reconciler did last and how full its maps are.
type Status struct {
	// AppliedVersion is the store version the maps hold.
	AppliedVersion uint64 `json:"appliedVersion"`
	// Error is why the last apply failed ("" when it did not).
	Error string `json:"error,omitempty"`
	// Passes counts applies, Full the full passes among them, Services
	// the services they changed, and WorkMicros the CPU time they took in
	// all.
	Passes     uint64 `json:"passes"`
	Full       uint64 `json:"fullPasses"`
	Services   uint64 `json:"servicesChanged"`
	WorkMicros uint64 `json:"workMicros"`
	// LastTook is the last apply's time.
	LastTook time.Duration `json:"lastTookNanos"`
	Maps     []MapFill     `json:"maps"`
}

// record counts a finished pass: took is its wall time, work its CPU
// time.
func (r *Reconciler) record(p *plan, took, work time.Duration) {
	fill := func(m Map, name string, n int) MapFill {
		f := MapFill{Name: name, Entries: n}
		if m != nil {
			f.MaxEntries = int(m.MaxEntries())
		}
		return f
	}
	maps := []MapFill{
		fill(r.services, datapath.MapServices, r.serviceEntries),
		fill(r.backends, datapath.MapBackends, len(r.ids)),
		fill(r.revnat, datapath.MapRevNAT, len(r.revnatUsed)),
	}
	if r.backendAddrs != nil {
		maps = append(maps, fill(r.backendAddrs, datapath.MapBackendAddrs, r.indexed))
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.status.Passes++
	if p.full {
		r.status.Full++
	}
	r.status.Services += uint64(len(p.changed))
	r.status.WorkMicros += uint64(work.Microseconds())
	r.status.LastTook = took
	r.status.Maps = maps
	if r.observe != nil {
		r.observe(took, p.full)
	}
}

// OnPass has observe hear every finished pass: its wall time, and whether
// it was full (for a latency histogram). Call it before Run.
func (r *Reconciler) OnPass(observe func(took time.Duration, full bool)) { r.observe = observe }

// Status returns what the reconciler did last and how full its maps are.
func (r *Reconciler) Status() Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.status
	st.Maps = append([]MapFill(nil), st.Maps...)
	return st
}
