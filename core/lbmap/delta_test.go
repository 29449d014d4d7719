package lbmap

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/model"
)

// dump is what the maps say, without ids: every frontend with its master
// fields, reverse NAT address and backends in slot order with their
// states, the backend index, and the number of entries of each map (so
// nothing is left over).
func (m *maps) dump() string {
	m.t.Helper()
	bes := map[uint32]datapath.Backend{}
	if err := datapath.ReadAll(m.backends, func(id *uint32, be *datapath.Backend) { bes[*id] = *be }); err != nil {
		m.t.Fatal(err)
	}
	rev := map[uint32]netip.AddrPort{}
	if err := datapath.ReadAll(m.revnat, func(id *uint32, rn *datapath.RevNAT) {
		rev[*id] = netip.AddrPortFrom(datapath.AddrFromBE(rn.Addr), datapath.PortFromBE(rn.Port))
	}); err != nil {
		m.t.Fatal(err)
	}
	type entry struct {
		k datapath.ServiceKey
		v datapath.ServiceValue
	}
	var entries []entry
	if err := datapath.ReadAll(m.services, func(k *datapath.ServiceKey, v *datapath.ServiceValue) { entries = append(entries, entry{*k, *v}) }); err != nil {
		m.t.Fatal(err)
	}
	slot := map[datapath.ServiceKey]datapath.ServiceValue{}
	for _, e := range entries {
		slot[e.k] = e.v
	}
	beStr := func(id uint32) string {
		be, ok := bes[id]
		if !ok {
			return fmt.Sprintf("missing-%d", id)
		}
		return fmt.Sprintf("%s/%d", netip.AddrPortFrom(datapath.AddrFromBE(be.Addr), datapath.PortFromBE(be.Port)), be.State)
	}
	var lines []string
	for _, e := range entries {
		if e.k.Slot != 0 {
			continue
		}
		l := fmt.Sprintf("%s:%d/%d/%d type=%d flags2=%d aff=%d rev=%s:", datapath.AddrFromBE(e.k.Addr), datapath.PortFromBE(e.k.Port), e.k.Proto, e.k.Scope,
			e.v.Type, e.v.Flags2, e.v.AffinityTimeout, rev[e.v.RevNat])
		for s := uint16(1); s <= e.v.Count; s++ {
			k := e.k
			k.Slot = s
			l += " " + beStr(slot[k].BackendId)
		}
		lines = append(lines, l)
	}
	var idx []string
	if err := datapath.ReadAll(m.backendAddrs, func(k *datapath.BackendAddrKey, id *uint32) {
		idx = append(idx, fmt.Sprintf("%s:%d/%d", datapath.AddrFromBE(k.Addr), datapath.PortFromBE(k.Port), k.Proto))
	}); err != nil {
		m.t.Fatal(err)
	}
	slices.Sort(lines)
	slices.Sort(idx)
	return fmt.Sprintf("%s\nindex: %s\nentries: services %d, backends %d, reverse NAT %d\n",
		strings.Join(lines, "\n"), strings.Join(idx, " "), len(entries), len(bes), len(rev))
}

// randomService is one of a small universe of services, each with its own
// cluster IP and external IP, so frontends stay unique; policies,
// protocols, affinity, terminating and node-local backends vary.
func randomService(rng *rand.Rand, i int) *model.Service {
	svc := &model.Service{Name: model.ServiceName{Namespace: "default", Name: fmt.Sprintf("s%d", i)}}
	if rng.IntN(4) == 0 {
		svc.AffinityTimeout = 60
	}
	// Backends come from a shared pool, so services share some.
	var bes []model.Backend
	for range rng.IntN(5) {
		b := model.Backend{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 244, byte(1 + rng.IntN(2)), byte(1 + rng.IntN(12))}), 8080), NodeName: fmt.Sprintf("n%d", 1+rng.IntN(2))}
		if rng.IntN(5) == 0 {
			b.State = model.Terminating
		}
		if !slices.ContainsFunc(bes, func(o model.Backend) bool { return o.Addr == b.Addr }) {
			bes = append(bes, b)
		}
	}
	proto := model.TCP
	if rng.IntN(3) == 0 {
		proto = model.UDP
	}
	for p := range 1 + rng.IntN(2) {
		port := uint16(80 + p)
		svc.Frontends = append(svc.Frontends, model.Frontend{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 96, 0, byte(i)}), port),
			Proto: proto, Type: model.ClusterIP, Backends: bes, InternalLocal: rng.IntN(4) == 0})
		if rng.IntN(2) == 0 {
			svc.Frontends = append(svc.Frontends, model.Frontend{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}), port),
				Proto: proto, Type: model.LoadBalancer, Backends: bes, ExternalLocal: rng.IntN(2) == 0})
		}
	}
	return svc
}

// Deltas leave the maps exactly as a full pass of the same state on empty
// maps would, and every single write on the way keeps the reader's view
// consistent (checked maps).
func TestDeltasMatchAFullPass(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	m := newMaps(t)
	r := m.reconciler()
	r.SetNode("n1")
	state := map[model.ServiceName]*model.Service{}
	if err := r.Apply(model.Delta{Full: true, Services: map[model.ServiceName]*model.Service{}}); err != nil {
		t.Fatal(err)
	}
	for step := range 150 {
		d := model.Delta{Services: map[model.ServiceName]*model.Service{}}
		for range 1 + rng.IntN(6) {
			i := 1 + rng.IntN(20)
			var svc *model.Service
			if rng.IntN(4) != 0 {
				svc = randomService(rng, i)
			}
			d.Services[model.ServiceName{Namespace: "default", Name: fmt.Sprintf("s%d", i)}] = svc
		}
		for name, svc := range d.Services {
			if svc == nil {
				delete(state, name)
			} else {
				state[name] = svc
			}
		}
		if err := r.Apply(d); err != nil {
			t.Fatalf("step %d: %v", step, err)
		}
		if step%10 != 9 {
			continue
		}
		// The same state, in one full pass on fresh maps.
		fresh := newMaps(t)
		fr := fresh.reconciler()
		fr.SetNode("n1")
		var all []*model.Service
		for _, svc := range state {
			all = append(all, svc)
		}
		if err := fr.ApplySnapshot(snap(all...)); err != nil {
			t.Fatal(err)
		}
		if got, want := m.dump(), fresh.dump(); got != want {
			t.Fatalf("step %d: after deltas the maps hold\n%s\nbut a full pass writes\n%s", step, got, want)
		}
		// The reconciler's count agrees with the map.
		if n := m.count(m.services); r.serviceEntries != n {
			t.Fatalf("step %d: reconciler counts %d services entries, the map has %d", step, r.serviceEntries, n)
		}
	}
}

// A delta that needs more room at once than the map has, though its end
// state fits, is written one service at a time, shrinking ones first.
func TestBigDeltaGoesInSteps(t *testing.T) {
	m := newMaps(t)
	small, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 12, ValueSize: 16, MaxEntries: 13, Flags: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { small.Close() })
	m.services = small
	r := m.reconciler()
	six := func(prefix string) []string {
		var out []string
		for i := range 5 {
			out = append(out, fmt.Sprintf("%s.%d:8080", prefix, i+1))
		}
		return out
	}
	// a: 1+5, b: 1+1, c: 1+1 = 10 of 13.
	a := svc("a", "10.96.0.1:80", model.TCP, six("10.244.1")...)
	b := svc("b", "10.96.0.2:80", model.TCP, "10.244.2.1:8080")
	c := svc("c", "10.96.0.3:80", model.TCP, "10.244.3.1:8080")
	apply(t, r, snap(a, b, c))
	// a shrinks to 1+1 while b grows to 1+5: 10 at the end, but 14 at
	// once (b's new slots are written before a's leftovers go).
	a2 := svc("a", "10.96.0.1:80", model.TCP, "10.244.1.1:8080")
	b2 := svc("b", "10.96.0.2:80", model.TCP, six("10.244.2")...)
	if err := r.Apply(model.Delta{Version: 7, Services: map[model.ServiceName]*model.Service{a.Name: a2, b.Name: b2}}); err != nil {
		t.Fatalf("delta that fits one service at a time: %v", err)
	}
	if v, _ := m.frontend("10.96.0.2:80", model.TCP); v.count != 5 {
		t.Fatalf("b has %d backends, want 5", v.count)
	}
	if n := m.count(m.services); n != 10 {
		t.Fatalf("services map holds %d entries, want 10", n)
	}
	// A single service that cannot fit is refused before any write, with
	// what it needs and the setting to raise.
	var big []string
	for i := range 12 {
		big = append(big, fmt.Sprintf("10.244.9.%d:8080", i+1))
	}
	err = r.Apply(model.Delta{Services: map[model.ServiceName]*model.Service{c.Name: svc("c", "10.96.0.3:80", model.TCP, big...)}})
	var ce *CapacityError
	if !errors.As(err, &ce) || err.Error() != "weir_services would need 21 entries, more than the 13 it holds: raise datapath.servicesMaxEntries" {
		t.Fatalf("oversized service: %v", err)
	}
	if v, _ := m.frontend("10.96.0.3:80", model.TCP); v.count != 1 {
		t.Fatalf("c after the refusal: %+v, want its previous backend", v)
	}
	// Not dirty: the next delta is applied as one.
	if err := r.Apply(model.Delta{Services: map[model.ServiceName]*model.Service{c.Name: nil}}); err != nil {
		t.Fatalf("delta after a refusal: %v", err)
	}
	if st := r.Status(); st.Maps[0].Name != datapath.MapServices || st.Maps[0].Entries != 8 || st.Maps[0].MaxEntries != 13 {
		t.Fatalf("status maps %+v; want weir_services 8 of 13", st.Maps)
	}
}

// The store's admission counts what the services need on this node and
// refuses an update that would not fit, naming the map, the need and the
// setting; removals always pass.
func TestAdmission(t *testing.T) {
	a := NewAdmission("n1", Limits{Services: 20, Backends: 4, RevNAT: 3})
	ch := func(old, nw *model.Service) model.Change { return model.Change{Old: old, New: nw} }
	admit := func(cs ...model.Change) error {
		commit, err := a.Admit(cs)
		if err == nil {
			commit()
		}
		return err
	}
	web := svc("web", "10.96.0.1:80", model.TCP, "10.244.1.1:8080", "10.244.1.2:8080")
	if err := admit(ch(nil, web)); err != nil { // 3 entries, 2 backends
		t.Fatal(err)
	}
	// Three more backends (one shared) break the limit of 4.
	db := svc("db", "10.96.0.2:80", model.TCP, "10.244.1.1:8080", "10.244.2.1:8080", "10.244.2.2:8080", "10.244.2.3:8080")
	err := admit(ch(nil, db))
	if err == nil || err.Error() != "weir_backends would need 5 entries, more than the 4 it holds: raise datapath.backendsMaxEntries" {
		t.Fatalf("admit db: %v", err)
	}
	// Refused updates count nothing: a fitting one still passes, and
	// fills the map.
	db = svc("db", "10.96.0.2:80", model.TCP, "10.244.1.1:8080", "10.244.2.1:8080", "10.244.2.2:8080")
	if err := admit(ch(nil, db)); err != nil {
		t.Fatalf("admit db with room for it: %v", err)
	}
	// Swapping one of web's backends for another ends at 4 backends, but
	// the new one is written before the old one goes.
	web2 := svc("web", "10.96.0.1:80", model.TCP, "10.244.1.1:8080", "10.244.3.1:8080")
	err = admit(ch(web, web2))
	if err == nil || err.Error() != "weir_backends would need 5 entries (1 of them room to rewrite a service make-before-break), more than the 4 it holds: raise datapath.backendsMaxEntries" {
		t.Fatalf("swap web's backends in a full map: %v", err)
	}
	small := db
	// Removing always passes, even over a limit.
	if err := admit(ch(web, nil), ch(small, nil)); err != nil {
		t.Fatalf("removal refused: %v", err)
	}
	if a.services != 0 || a.revnat != 0 || len(a.backends) != 0 {
		t.Fatalf("after removing everything the admission still counts %d entries, %d ids, %d backends", a.services, a.revnat, len(a.backends))
	}
	// Reverse NAT: one id per frontend address, both scopes sharing it.
	three := &model.Service{Name: model.ServiceName{Namespace: "default", Name: "three"}}
	for i := range 4 {
		three.Frontends = append(three.Frontends, model.Frontend{Addr: netip.AddrPortFrom(netip.MustParseAddr("10.96.0.9"), uint16(80+i)), Proto: model.TCP, Type: model.ClusterIP})
	}
	if err := admit(ch(nil, three)); err == nil || !strings.Contains(err.Error(), "weir_revnat would need 4 entries") {
		t.Fatalf("four frontends with room for three ids: %v", err)
	}
}
