package ctgc

import (
	"errors"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/datapath/dptest"
)

// flow writes the two entries of a flow client:port -> 10.0.0.2:80 with
// the given lifetimes (relative to now) and returns their keys.
func flow(t *testing.T, m *ebpf.Map, now int64, port uint16, orig, reply int64) (datapath.CTKey, datapath.CTKey) {
	t.Helper()
	c, s := uint32(0x0a000001), uint32(0x0a000002)
	ok := datapath.CTKey{Saddr: c, Daddr: s, Sport: port, Dport: 80, Proto: 6}
	rk := datapath.CTKey{Saddr: s, Daddr: c, Sport: 80, Dport: port, Proto: 6}
	if orig != 0 {
		if err := m.Put(ok, datapath.CTEntry{Dir: datapath.CTOrig, Lifetime: uint32(now + orig), NatSaddr: c, NatDaddr: s, NatSport: port, NatDport: 80}); err != nil {
			t.Fatal(err)
		}
	}
	if reply != 0 {
		if err := m.Put(rk, datapath.CTEntry{Dir: datapath.CTReply, Lifetime: uint32(now + reply), NatSaddr: s, NatDaddr: c, NatSport: 80, NatDport: port}); err != nil {
			t.Fatal(err)
		}
	}
	return ok, rk
}

func present(t *testing.T, m *ebpf.Map, k datapath.CTKey) bool {
	t.Helper()
	var v datapath.CTEntry
	err := m.Lookup(k, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return false
	}
	if err != nil {
		t.Fatal(err)
	}
	return true
}

// A pass removes expired flows and orphans and nothing of a live flow:
// not an entry that expired a moment before its twin was refreshed.
func TestPassRemovesOnlyWhatNoLiveFlowHolds(t *testing.T) {
	dp := dptest.Open(t)
	m := dp.CT()
	now, err := datapath.BootSeconds()
	if err != nil {
		t.Fatal(err)
	}
	type want struct{ orig, reply bool }
	cases := []struct {
		name        string
		orig, reply int64 // lifetime relative to now; 0: absent
		want        want
	}{
		{"live", 100, 100, want{true, true}},
		{"both expired", -5, -5, want{false, false}},
		{"orig expired, reply live", -1, 60, want{true, true}},
		{"reply expired, orig live", 60, -1, want{true, true}},
		{"expired orphan orig", -5, 0, want{false, false}},
		{"expired orphan reply", 0, -5, want{false, false}},
		{"live orphan", 30, 0, want{true, false}},
	}
	keys := make([][2]datapath.CTKey, len(cases))
	for i, c := range cases {
		o, r := flow(t, m, now, uint16(1000+i), c.orig, c.reply)
		keys[i] = [2]datapath.CTKey{o, r}
	}
	// A DSR flow on the node that received it has only its ORIG entry:
	// kept while it lives, collected once it expired.
	dsr := func(port uint16, lifetime int64) datapath.CTKey {
		k := datapath.CTKey{Saddr: 0x0a000001, Daddr: 0x0a000003, Sport: port, Dport: 80, Proto: 6}
		v := datapath.CTEntry{Dir: datapath.CTOrig, Lifetime: uint32(now + lifetime), Flags: datapath.CTFlagNodePort | datapath.CTFlagDSR,
			NatSaddr: 0x0a000001, NatDaddr: 0x0a000009, NatSport: port, NatDport: 8080}
		if err := m.Put(k, v); err != nil {
			t.Fatal(err)
		}
		return k
	}
	dsrLive, dsrOver := dsr(3000, 300), dsr(3001, -3)
	g := New(Options{Map: dp.CT, Interval: time.Minute})
	st, err := g.Pass()
	if err != nil {
		t.Fatal(err)
	}
	for i, c := range cases {
		if got := (want{present(t, m, keys[i][0]), present(t, m, keys[i][1])}); got != c.want {
			t.Errorf("%s: entries present %+v, want %+v", c.name, got, c.want)
		}
	}
	if !present(t, m, dsrLive) || present(t, m, dsrOver) {
		t.Errorf("DSR entries without a twin: live one present %v, expired one present %v; want true, false",
			present(t, m, dsrLive), present(t, m, dsrOver))
	}
	if st.Deleted != 5 || st.Entries != 8 || st.MaxEntries != 4096 || st.Passes != 1 {
		t.Errorf("stats %+v, want 5 deleted, 8 left of 4096", st)
	}
}

// The interval shortens while passes find much to collect, lengthens while
// they find little, and drops to the minimum under pressure.
func TestIntervalAdapts(t *testing.T) {
	g := New(Options{Map: func() *ebpf.Map { return nil }, Interval: time.Minute, MinInterval: 10 * time.Second, MaxInterval: 10 * time.Minute})
	if d := g.adapt(100, 50, false); d != 30*time.Second {
		t.Fatalf("half collected: next in %v, want 30s", d)
	}
	if d := g.adapt(100, 90, false); d != 10*time.Second {
		t.Fatalf("90%% collected: next in %v, want the 10s floor", d)
	}
	for range 20 {
		g.adapt(100, 0, false)
	}
	if d := g.adapt(100, 1, false); d != 10*time.Minute {
		t.Fatalf("nothing collected for long: next in %v, want the 10m cap", d)
	}
	if d := g.adapt(100, 10, false); d != 10*time.Minute {
		t.Fatalf("10%% collected: next in %v, want it kept", d)
	}
	if d := g.adapt(100, 0, true); d != 10*time.Second {
		t.Fatalf("under pressure: next in %v, want 10s", d)
	}
}

// A nearly full map is reported as under pressure.
func TestPressure(t *testing.T) {
	dp := dptest.Open(t)
	now, _ := datapath.BootSeconds()
	for i := range 1700 { // 3400 of 4096 entries: 83%
		flow(t, dp.CT(), now, uint16(2000+i), 600, 600)
	}
	st, err := New(Options{Map: dp.CT}).Pass()
	if err != nil {
		t.Fatal(err)
	}
	if !st.Pressure || st.Deleted != 0 || st.Next != DefaultMinInterval {
		t.Fatalf("stats %+v: want pressure, nothing deleted, next pass at the minimum", st)
	}
}

// natFlow writes the two NAT entries of a flow client:port -> 10.0.0.9:8080
// translated to 10.0.0.100:natPort, made age seconds ago; out and in say
// which halves exist.
func natFlow(t *testing.T, m *ebpf.Map, now int64, port, natPort uint16, age int64, out, in bool) (datapath.NATKey, datapath.NATKey) {
	t.Helper()
	c, b, node := uint32(0x0a000001), uint32(0x0a000009), uint32(0x0a000064)
	ok := datapath.NATKey{Saddr: c, Daddr: b, Sport: port, Dport: 8080, Proto: 6, Dir: datapath.NATOut}
	ik := datapath.NATKey{Saddr: b, Daddr: node, Sport: 8080, Dport: natPort, Proto: 6, Dir: datapath.NATIn}
	created := uint32(now - age)
	if out {
		if err := m.Put(ok, datapath.NATEntry{Addr: node, Port: natPort, Owner: datapath.NATNodePort, Created: created}); err != nil {
			t.Fatal(err)
		}
	}
	if in {
		if err := m.Put(ik, datapath.NATEntry{Addr: c, Port: port, Owner: datapath.NATNodePort, Created: created}); err != nil {
			t.Fatal(err)
		}
	}
	return ok, ik
}

func natPresent(t *testing.T, m *ebpf.Map, k datapath.NATKey) bool {
	t.Helper()
	var v datapath.NATEntry
	err := m.Lookup(k, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return false
	}
	if err != nil {
		t.Fatal(err)
	}
	return true
}

// A pass deletes the NAT flows whose conntrack entry is gone or expired
// (both halves), and halves left without their pair; a flow with a live
// conntrack entry, and one younger than its conntrack entry may be, stay.
func TestPassCollectsOrphanNATEntries(t *testing.T) {
	dp := dptest.Open(t)
	now, err := datapath.BootSeconds()
	if err != nil {
		t.Fatal(err)
	}
	ct, nat := dp.CT(), dp.NAT()
	// The conntrack entry a NAT flow belongs to is keyed by the reverse of
	// its OUT tuple: the backend's reply to the client.
	reply := func(port uint16, lifetime int64) {
		k := datapath.CTKey{Saddr: 0x0a000009, Daddr: 0x0a000001, Sport: 8080, Dport: port, Proto: 6}
		if err := ct.Put(k, datapath.CTEntry{Dir: datapath.CTReply, Lifetime: uint32(now + lifetime)}); err != nil {
			t.Fatal(err)
		}
	}
	type want struct{ out, in bool }
	cases := []struct {
		name    string
		ct      int64 // conntrack lifetime relative to now; 0: none
		age     int64
		out, in bool
		want    want
	}{
		{"live flow", 100, 30, true, true, want{true, true}},
		{"conntrack gone", 0, 30, true, true, want{false, false}},
		{"conntrack expired", -5, 30, true, true, want{false, false}},
		{"lone reply half", 100, 30, false, true, want{false, false}},
		{"just made", 0, 0, true, true, want{true, true}},
	}
	keys := make([][2]datapath.NATKey, len(cases))
	for i, c := range cases {
		port := uint16(40000 + i)
		if c.ct != 0 {
			reply(port, c.ct)
		}
		o, in := natFlow(t, nat, now, port, uint16(50000+i), c.age, c.out, c.in)
		keys[i] = [2]datapath.NATKey{o, in}
	}
	// An orphan OUT half whose port a live flow (client port 41000) has
	// taken since: the OUT half goes, the live flow's IN entry stays.
	reply(41000, 100)
	stale, _ := natFlow(t, nat, now, 40100, 50100, 30, true, false)
	_, taken := natFlow(t, nat, now, 41000, 50100, 30, true, true)
	st, err := New(Options{Map: dp.CT, NAT: dp.NAT, NATStats: dp.NATStats, Interval: time.Minute}).Pass()
	if err != nil {
		t.Fatal(err)
	}
	for i, c := range cases {
		if got := (want{natPresent(t, nat, keys[i][0]), natPresent(t, nat, keys[i][1])}); got != c.want {
			t.Errorf("%s: NAT halves present %+v, want %+v", c.name, got, c.want)
		}
	}
	if natPresent(t, nat, stale) || !natPresent(t, nat, taken) {
		t.Errorf("orphan OUT half present %v, the live flow's IN entry on its old port present %v; want false, true",
			natPresent(t, nat, stale), natPresent(t, nat, taken))
	}
	if st.NAT == nil || st.NAT.Orphans != 6 || st.NAT.Entries != 6 {
		t.Errorf("NAT stats %+v, want 6 orphans deleted and 6 entries left", st.NAT)
	}
}

// The NAT counters wake the collector early when flows are refused, when
// ports are found taken more often than given, and when the map (by the
// last pass's count and the flows since) passes PressureFill.
func TestNATPressureSignal(t *testing.T) {
	pass := &NATStats{Entries: 1000, MaxEntries: 10000, Allocated: 500}
	prev := datapath.NATCounters{Allocated: 500}
	cases := []struct {
		name string
		cur  datapath.NATCounters
		want bool
	}{
		{"quiet", datapath.NATCounters{Allocated: 600, Retries: 5}, false},
		{"a flow refused", datapath.NATCounters{Allocated: 500, Exhausted: 1}, true},
		{"ports found taken", datapath.NATCounters{Allocated: 510, Retries: 40}, true},
		{"map at 78%", datapath.NATCounters{Allocated: 500 + 3400}, false},
		{"map at 80%", datapath.NATCounters{Allocated: 500 + 3500}, true},
	}
	for _, c := range cases {
		if got := natPressure(pass, prev, c.cur) != ""; got != c.want {
			t.Errorf("%s: pressure %v, want %v", c.name, got, c.want)
		}
	}
	if natPressure(nil, prev, datapath.NATCounters{Allocated: 1 << 30}) != "" {
		t.Error("no pass yet: the fill cannot be estimated")
	}
}
