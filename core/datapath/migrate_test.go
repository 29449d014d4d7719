package datapath_test

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket/layers"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/datapath/dptest"
	"github.com/weirnet/weir/core/slots"
	"github.com/weirnet/weir/modules/lb"
)

// pinDir is a pin directory for a test that opens datapaths in it
// itself, removed when the test ends.
func pinDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(dptest.TestPinRoot, dptest.UniqueName(t))
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("removing pin directory: %v", err)
		}
		_ = os.Remove(dptest.TestPinRoot)
	})
	return dir
}

func ctEntries(t *testing.T, m *ebpf.Map) map[datapath.CTKey]datapath.CTEntry {
	t.Helper()
	out := map[datapath.CTKey]datapath.CTEntry{}
	var (
		k datapath.CTKey
		v datapath.CTEntry
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		out[k] = v
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// Another datapath.ctMaxEntries over a pinned datapath: the agent starts,
// the conntrack map has the new size and keeps every entry.
func TestCTMaxEntriesChangeKeepsEntries(t *testing.T) {
	dir := pinDir(t)
	dp, err := datapath.Open(datapath.Options{PinDir: dir, CTMaxEntries: 4096})
	if err != nil {
		t.Fatal(err)
	}
	want := map[datapath.CTKey]datapath.CTEntry{}
	for i := range 100 {
		k := datapath.CTKey{Saddr: uint32(i + 1), Daddr: 7, Sport: 1, Dport: 2, Proto: 6}
		v := datapath.CTEntry{Lifetime: uint32(1000 + i), Dir: datapath.CTOrig, NatDaddr: 9}
		if err := dp.CT().Put(k, v); err != nil {
			t.Fatal(err)
		}
		want[k] = v
	}
	dp.Close()

	for _, size := range []uint32{8192, 2048} {
		dp, err = datapath.Open(datapath.Options{PinDir: dir, CTMaxEntries: size})
		if err != nil {
			t.Fatalf("ctMaxEntries %d over a pinned datapath: %v", size, err)
		}
		info, err := dp.CT().Info()
		if err != nil || info.MaxEntries != size {
			t.Fatalf("conntrack has %v entries max (%v), want %d", info.MaxEntries, err, size)
		}
		if got := ctEntries(t, dp.CT()); !reflect.DeepEqual(got, want) {
			t.Fatalf("ctMaxEntries %d: %d entries carried over, want %d", size, len(got), len(want))
		}
		// The old prog array is kept alive (old entry programs still run
		// on it) until the load finishes.
		if prev, _ := filepath.Glob(filepath.Join(dir, "weir_calls_prev_*")); len(prev) != 1 {
			t.Fatalf("pins of the old prog array: %v, want one", prev)
		}
		// The pin is the new map.
		pinned, err := ebpf.LoadPinnedMap(filepath.Join(dir, datapath.MapCT), nil)
		if err != nil {
			t.Fatal(err)
		}
		pi, _ := pinned.Info()
		pinned.Close()
		if pi.MaxEntries != size {
			t.Fatalf("the pinned conntrack map has %d entries max, want %d", pi.MaxEntries, size)
		}
		if err := dp.FinishMigration(); err != nil {
			t.Fatal(err)
		}
		if prev, _ := filepath.Glob(filepath.Join(dir, "weir_calls_prev_*")); len(prev) != 0 {
			t.Fatalf("pins of the old prog array after the load finished: %v", prev)
		}
		dp.Close()
	}
	dp, err = datapath.Open(datapath.Options{PinDir: dir, CTMaxEntries: 2048})
	if err != nil {
		t.Fatal(err)
	}
	if err := dp.Remove(); err != nil {
		t.Fatal(err)
	}
}

// The map layouts of the previous agent (layout 1: 16-bit reverse NAT ids,
// SERVICE/REPLY conntrack) are converted when the agent starts over them:
// an established flow keeps its backend and its replies their frontend.
func TestLayout1IsConverted(t *testing.T) {
	dir := pinDir(t)
	// The previous agent's maps: today's specs with layout 1's sizes.
	spec, err := datapath.CoreSpec()
	if err != nil {
		t.Fatal(err)
	}
	v1 := map[string][2]uint32{ // key, value size
		datapath.MapRevNAT: {2, 8}, datapath.MapCT: {16, 32}, datapath.MapAffinity: {8, 8},
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	maps := map[string]*ebpf.Map{}
	for name, ms := range spec.Maps {
		if ms.Pinning != ebpf.PinByName || name == datapath.MapSlotMask || name == datapath.MapFrags || name == datapath.MapBackendAddrs ||
			name == datapath.MapSockRev || name == datapath.MapSockAffinity || name == datapath.MapSockTerm {
			continue // new in layout 2
		}
		ms = ms.Copy()
		ms.Pinning = ebpf.PinNone
		ms.Key, ms.Value = nil, nil
		if sz, ok := v1[name]; ok {
			ms.KeySize, ms.ValueSize = sz[0], sz[1]
		}
		if name == datapath.MapCT {
			ms.MaxEntries = 4096
		}
		m, err := ebpf.NewMap(ms)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if err := m.Pin(filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		maps[name] = m
	}
	be := func(s string) uint32 { return datapath.AddrToBE(netip.MustParseAddr(s)) }
	p := datapath.PortToBE
	client, vip, backend := be("10.244.1.10"), be("10.96.0.10"), be("10.244.1.11")
	put := func(name string, k, v any) {
		t.Helper()
		if err := maps[name].Put(k, v); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	// Layout 1 values, as bytes: a master with one backend, rev NAT 7.
	svcV1 := func(backendID uint32, count, revnat uint16) []byte {
		b := make([]byte, 16)
		putU32(b[0:], backendID)
		putU16(b[4:], count)
		putU16(b[6:], revnat)
		b[8] = datapath.SvcClusterIP
		return b
	}
	put(datapath.MapServices, datapath.ServiceKey{Addr: vip, Port: p(80), Proto: 6}, svcV1(0, 1, 7))
	put(datapath.MapServices, datapath.ServiceKey{Addr: vip, Port: p(80), Proto: 6, Slot: 1}, svcV1(3, 0, 7))
	put(datapath.MapBackends, uint32(3), datapath.Backend{Addr: backend, Port: p(8080), Proto: 6})
	put(datapath.MapRevNAT, uint16(7), datapath.RevNAT{Addr: vip, Port: p(80)})
	now, _ := datapath.BootSeconds()
	ctV1 := func(kind uint8, s, d uint32, sp, dp uint16, revnat uint16) ([]byte, []byte) {
		k := make([]byte, 16)
		putU32(k[0:], s)
		putU32(k[4:], d)
		putU16(k[8:], sp)
		putU16(k[10:], dp)
		k[12], k[13] = 6, kind
		v := make([]byte, 32)
		putU32(v[16:], uint32(now))
		putU32(v[20:], uint32(now)+21600)
		putU32(v[24:], 3)
		putU16(v[28:], revnat)
		putU16(v[30:], 8) // established
		return k, v
	}
	k, v := ctV1(1, client, vip, p(40000), p(80), 7)
	put(datapath.MapCT, k, v)
	k, v = ctV1(2, backend, client, p(8080), p(40000), 7)
	put(datapath.MapCT, k, v)

	dp, err := datapath.Open(datapath.Options{PinDir: dir, CTMaxEntries: 4096})
	if err != nil {
		t.Fatalf("agent over layout 1: %v", err)
	}
	t.Cleanup(func() { _ = dp.Remove() })
	var sv datapath.ServiceValue
	if err := dp.Services().Lookup(datapath.ServiceKey{Addr: vip, Port: p(80), Proto: 6}, &sv); err != nil || sv.RevNat != 7 || sv.Count != 1 {
		t.Fatalf("master after conversion: %+v %v", sv, err)
	}
	var rn datapath.RevNAT
	if err := dp.RevNAT().Lookup(uint32(7), &rn); err != nil || rn.Addr != vip {
		t.Fatalf("reverse NAT 7 after conversion: %+v %v", rn, err)
	}
	ct := ctEntries(t, dp.CT())
	o := ct[datapath.CTKey{Saddr: client, Daddr: vip, Sport: p(40000), Dport: p(80), Proto: 6}]
	r := ct[datapath.CTKey{Saddr: backend, Daddr: client, Sport: p(8080), Dport: p(40000), Proto: 6}]
	if o.Dir != datapath.CTOrig || o.NatDaddr != backend || o.NatDport != p(8080) || o.RevNat != 7 || o.BackendId != 3 {
		t.Fatalf("ORIG after conversion: %+v", o)
	}
	if r.Dir != datapath.CTReply || r.NatSaddr != vip || r.NatSport != p(80) || r.NatDaddr != client {
		t.Fatalf("REPLY after conversion: %+v", r)
	}
	if datapath.CTState(6, o.Flags) != "established" {
		t.Fatalf("state %s after conversion", datapath.CTState(6, o.Flags))
	}
	dp.FinishMigration()

	// The flow goes on under the new programs.
	spec, err = (&lb.Module{}).Object()
	if err != nil {
		t.Fatal(err)
	}
	claims := map[string]string{}
	for _, c := range lb.Factory.Slots {
		claims[c.Slot] = c.Program
	}
	dptest.Install(t, dp, datapath.Object{Module: lb.Name, Spec: spec, Slots: claims})
	eg, _ := dp.Entry(slots.PodEgress)
	in, _ := dp.Entry(slots.PodIngress)
	src, front := netip.MustParseAddrPort("10.244.1.10:40000"), netip.MustParseAddrPort("10.96.0.10:80")
	ack := dptest.Flow{Src: src, Dst: front, Proto: layers.IPProtocolTCP, ACK: true}
	if d := dptest.Decode(t, dptest.Run(t, eg, dptest.Build(t, ack)).Packet); d.Dst != netip.MustParseAddrPort("10.244.1.11:8080") || d.Src != src {
		t.Fatalf("the converted flow left as %v -> %v", d.Src, d.Dst)
	}
	reply := dptest.Flow{Src: netip.MustParseAddrPort("10.244.1.11:8080"), Dst: src, Proto: layers.IPProtocolTCP, ACK: true}
	if d := dptest.Decode(t, dptest.Run(t, in, dptest.Build(t, reply)).Packet); d.Src != front || d.Dst != src {
		t.Fatalf("its reply arrived as %v -> %v", d.Src, d.Dst)
	}
}

// The layouts of maps.h are versioned: a change to any shared struct
// without a new LayoutVersion (and its entry in the migrations) would
// let a new agent misread a previous agent's maps.
func TestLayoutVersionFollowsTheHeader(t *testing.T) {
	// A new map with new structs leaves the pinned maps readable as they
	// were: its types join the list and the version's signature is
	// recorded again (layout 2 gained weir_sock_rev,
	// weir_sock_affinity and weir_sock_term).
	recorded := map[uint32]string{
		2: "a3d6f61bbbabc1bd",
	}
	var b strings.Builder
	for _, v := range []any{
		datapath.Ctx{}, datapath.ServiceKey{}, datapath.ServiceValue{}, datapath.Backend{}, datapath.RevNAT{},
		datapath.CTKey{}, datapath.CTEntry{}, datapath.EndpointKey{}, datapath.Endpoint{}, datapath.IPCacheKey{},
		datapath.IPCacheEntry{}, datapath.AffinityKey{}, datapath.Affinity{}, datapath.Metric{}, datapath.Event{},
		datapath.BackendAddrKey{}, datapath.FragKey{}, datapath.FragEntry{},
		datapath.SockRev{}, datapath.SockRevEntry{}, datapath.SockAffinityKey{}, datapath.SockTermKey{},
	} {
		typ := reflect.TypeOf(v)
		fmt.Fprintf(&b, "%s %d:", typ.Name(), typ.Size())
		for i := range typ.NumField() {
			f := typ.Field(i)
			fmt.Fprintf(&b, " %s@%d/%d", f.Name, f.Offset, f.Type.Size())
		}
		b.WriteString("\n")
	}
	sum := sha256.Sum256([]byte(b.String()))
	got := hex.EncodeToString(sum[:8])
	if recorded[datapath.LayoutVersion] != got {
		t.Fatalf("the shared map layouts have signature %s, but layout %d was recorded as %q.\n"+
			"If maps.h changed: bump datapath.LayoutVersion, list the changed maps with their converters in layoutChanges, "+
			"and record the new signature here.\n%s", got, datapath.LayoutVersion, recorded[datapath.LayoutVersion], b.String())
	}
}

func putU32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}
func putU16(b []byte, v uint16) { b[0], b[1] = byte(v), byte(v>>8) }

// An agent that stops after a load replaced maps but before every hook
// moved (it crashed, or a module failed to start) leaves the old prog
// array pinned: the old entry programs go on forwarding through their
// stages. The next start that completes releases it.
func TestUnfinishedMigrationKeepsTheOldStages(t *testing.T) {
	dir := pinDir(t)
	dp, err := datapath.Open(datapath.Options{PinDir: dir, CTMaxEntries: 4096})
	if err != nil {
		t.Fatal(err)
	}
	objs := dptest.StageObject(t, map[string]string{"pod-egress/arp": "stage_pass"})
	in, err := dp.Install([]datapath.Object{objs})
	if err != nil {
		t.Fatal(err)
	}
	in.Close()
	oldEntry, _ := dp.Entry(slots.PodEgress)
	oldEntry, err = oldEntry.Clone() // what a TCX link would hold
	if err != nil {
		t.Fatal(err)
	}
	defer oldEntry.Close()
	dp.Close()

	dp, err = datapath.Open(datapath.Options{PinDir: dir, CTMaxEntries: 8192})
	if err != nil {
		t.Fatal(err)
	}
	dp.Close() // stopped before FinishMigration

	// The old entry still runs, and its prog array still holds its
	// stage.
	if res := dptest.Run(t, oldEntry, packet(t)); res.Verdict != dptest.ActOK {
		t.Fatalf("old entry program: verdict %d", res.Verdict)
	}
	if prev, _ := filepath.Glob(filepath.Join(dir, "weir_calls_prev_*")); len(prev) != 1 {
		t.Fatalf("pins of the old prog array: %v, want one", prev)
	}
	var calls *ebpf.Map
	if calls, err = ebpf.LoadPinnedMap(mustGlob(t, filepath.Join(dir, "weir_calls_prev_*")), nil); err != nil {
		t.Fatal(err)
	}
	var id uint32
	if err := calls.Lookup(uint32(0), &id); err != nil {
		t.Fatalf("the old prog array lost its stage: %v", err)
	}
	calls.Close()

	dp, err = datapath.Open(datapath.Options{PinDir: dir, CTMaxEntries: 8192})
	if err != nil {
		t.Fatal(err)
	}
	if err := dp.FinishMigration(); err != nil {
		t.Fatal(err)
	}
	if prev, _ := filepath.Glob(filepath.Join(dir, "weir_calls_prev_*")); len(prev) != 0 {
		t.Fatalf("a completed start left %v", prev)
	}
	if err := dp.Remove(); err != nil {
		t.Fatal(err)
	}
}

func mustGlob(t *testing.T, pattern string) string {
	t.Helper()
	m, _ := filepath.Glob(pattern)
	if len(m) != 1 {
		t.Fatalf("%s matches %v", pattern, m)
	}
	return m[0]
}

// A map whose layout record says a swap was under way (an agent stopped
// in the middle of one) is recreated, never read as some layout.
func TestUnknownLayoutIsRecreated(t *testing.T) {
	dir := pinDir(t)
	dp, err := datapath.Open(datapath.Options{PinDir: dir, CTMaxEntries: 4096})
	if err != nil {
		t.Fatal(err)
	}
	if err := dp.CT().Put(datapath.CTKey{Saddr: 1, Proto: 6}, datapath.CTEntry{Lifetime: 99}); err != nil {
		t.Fatal(err)
	}
	dp.Close()
	lm, err := ebpf.LoadPinnedMap(filepath.Join(dir, "weir_layout"), nil)
	if err != nil {
		t.Fatal(err)
	}
	var k [16]byte
	copy(k[:], datapath.MapCT)
	if err := lm.Put(k, ^uint32(0)); err != nil {
		t.Fatal(err)
	}
	lm.Close()
	dp, err = datapath.Open(datapath.Options{PinDir: dir, CTMaxEntries: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = dp.Remove() }()
	if n, err := datapath.CountEntries(dp.CT()); err != nil || n != 0 {
		t.Fatalf("conntrack of an unknown layout kept %d entries (%v)", n, err)
	}
}
