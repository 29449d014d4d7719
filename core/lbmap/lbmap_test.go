package lbmap

import (
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/datapath/dptest"
	"github.com/weirnet/weir/core/model"
)

// maps bundles a datapath's three LB maps, each wrapped so that after every
// single write the test checks what a packet could observe at that moment.
type maps struct {
	t                                                  *testing.T
	services, backends, backendAddrs, revnat, affinity *ebpf.Map
	writes                                             int
}

type checked struct {
	*ebpf.Map
	m *maps
}

// BatchUpdate writes one entry at a time, as the kernel does within a
// batch, checking the reader's view after each.
func (c checked) BatchUpdate(keys, vals any, _ *ebpf.BatchOptions) (int, error) {
	kv, vv := reflect.ValueOf(keys), reflect.ValueOf(vals)
	for i := range kv.Len() {
		if err := c.Map.Put(kv.Index(i).Interface(), vv.Index(i).Interface()); err != nil {
			return i, err
		}
		c.m.writes++
		c.m.checkReaderView()
	}
	return kv.Len(), nil
}

// BatchDelete deletes one entry at a time, stopping at the first missing
// one as the kernel does.
func (c checked) BatchDelete(keys any, _ *ebpf.BatchOptions) (int, error) {
	kv := reflect.ValueOf(keys)
	for i := range kv.Len() {
		if err := c.Map.Delete(kv.Index(i).Interface()); err != nil {
			return i, err
		}
		c.m.writes++
		c.m.checkReaderView()
	}
	return kv.Len(), nil
}

// checkReaderView asserts the invariant the datapath relies on: every
// master entry's slots 1..count exist and point at existing backends, and
// its reverse NAT entry exists.
func (m *maps) checkReaderView() {
	m.t.Helper()
	var k datapath.ServiceKey
	var v datapath.ServiceValue
	it := m.services.Iterate()
	for it.Next(&k, &v) {
		if k.Slot != 0 {
			continue
		}
		for s := uint16(1); s <= v.Count; s++ {
			sk := k
			sk.Slot = s
			var sv datapath.ServiceValue
			if err := m.services.Lookup(sk, &sv); err != nil {
				m.t.Fatalf("after write %d: master %v has count %d but slot %d is missing", m.writes, k, v.Count, s)
			}
			var be datapath.Backend
			if err := m.backends.Lookup(sv.BackendId, &be); err != nil {
				m.t.Fatalf("after write %d: slot %d of %v points at missing backend %d", m.writes, s, k, sv.BackendId)
			}
		}
		var rn datapath.RevNAT
		if err := m.revnat.Lookup(v.RevNat, &rn); err != nil {
			m.t.Fatalf("after write %d: master %v has reverse NAT %d, which is missing", m.writes, k, v.RevNat)
		}
		// In-cluster lookups follow the two-scopes flag to the internal
		// entry: it must be there whenever the flag is.
		if k.Scope == datapath.ScopeExternal && v.Flags2&datapath.SvcFlagTwoScopes != 0 {
			ik := k
			ik.Scope = datapath.ScopeInternal
			var iv datapath.ServiceValue
			if err := m.services.Lookup(ik, &iv); err != nil {
				m.t.Fatalf("after write %d: master %v says it has two scopes, but the internal entry is missing", m.writes, k)
			}
		}
	}
	if err := it.Err(); err != nil {
		m.t.Fatal(err)
	}
}

func newMaps(t *testing.T) *maps {
	dp := dptest.Open(t)
	return &maps{t: t, services: dp.Services(), backends: dp.Backends(), backendAddrs: dp.BackendAddrs(), revnat: dp.RevNAT(), affinity: dp.Affinity()}
}

func (m *maps) reconciler() *Reconciler {
	m.t.Helper()
	return New(Maps{Services: checked{m.services, m}, Backends: checked{m.backends, m}, BackendAddrs: checked{m.backendAddrs, m}, RevNAT: checked{m.revnat, m}, Affinity: m.affinity}, nil)
}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func svc(name, front string, proto model.Proto, backends ...string) *model.Service {
	f := model.Frontend{Addr: ap(front), Proto: proto, Type: model.ClusterIP}
	for _, b := range backends {
		st := model.Active
		if b[0] == '~' {
			st, b = model.Terminating, b[1:]
		}
		f.Backends = append(f.Backends, model.Backend{Addr: ap(b), State: st})
	}
	return &model.Service{Name: model.ServiceName{Namespace: "default", Name: name}, Frontends: []model.Frontend{f}}
}

func snap(svcs ...*model.Service) *model.Snapshot { return &model.Snapshot{Services: svcs} }

// view is what the maps say about one frontend.
type view struct {
	count    int
	revnat   uint32
	typ      uint8
	backends map[string]uint32 // "addr:port" -> id
	states   map[string]uint8
}

func (m *maps) frontend(front string, proto model.Proto) (view, bool) {
	m.t.Helper()
	a := ap(front)
	k := datapath.ServiceKey{Addr: datapath.AddrToBE(a.Addr()), Port: datapath.PortToBE(a.Port()), Proto: uint8(proto)}
	var v datapath.ServiceValue
	if err := m.services.Lookup(k, &v); errors.Is(err, ebpf.ErrKeyNotExist) {
		return view{}, false
	} else if err != nil {
		m.t.Fatal(err)
	}
	out := view{count: int(v.Count), revnat: v.RevNat, typ: v.Type, backends: map[string]uint32{}, states: map[string]uint8{}}
	for s := uint16(1); s <= v.Count; s++ {
		k.Slot = s
		var sv datapath.ServiceValue
		if err := m.services.Lookup(k, &sv); err != nil {
			m.t.Fatal(err)
		}
		var be datapath.Backend
		if err := m.backends.Lookup(sv.BackendId, &be); err != nil {
			m.t.Fatal(err)
		}
		key := netip.AddrPortFrom(datapath.AddrFromBE(be.Addr), datapath.PortFromBE(be.Port)).String()
		out.backends[key] = sv.BackendId
		out.states[key] = be.State
	}
	var rn datapath.RevNAT
	if err := m.revnat.Lookup(v.RevNat, &rn); err != nil {
		m.t.Fatalf("reverse NAT %d: %v", v.RevNat, err)
	}
	if got := netip.AddrPortFrom(datapath.AddrFromBE(rn.Addr), datapath.PortFromBE(rn.Port)); got != a {
		m.t.Fatalf("reverse NAT %d says %v, want %v", v.RevNat, got, a)
	}
	return out, true
}

func (m *maps) count(mp *ebpf.Map) int {
	m.t.Helper()
	n := 0
	it := mp.Iterate()
	var k, v []byte
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		m.t.Fatal(err)
	}
	return n
}

func apply(t *testing.T, r *Reconciler, s *model.Snapshot) {
	t.Helper()
	if err := r.ApplySnapshot(s); err != nil {
		t.Fatalf("apply: %v", err)
	}
}

func TestApplyWritesFrontendsBackendsAndRevNAT(t *testing.T) {
	m := newMaps(t)
	r := m.reconciler()
	apply(t, r, snap(
		svc("web", "10.96.0.10:80", model.TCP, "10.244.1.11:8080", "10.244.1.12:8080", "10.244.1.13:8080"),
		svc("dns", "10.96.0.53:53", model.UDP, "10.244.1.11:5353"),
	))
	web, ok := m.frontend("10.96.0.10:80", model.TCP)
	if !ok || web.count != 3 || len(web.backends) != 3 || web.typ != datapath.SvcClusterIP {
		t.Fatalf("web = %+v", web)
	}
	dns, ok := m.frontend("10.96.0.53:53", model.UDP)
	if !ok || dns.count != 1 || dns.backends["10.244.1.11:5353"] == 0 {
		t.Fatalf("dns = %+v", dns)
	}
	if web.revnat == dns.revnat {
		t.Fatalf("two frontends share reverse NAT id %d", web.revnat)
	}
	// Same address, other port: a distinct backend.
	if web.backends["10.244.1.11:8080"] == dns.backends["10.244.1.11:5353"] {
		t.Fatal("backends with different ports share an id")
	}
	if _, ok := m.frontend("10.96.0.10:80", model.UDP); ok {
		t.Fatal("UDP frontend exists for a TCP service")
	}
}

func TestScaleDownKeepsIDsAndRemovesSlot(t *testing.T) {
	m := newMaps(t)
	r := m.reconciler()
	apply(t, r, snap(svc("web", "10.96.0.10:80", model.TCP, "10.244.1.11:8080", "10.244.1.12:8080", "10.244.1.13:8080")))
	before, _ := m.frontend("10.96.0.10:80", model.TCP)
	apply(t, r, snap(svc("web", "10.96.0.10:80", model.TCP, "10.244.1.11:8080", "10.244.1.13:8080")))
	after, _ := m.frontend("10.96.0.10:80", model.TCP)
	if after.count != 2 || after.revnat != before.revnat {
		t.Fatalf("after scale-down: %+v (before %+v)", after, before)
	}
	for _, b := range []string{"10.244.1.11:8080", "10.244.1.13:8080"} {
		if after.backends[b] != before.backends[b] {
			t.Errorf("backend %s changed id %d -> %d", b, before.backends[b], after.backends[b])
		}
	}
	if _, ok := after.backends["10.244.1.12:8080"]; ok {
		t.Fatal("removed backend still in a slot")
	}
	// 1 master + 2 slots; the removed backend is gone from the backend map.
	if n := m.count(m.services); n != 3 {
		t.Fatalf("services map has %d entries, want 3", n)
	}
	if n := m.count(m.backends); n != 2 {
		t.Fatalf("backends map has %d entries, want 2", n)
	}
}

func TestRestartRestoresIDsWithoutRewriting(t *testing.T) {
	m := newMaps(t)
	s := snap(
		svc("web", "10.96.0.10:80", model.TCP, "10.244.1.11:8080", "10.244.1.12:8080"),
		svc("dns", "10.96.0.53:53", model.UDP, "10.244.1.11:5353"),
	)
	apply(t, m.reconciler(), s)
	web, _ := m.frontend("10.96.0.10:80", model.TCP)

	// A new agent: a fresh reconciler over the same pinned maps.
	r2 := m.reconciler()
	writes := m.writes
	apply(t, r2, s)
	if m.writes != writes {
		t.Fatalf("restored reconciler rewrote %d entries for an unchanged state", m.writes-writes)
	}
	// New objects get ids that do not collide with restored ones.
	s2 := snap(
		svc("web", "10.96.0.10:80", model.TCP, "10.244.1.11:8080", "10.244.1.12:8080", "10.244.1.14:8080"),
		svc("dns", "10.96.0.53:53", model.UDP, "10.244.1.11:5353"),
		svc("api", "10.96.0.20:443", model.TCP, "10.244.1.15:6443"),
	)
	apply(t, r2, s2)
	web2, _ := m.frontend("10.96.0.10:80", model.TCP)
	api, _ := m.frontend("10.96.0.20:443", model.TCP)
	if web2.revnat != web.revnat {
		t.Fatalf("web reverse NAT changed across restart: %d -> %d", web.revnat, web2.revnat)
	}
	for b, id := range web.backends {
		if web2.backends[b] != id {
			t.Errorf("backend %s id changed across restart: %d -> %d", b, id, web2.backends[b])
		}
	}
	if api.revnat == web.revnat {
		t.Fatal("new frontend reused a live reverse NAT id")
	}
	seen := map[uint32]string{}
	for _, v := range []view{web2, api} {
		for b, id := range v.backends {
			if other, ok := seen[id]; ok && other != b {
				t.Fatalf("backend id %d used by %s and %s", id, other, b)
			}
			seen[id] = b
		}
	}
}

func TestTerminatingBackends(t *testing.T) {
	m := newMaps(t)
	r := m.reconciler()
	// One active, one terminating: only the active one takes new flows,
	// but the terminating one stays in the backend map for its flows.
	apply(t, r, snap(svc("web", "10.96.0.10:80", model.TCP, "10.244.1.11:8080", "~10.244.1.12:8080")))
	v, _ := m.frontend("10.96.0.10:80", model.TCP)
	if v.count != 1 || v.backends["10.244.1.11:8080"] == 0 {
		t.Fatalf("with one active backend: %+v", v)
	}
	if n := m.count(m.backends); n != 2 {
		t.Fatalf("terminating backend left the backend map (%d entries)", n)
	}
	// Only terminating ones: they serve rather than nothing.
	apply(t, r, snap(svc("web", "10.96.0.10:80", model.TCP, "~10.244.1.12:8080")))
	v, _ = m.frontend("10.96.0.10:80", model.TCP)
	if v.count != 1 || v.states["10.244.1.12:8080"] != datapath.BackendTerminating {
		t.Fatalf("with only a terminating backend: %+v", v)
	}
}

func TestDeleteServiceRemovesEverything(t *testing.T) {
	m := newMaps(t)
	r := m.reconciler()
	apply(t, r, snap(
		svc("web", "10.96.0.10:80", model.TCP, "10.244.1.11:8080", "10.244.1.12:8080"),
		svc("dns", "10.96.0.53:53", model.UDP, "10.244.1.11:5353"),
	))
	apply(t, r, snap(svc("dns", "10.96.0.53:53", model.UDP, "10.244.1.11:5353")))
	if _, ok := m.frontend("10.96.0.10:80", model.TCP); ok {
		t.Fatal("deleted service still has a master entry")
	}
	if n := m.count(m.services); n != 2 {
		t.Fatalf("services map has %d entries, want 2 (dns master + slot)", n)
	}
	if n := m.count(m.backends); n != 1 {
		t.Fatalf("backends map has %d entries, want 1", n)
	}
	if n := m.count(m.revnat); n != 1 {
		t.Fatalf("reverse NAT map has %d entries, want 1", n)
	}
	apply(t, r, snap())
	for name, mp := range map[string]*ebpf.Map{"services": m.services, "backends": m.backends, "revnat": m.revnat} {
		if n := m.count(mp); n != 0 {
			t.Errorf("%s map has %d entries after deleting everything", name, n)
		}
	}
}

func TestServiceWithoutBackendsHasEmptyMaster(t *testing.T) {
	m := newMaps(t)
	r := m.reconciler()
	apply(t, r, snap(svc("empty", "10.96.0.30:80", model.TCP)))
	v, ok := m.frontend("10.96.0.30:80", model.TCP)
	if !ok || v.count != 0 {
		t.Fatalf("service without backends: %+v, present=%v", v, ok)
	}
}

// A write that fails part-way (a full map) must leave a state packets can
// use, and the next apply must converge once the request fits.
func TestFailedApplyRecovers(t *testing.T) {
	newMap := func(spec ebpf.MapSpec, max uint32) *ebpf.Map {
		spec.MaxEntries = max
		spec.Pinning = ebpf.PinNone
		mp, err := ebpf.NewMap(&spec)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { mp.Close() })
		return mp
	}
	dp := dptest.Open(t)
	info := func(mp *ebpf.Map) ebpf.MapSpec {
		i, err := mp.Info()
		if err != nil {
			t.Fatal(err)
		}
		return ebpf.MapSpec{Type: i.Type, KeySize: i.KeySize, ValueSize: i.ValueSize, Flags: i.Flags}
	}
	m := &maps{t: t,
		services:     newMap(info(dp.Services()), 6),
		backends:     newMap(info(dp.Backends()), 64),
		revnat:       newMap(info(dp.RevNAT()), 64),
		backendAddrs: dp.BackendAddrs(),
		affinity:     dp.Affinity(),
	}
	r := m.reconciler()
	apply(t, r, snap(svc("web", "10.96.0.10:80", model.TCP, "10.244.1.11:8080", "10.244.1.12:8080")))

	var big []string
	for i := range 8 {
		big = append(big, fmt.Sprintf("10.244.2.%d:8080", i+1))
	}
	err := r.ApplySnapshot(snap(svc("web", "10.96.0.10:80", model.TCP, "10.244.1.11:8080", "10.244.1.12:8080"),
		svc("big", "10.96.0.40:80", model.TCP, big...)))
	if err == nil {
		t.Fatal("apply into a full services map succeeded")
	}
	// web still serves as before.
	if v, ok := m.frontend("10.96.0.10:80", model.TCP); !ok || v.count != 2 {
		t.Fatalf("web after failed apply: %+v", v)
	}
	// A request that fits converges, including cleaning up what the failed
	// attempt left behind.
	apply(t, r, snap(svc("web", "10.96.0.10:80", model.TCP, "10.244.1.11:8080"),
		svc("small", "10.96.0.41:80", model.TCP, "10.244.2.1:8080")))
	if v, ok := m.frontend("10.96.0.41:80", model.TCP); !ok || v.count != 1 {
		t.Fatalf("small after recovery: %+v", v)
	}
	if _, ok := m.frontend("10.96.0.40:80", model.TCP); ok {
		t.Fatal("frontend of the failed apply survived")
	}
	if n := m.count(m.services); n != 4 {
		t.Fatalf("services map has %d entries, want 4", n)
	}
	if n := m.count(m.backends); n != 2 {
		t.Fatalf("backends map has %d entries, want 2", n)
	}
}

// Affinity entries that point where the frontend no longer goes (a backend
// that left it, or a deleted frontend) are removed; others stay.
func TestAffinityIsPrunedWithBackends(t *testing.T) {
	m := newMaps(t)
	r := m.reconciler()
	web := svc("web", "10.96.0.10:80", model.TCP, "10.244.1.11:8080", "10.244.1.12:8080")
	web.AffinityTimeout = 10800
	dns := svc("dns", "10.96.0.53:53", model.UDP, "10.244.1.11:5353")
	dns.AffinityTimeout = 60
	apply(t, r, snap(web, dns))
	v, _ := m.frontend("10.96.0.10:80", model.TCP)
	d, _ := m.frontend("10.96.0.53:53", model.UDP)
	put := func(client string, revnat uint32, backend uint32) datapath.AffinityKey {
		k := datapath.AffinityKey{Client: datapath.AddrToBE(netip.MustParseAddr(client)), RevNat: revnat}
		if err := m.affinity.Put(k, datapath.Affinity{BackendId: backend, LastUsed: 1}); err != nil {
			t.Fatal(err)
		}
		return k
	}
	on11 := put("10.244.1.50", v.revnat, v.backends["10.244.1.11:8080"])
	on12 := put("10.244.1.51", v.revnat, v.backends["10.244.1.12:8080"])
	onDNS := put("10.244.1.50", d.revnat, d.backends["10.244.1.11:5353"])

	// 10.244.1.12 leaves web: only the entry pointing at it goes.
	web2 := svc("web", "10.96.0.10:80", model.TCP, "10.244.1.11:8080")
	web2.AffinityTimeout = 10800
	apply(t, r, snap(web2, dns))
	var a datapath.Affinity
	if err := m.affinity.Lookup(on12, &a); err == nil {
		t.Fatal("affinity to a backend that left the frontend survived")
	}
	for _, k := range []datapath.AffinityKey{on11, onDNS} {
		if err := m.affinity.Lookup(k, &a); err != nil {
			t.Fatalf("affinity entry %+v of a live backend was removed: %v", k, err)
		}
	}
	if m.frontendMaster("10.96.0.10:80", model.TCP).AffinityTimeout != 10800 {
		t.Fatal("master lost its affinity timeout")
	}
	// dns is deleted: its entries go.
	apply(t, r, snap(web2))
	if err := m.affinity.Lookup(onDNS, &a); err == nil {
		t.Fatal("affinity of a deleted frontend survived")
	}
	if err := m.affinity.Lookup(on11, &a); err != nil {
		t.Fatalf("unrelated affinity removed: %v", err)
	}
}

func (m *maps) frontendMaster(front string, proto model.Proto) datapath.ServiceValue {
	m.t.Helper()
	a := ap(front)
	var v datapath.ServiceValue
	if err := m.services.Lookup(datapath.ServiceKey{Addr: datapath.AddrToBE(a.Addr()), Port: datapath.PortToBE(a.Port()), Proto: uint8(proto)}, &v); err != nil {
		m.t.Fatal(err)
	}
	return v
}

// Traffic policies decide the backends per node: internalTrafficPolicy
// Local keeps a ClusterIP on the node's own backends; externalTrafficPolicy
// Local gives an external frontend the node's own backends for outside
// traffic (flagged) and every backend for in-cluster clients.
func TestTrafficPolicyScopes(t *testing.T) {
	m := newMaps(t)
	r := m.reconciler()
	r.SetNode("n1")
	backends := []model.Backend{
		{Addr: ap("10.244.1.11:8080"), NodeName: "n1"},
		{Addr: ap("10.244.2.11:8080"), NodeName: "n2"},
		{Addr: ap("10.244.2.12:8080"), NodeName: "n2"},
	}
	cluster := &model.Service{Name: model.ServiceName{Namespace: "default", Name: "web"}, Frontends: []model.Frontend{
		{Addr: ap("10.96.0.10:80"), Proto: model.TCP, Type: model.ClusterIP, Backends: backends, InternalLocal: true},
		{Addr: ap("192.0.2.10:80"), Proto: model.TCP, Type: model.ExternalIP, Backends: backends, ExternalLocal: true},
		{Addr: ap("192.0.2.11:80"), Proto: model.TCP, Type: model.LoadBalancer, Backends: backends},
	}}
	apply(t, r, snap(cluster))

	v, _ := m.frontend("10.96.0.10:80", model.TCP)
	if v.count != 1 || v.backends["10.244.1.11:8080"] == 0 {
		t.Fatalf("ClusterIP with internalTrafficPolicy Local: %+v", v)
	}
	ext := m.frontendMaster("192.0.2.10:80", model.TCP)
	if ext.Count != 1 || ext.Flags2&datapath.SvcFlagTwoScopes == 0 {
		t.Fatalf("external scope of an externalTrafficPolicy Local frontend: %+v", ext)
	}
	var in datapath.ServiceValue
	a := ap("192.0.2.10:80")
	if err := m.services.Lookup(datapath.ServiceKey{Addr: datapath.AddrToBE(a.Addr()), Port: datapath.PortToBE(80), Proto: 6, Scope: datapath.ScopeInternal}, &in); err != nil || in.Count != 3 {
		t.Fatalf("internal scope: %+v %v", in, err)
	}
	if lb := m.frontendMaster("192.0.2.11:80", model.TCP); lb.Count != 3 || lb.Flags2&datapath.SvcFlagTwoScopes != 0 {
		t.Fatalf("Cluster policy frontend: %+v", lb)
	}

	// The node's own backend goes: the Local ClusterIP has none (traffic
	// is dropped, as kube-proxy does), the remote ones stay elsewhere.
	cluster.Frontends[0].Backends = backends[1:]
	cluster.Frontends[1].Backends = backends[1:]
	apply(t, r, snap(cluster))
	if v, _ := m.frontend("10.96.0.10:80", model.TCP); v.count != 0 {
		t.Fatalf("Local ClusterIP without local backends: %+v", v)
	}
	if ext := m.frontendMaster("192.0.2.10:80", model.TCP); ext.Count != 0 || ext.Flags2&datapath.SvcFlagTwoScopes == 0 {
		t.Fatalf("external scope without local backends: %+v", ext)
	}
}

// Moving a frontend between one scope and two (a backend of the node
// appears or goes under externalTrafficPolicy Local) is make-before-break
// too: the internal entry exists before the flag that sends in-cluster
// lookups to it, and the flag goes before the entry. The reader view is
// checked after every single write.
func TestScopeChangesAreMakeBeforeBreak(t *testing.T) {
	m := newMaps(t)
	r := m.reconciler()
	r.SetNode("n1")
	local := model.Backend{Addr: ap("10.244.1.11:8080"), NodeName: "n1"}
	remote := []model.Backend{{Addr: ap("10.244.2.11:8080"), NodeName: "n2"}, {Addr: ap("10.244.2.12:8080"), NodeName: "n2"}}
	svc := func(bes ...model.Backend) *model.Service {
		return &model.Service{Name: model.ServiceName{Namespace: "default", Name: "web"}, Frontends: []model.Frontend{
			{Addr: ap("192.0.2.10:80"), Proto: model.TCP, Type: model.LoadBalancer, Backends: bes, ExternalLocal: true},
		}}
	}
	internal := func() bool {
		a := ap("192.0.2.10:80")
		var v datapath.ServiceValue
		return m.services.Lookup(datapath.ServiceKey{Addr: datapath.AddrToBE(a.Addr()), Port: datapath.PortToBE(80), Proto: 6, Scope: datapath.ScopeInternal}, &v) == nil
	}
	// All backends local: one scope.
	apply(t, r, snap(svc(local)))
	if internal() || m.frontendMaster("192.0.2.10:80", model.TCP).Flags2&datapath.SvcFlagTwoScopes != 0 {
		t.Fatal("one scope expected while every backend is local")
	}
	for round := range 3 {
		apply(t, r, snap(svc(append([]model.Backend{local}, remote...)...)))
		if !internal() || m.frontendMaster("192.0.2.10:80", model.TCP).Flags2&datapath.SvcFlagTwoScopes == 0 {
			t.Fatalf("round %d: two scopes expected with remote backends", round)
		}
		// One frontend to its flows: both scopes share the reverse NAT id.
		a := ap("192.0.2.10:80")
		var iv datapath.ServiceValue
		if err := m.services.Lookup(datapath.ServiceKey{Addr: datapath.AddrToBE(a.Addr()), Port: datapath.PortToBE(80), Proto: 6, Scope: datapath.ScopeInternal}, &iv); err != nil ||
			iv.RevNat != m.frontendMaster("192.0.2.10:80", model.TCP).RevNat {
			t.Fatalf("round %d: internal scope has reverse NAT %d, external %d", round, iv.RevNat, m.frontendMaster("192.0.2.10:80", model.TCP).RevNat)
		}
		apply(t, r, snap(svc(local)))
		if internal() || m.frontendMaster("192.0.2.10:80", model.TCP).Flags2&datapath.SvcFlagTwoScopes != 0 {
			t.Fatalf("round %d: back to one scope expected", round)
		}
	}
}

// The master entry tells operators why its slots are what they are;
// model.Selection and the datapath's enum must agree on the numbers.
func TestSelectionNumbersMatchTheDatapath(t *testing.T) {
	for sel, dp := range map[model.Selection]uint32{
		model.SelectAll: datapath.SelectAll, model.SelectLocal: datapath.SelectLocal,
		model.SelectZone: datapath.SelectZone, model.SelectNode: datapath.SelectNode,
	} {
		if uint32(sel) != dp || sel.String() != datapath.SelectionName(dp) {
			t.Errorf("model %d (%s) vs datapath %d (%s)", sel, sel, dp, datapath.SelectionName(dp))
		}
	}
}

// Topology hints follow the node's zone: a full delta in a new zone
// rewrites the slots to that zone's backends, while every backend stays
// in the backend map for its flows. An externalTrafficPolicy Local
// frontend whose backends are all on the node still splits in two when
// hints send in-cluster clients elsewhere, and admission counted room for
// that in any zone.
func TestZoneHintsFollowTheZone(t *testing.T) {
	m := newMaps(t)
	r := m.reconciler()
	r.SetNode("n1")
	hinted := func(a, node, zone string) model.Backend {
		return model.Backend{Addr: ap(a), NodeName: node, Hints: &model.Hints{Zones: []string{zone}}}
	}
	web := &model.Service{Name: model.ServiceName{Namespace: "default", Name: "web"}, Frontends: []model.Frontend{
		{Addr: ap("10.96.0.10:80"), Proto: model.TCP, Type: model.ClusterIP, Backends: []model.Backend{
			hinted("10.244.1.11:8080", "n1", "zone-a"), hinted("10.244.2.11:8080", "n2", "zone-b"), hinted("10.244.2.12:8080", "n2", "zone-b")}},
		{Addr: ap("192.0.2.10:80"), Proto: model.TCP, Type: model.LoadBalancer, ExternalLocal: true, Backends: []model.Backend{
			hinted("10.244.1.21:8080", "n1", "zone-a"), hinted("10.244.1.22:8080", "n1", "zone-b")}},
	}}
	full := func(zone string) {
		t.Helper()
		if err := r.Apply(model.Delta{Full: true, Zone: zone, Services: map[model.ServiceName]*model.Service{web.Name: web}}); err != nil {
			t.Fatal(err)
		}
	}
	slots := func(front string, scope uint8) (string, uint32) {
		t.Helper()
		a := ap(front)
		k := datapath.ServiceKey{Addr: datapath.AddrToBE(a.Addr()), Port: datapath.PortToBE(a.Port()), Proto: 6, Scope: scope}
		var master datapath.ServiceValue
		if err := m.services.Lookup(k, &master); err != nil {
			return "absent", 0
		}
		var out []string
		for s := uint16(1); s <= master.Count; s++ {
			k.Slot = s
			var v datapath.ServiceValue
			var be datapath.Backend
			if err := m.services.Lookup(k, &v); err != nil {
				t.Fatal(err)
			}
			if err := m.backends.Lookup(v.BackendId, &be); err != nil {
				t.Fatal(err)
			}
			out = append(out, netip.AddrPortFrom(datapath.AddrFromBE(be.Addr), datapath.PortFromBE(be.Port)).String())
		}
		return fmt.Sprint(out), master.BackendId
	}
	check := func(front string, scope uint8, want string, why uint32) {
		t.Helper()
		if got, sel := slots(front, scope); got != want || sel != why {
			t.Errorf("%s scope %d: %s (%s), want %s (%s)", front, scope, got, datapath.SelectionName(sel), want, datapath.SelectionName(why))
		}
	}
	full("zone-a")
	check("10.96.0.10:80", datapath.ScopeExternal, "[10.244.1.11:8080]", datapath.SelectZone)
	check("192.0.2.10:80", datapath.ScopeExternal, "[10.244.1.21:8080 10.244.1.22:8080]", datapath.SelectLocal)
	check("192.0.2.10:80", datapath.ScopeInternal, "[10.244.1.21:8080]", datapath.SelectZone)
	if n := m.count(m.backends); n != 5 {
		t.Errorf("%d backends in the map, want all 5 (flows to any of them go on)", n)
	}

	full("zone-b")
	check("10.96.0.10:80", datapath.ScopeExternal, "[10.244.2.11:8080 10.244.2.12:8080]", datapath.SelectZone)
	check("192.0.2.10:80", datapath.ScopeInternal, "[10.244.1.22:8080]", datapath.SelectZone)

	// A zone without hinted backends: every ready backend, one entry for
	// the Local frontend again.
	full("zone-c")
	check("10.96.0.10:80", datapath.ScopeExternal, "[10.244.1.11:8080 10.244.2.11:8080 10.244.2.12:8080]", datapath.SelectAll)
	check("192.0.2.10:80", datapath.ScopeExternal, "[10.244.1.21:8080 10.244.1.22:8080]", datapath.SelectLocal)
	check("192.0.2.10:80", datapath.ScopeInternal, "absent", 0)

	// Admission counts the split whatever the zone: the ClusterIP's
	// master and 3 slots, the Local frontend's two entries of 1+2.
	a := NewAdmission("n1", Limits{Services: 9, Backends: 10, RevNAT: 10})
	if _, err := a.Admit([]model.Change{{New: web}}); err == nil || !strings.Contains(err.Error(), "would need 10 entries") {
		t.Fatalf("admission of 10 entries into 9: %v", err)
	}
}
