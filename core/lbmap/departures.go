package lbmap

import (
	"net/netip"
	"slices"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/model"
)

// Departure is a backend that left a frontend (the frontend by its reverse
// NAT id, which socket LB records on the sockets it translates). A backend
// that turned terminating has not left: it keeps its flows.
type Departure struct {
	RevNAT  uint32
	Backend netip.AddrPort
	Proto   model.Proto
}

// OnDepartures has fn called after every successful write with the
// backends that left a frontend in it. Call it before the first Apply;
// without it nothing is computed.
func (r *Reconciler) OnDepartures(fn func([]Departure)) { r.departed = fn }

// backendsByRevNAT lists, for the frontends keys and their other scopes,
// the backends each reverse NAT id leads to: the backends last written
// (terminating ones included), or, for a frontend restored from the maps
// and not written since, its slots.
func (r *Reconciler) backendsByRevNAT(keys []frontendKey) map[uint32]map[backendKey]bool {
	out := map[uint32]map[backendKey]bool{}
	add := func(fk frontendKey) {
		st := r.frontends[fk]
		if st == nil || st.master.RevNat == 0 {
			return
		}
		set := out[st.master.RevNat]
		if set == nil {
			set = map[backendKey]bool{}
			out[st.master.RevNat] = set
		}
		if st.want != nil {
			for _, b := range st.want {
				set[b.key] = true
			}
			return
		}
		for _, id := range st.slots {
			if bk, ok := r.ids[id]; ok {
				set[bk] = true
			}
		}
	}
	for _, fk := range keys {
		add(fk.withScope(datapath.ScopeExternal))
		add(fk.withScope(datapath.ScopeInternal))
	}
	return out
}

// planKeys are the frontends a plan writes or deletes.
func (p *plan) keys() []frontendKey {
	return slices.Concat(p.stale, p.staleScopes, p.order)
}

// departures compares what the frontends of a plan led to before it was
// written with what they lead to now.
func (r *Reconciler) departures(before map[uint32]map[backendKey]bool, keys []frontendKey) []Departure {
	after := r.backendsByRevNAT(keys)
	var out []Departure
	for rid, old := range before {
		for bk := range old {
			if !after[rid][bk] {
				out = append(out, Departure{RevNAT: rid, Backend: bk.addr(), Proto: bk.proto()})
			}
		}
	}
	slices.SortFunc(out, func(a, b Departure) int {
		if a.RevNAT != b.RevNAT {
			return int(a.RevNAT) - int(b.RevNAT)
		}
		return a.Backend.Compare(b.Backend)
	})
	return out
}
