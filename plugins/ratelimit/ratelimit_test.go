package main

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/datapath/dptest"
	"github.com/weirnet/weir/core/lbmap"
	"github.com/weirnet/weir/core/model"
	"github.com/weirnet/weir/core/slots"
	"github.com/weirnet/weir/modules/lb"
)

var (
	client1 = netip.MustParseAddr("10.244.1.5")
	client2 = netip.MustParseAddr("10.244.1.6")
	// Limited TCP frontend, a TCP one without a limit, a limited UDP one,
	// and one for the refill.
	web     = netip.AddrPortFrom(netip.MustParseAddr("10.96.0.10"), 80)
	open    = netip.AddrPortFrom(netip.MustParseAddr("10.96.0.11"), 80)
	dns     = netip.AddrPortFrom(netip.MustParseAddr("10.96.0.53"), 53)
	fast    = netip.AddrPortFrom(netip.MustParseAddr("10.96.0.12"), 80)
	backend = netip.MustParseAddr("10.244.2.20")
)

const targetPort = 8080

// fixture is a node datapath (core's entry programs come with Open) with
// the real lb stage and the plugin in pod-egress/plugin-early, so a packet
// runs entry -> ratelimit -> lb as on a node, and the conntrack entries
// the plugin reads for UDP are the ones lb writes.
type fixture struct {
	t        testing.TB
	dp       *datapath.Datapath
	egress   *ebpf.Program
	limits   *ebpf.Map
	buckets  *ebpf.Map
	counters *ebpf.Map
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	spec, err := loadRatelimit()
	if err != nil {
		t.Fatal(err)
	}
	lbSpec, err := (&lb.Module{}).Object()
	if err != nil {
		t.Fatal(err)
	}
	lbSlots := map[string]string{}
	for _, c := range lb.Factory.Slots {
		lbSlots[c.Slot] = c.Program
	}
	dp := dptest.Open(t)
	in := dptest.Install(t, dp,
		datapath.Object{Module: lb.Name, Spec: lbSpec, Slots: lbSlots},
		datapath.Object{Module: "ratelimit", Spec: spec, Slots: map[string]string{"pod-egress/plugin-early": "ratelimit"}},
	)
	coll := in.Collections["ratelimit"]
	f := &fixture{t: t, dp: dp, limits: coll.Maps["ratelimit_limits"], buckets: coll.Maps["ratelimit_buckets"],
		counters: coll.Maps["ratelimit_counters"]}
	if f.limits == nil || f.buckets == nil || f.counters == nil {
		t.Fatalf("plugin maps missing from the installation: %v", coll.Maps)
	}
	if f.egress, err = dp.Entry(slots.PodEgress); err != nil {
		t.Fatal(err)
	}
	var svcs []*model.Service
	for name, fe := range map[string]struct {
		addr  netip.AddrPort
		proto model.Proto
	}{"web": {web, model.TCP}, "open": {open, model.TCP}, "dns": {dns, model.UDP}, "fast": {fast, model.TCP}} {
		svcs = append(svcs, &model.Service{
			Name: model.ServiceName{Namespace: "default", Name: name},
			Frontends: []model.Frontend{{Addr: fe.addr, Proto: fe.proto, Type: model.ClusterIP,
				Backends: []model.Backend{{Addr: netip.AddrPortFrom(backend, targetPort)}}}},
		})
	}
	if err := lbmap.NewFromDatapath(dp, nil).ApplySnapshot(&model.Snapshot{Services: svcs}); err != nil {
		t.Fatal(err)
	}
	return f
}

func frontendOf(front netip.AddrPort, proto layers.IPProtocol) ratelimitRatelimitFrontend {
	return ratelimitRatelimitFrontend{Addr: datapath.AddrToBE(front.Addr()), Port: datapath.PortToBE(front.Port()), Proto: uint8(proto)}
}

func (f *fixture) limit(front netip.AddrPort, proto layers.IPProtocol, rate, burst uint32) {
	f.t.Helper()
	if err := f.limits.Put(frontendOf(front, proto), ratelimitRatelimitLimit{Rate: rate, Burst: burst}); err != nil {
		f.t.Fatal(err)
	}
}

// counted returns the plugin's counters summed over CPUs: allowed, limited.
func (f *fixture) counted() (allowed, limited uint64) {
	f.t.Helper()
	sum := func(i uint32) uint64 {
		var per []uint64
		if err := f.counters.Lookup(i, &per); err != nil {
			f.t.Fatal(err)
		}
		var n uint64
		for _, v := range per {
			n += v
		}
		return n
	}
	return sum(0), sum(1)
}

func (f *fixture) wantCounted(allowed, limited uint64) {
	f.t.Helper()
	if a, l := f.counted(); a != allowed || l != limited {
		f.t.Fatalf("ratelimit_counters: %d allowed, %d limited; want %d, %d", a, l, allowed, limited)
	}
}

// pluginDrops is what core counted as dropped by a plugin on pod egress.
func (f *fixture) pluginDrops() uint64 {
	f.t.Helper()
	var per []datapath.Metric
	if err := f.dp.Metrics().Lookup(uint32(slots.PodEgress)*datapath.NumReasons+uint32(datapath.DropPlugin), &per); err != nil {
		f.t.Fatal(err)
	}
	var n uint64
	for _, m := range per {
		n += m.Packets
	}
	return n
}

func syn(src, dst netip.AddrPort) dptest.Flow {
	return dptest.Flow{Src: src, Dst: dst, Proto: layers.IPProtocolTCP, SYN: true}
}

func udp(src, dst netip.AddrPort) dptest.Flow {
	return dptest.Flow{Src: src, Dst: dst, Proto: layers.IPProtocolUDP, Payload: []byte("query")}
}

func (f *fixture) run(fl dptest.Flow) dptest.Result {
	f.t.Helper()
	return dptest.Run(f.t, f.egress, dptest.Build(f.t, fl))
}

// pass runs a packet that must get through, on to lb, which translates a
// packet to a service frontend: proof the plugin handed it on.
func (f *fixture) pass(what string, fl dptest.Flow) {
	f.t.Helper()
	res := f.run(fl)
	if res.Verdict != dptest.ActOK {
		f.t.Fatalf("%s: verdict %d, want TC_ACT_OK", what, res.Verdict)
	}
	if d := dptest.Decode(f.t, res.Packet); d.Dst != netip.AddrPortFrom(backend, targetPort) {
		f.t.Fatalf("%s: left for %v, not translated by lb to %v:%d", what, d.Dst, backend, targetPort)
	}
}

func (f *fixture) drop(what string, fl dptest.Flow) {
	f.t.Helper()
	if res := f.run(fl); res.Verdict != dptest.ActShot {
		f.t.Fatalf("%s: verdict %d, want TC_ACT_SHOT", what, res.Verdict)
	}
}

func TestTCPNewConnectionsLimitedPerClient(t *testing.T) {
	f := newFixture(t)
	f.limit(web, layers.IPProtocolTCP, 1, 3)

	for i := range uint16(3) {
		f.pass("SYN within the burst", syn(netip.AddrPortFrom(client1, 40000+i), web))
	}
	f.wantCounted(3, 0)
	if n := f.pluginDrops(); n != 0 {
		t.Fatalf("%d plugin drops before the limit", n)
	}
	dropped := netip.AddrPortFrom(client1, 40003)
	f.drop("fourth SYN", syn(dropped, web))
	f.wantCounted(3, 1)
	if n := f.pluginDrops(); n != 1 {
		t.Fatalf("core counted %d pod-egress drops by a plugin, want 1", n)
	}
	ev, err := datapath.OpenEvents(f.dp.PinDir())
	if err != nil {
		t.Fatal(err)
	}
	defer ev.Close()
	e, err := ev.Read(time.Now().Add(time.Second))
	if err != nil {
		t.Fatalf("no drop event: %v", err)
	}
	if e.Code != uint8(datapath.DropPlugin) || e.Hook != slots.PodEgress.String() || e.Src != dropped || e.Dst != web {
		t.Fatalf("drop event %v (code %d), want the fourth SYN dropped by a plugin on pod-egress", e, e.Code)
	}

	// A bucket is per client.
	for i := range uint16(3) {
		f.pass("other client's SYN", syn(netip.AddrPortFrom(client2, 40000+i), web))
	}
	f.drop("other client's fourth SYN", syn(netip.AddrPortFrom(client2, 40003), web))
	f.wantCounted(6, 2)

	// Only new connections pay, and only to limited frontends.
	ack := dptest.Flow{Src: netip.AddrPortFrom(client1, 40000), Dst: web, Proto: layers.IPProtocolTCP, ACK: true, Payload: []byte("data")}
	f.pass("ACK of the limited client", ack)
	f.pass("SYN to a frontend without a limit", syn(netip.AddrPortFrom(client1, 40010), open))
	f.wantCounted(6, 2)
	if n := f.pluginDrops(); n != 2 {
		t.Fatalf("core counted %d plugin drops, want 2", n)
	}
}

// A UDP datagram opens a flow when lb has no live conntrack entry for it:
// further datagrams of a flow let in never pay, those of a flow that was
// limited are limited until a token is there.
func TestUDPNewFlowsLimited(t *testing.T) {
	f := newFixture(t)
	f.limit(dns, layers.IPProtocolUDP, 1, 2)
	a := netip.AddrPortFrom(client1, 5000)
	b := netip.AddrPortFrom(client1, 5001)
	c := netip.AddrPortFrom(client1, 5002)

	f.pass("flow A", udp(a, dns))
	f.pass("flow A again", udp(a, dns))
	f.pass("flow B", udp(b, dns))
	f.wantCounted(2, 0)
	f.drop("flow C over the limit", udp(c, dns))
	f.drop("flow C again: it never got a conntrack entry", udp(c, dns))
	for range 3 {
		f.pass("flow A, established", udp(a, dns))
		f.pass("flow B, established", udp(b, dns))
	}
	f.wantCounted(2, 2)
	f.pass("another client's flow", udp(netip.AddrPortFrom(client2, 5002), dns))
	f.wantCounted(3, 2)

	// A flow whose conntrack entry expired is new again (lb would make
	// it a fresh flow, with a fresh backend choice).
	key := datapath.CTKey{Saddr: datapath.AddrToBE(a.Addr()), Daddr: datapath.AddrToBE(dns.Addr()),
		Sport: datapath.PortToBE(a.Port()), Dport: datapath.PortToBE(dns.Port()), Proto: uint8(layers.IPProtocolUDP)}
	var e datapath.CTEntry
	if err := f.dp.CT().Lookup(key, &e); err != nil {
		t.Fatalf("lb left no conntrack entry for flow A: %v", err)
	}
	e.Lifetime = 1
	if err := f.dp.CT().Put(key, e); err != nil {
		t.Fatal(err)
	}
	f.drop("flow A after its entry expired", udp(a, dns))
	f.wantCounted(3, 3)
	if n := f.pluginDrops(); n != 3 {
		t.Fatalf("core counted %d plugin drops, want 3", n)
	}
}

func TestRefill(t *testing.T) {
	f := newFixture(t)
	f.limit(fast, layers.IPProtocolTCP, 1000, 1)
	port := uint16(40000)
	next := func() dptest.Flow { port++; return syn(netip.AddrPortFrom(client1, port), fast) }

	f.pass("first SYN: the bucket starts full", next())
	// At 1000/s a token comes back every millisecond, which a slow run
	// may take between two packets: a few tries, until one meets an
	// empty bucket.
	limited := false
	for range 100 {
		if f.run(next()).Verdict == dptest.ActShot {
			limited = true
			break
		}
	}
	if !limited {
		t.Fatal("no SYN was limited at 1000/s with a burst of 1")
	}
	allowed, dropped := f.counted()
	if dropped != 1 {
		t.Fatalf("%d limited, want 1", dropped)
	}

	deadline := time.Now().Add(time.Second)
	for {
		res := f.run(next())
		if res.Verdict == dptest.ActOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no SYN passed within a second of the bucket running dry at 1000/s")
		}
		time.Sleep(100 * time.Microsecond)
	}
	if a, _ := f.counted(); a != allowed+1 {
		t.Fatalf("%d allowed after the refill, want %d", a, allowed+1)
	}
}

// The refill is proportional to the time elapsed, not only whole once the
// bucket could have filled: a bucket left half a connection short gets the
// rest after half a second at 1/s. Seeded on the boot clock the program
// reads, at a rate slow enough that no pause of the test matters.
func TestPartialRefill(t *testing.T) {
	f := newFixture(t)
	f.limit(fast, layers.IPProtocolTCP, 1, 10)
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		t.Fatal(err)
	}
	k := ratelimitRatelimitBucketKey{Front: frontendOf(fast, layers.IPProtocolTCP), Client: datapath.AddrToBE(client1)}
	b := ratelimitRatelimitBucket{Tokens: 5e8, LastNs: uint64(ts.Nano()) - 6e8}
	if err := f.buckets.Put(k, b); err != nil {
		t.Fatal(err)
	}
	f.pass("SYN with half a token and 0.6 s of refill", syn(netip.AddrPortFrom(client1, 40000), fast))
	f.drop("SYN right after: the bucket holds about a tenth", syn(netip.AddrPortFrom(client1, 40001), fast))
	if err := f.buckets.Lookup(k, &b); err != nil {
		t.Fatal(err)
	}
	if b.Tokens < 1e8 || b.Tokens >= 1e9 {
		t.Fatalf("bucket holds %d nanotokens, want about 1e8", b.Tokens)
	}
	f.wantCounted(1, 1)
}

// The settings become map entries laid out as ratelimit.c's structs.
func TestSettingsEncodeAsTheCStructs(t *testing.T) {
	got, err := parse([]byte(`{"limits":[{"frontend":"10.96.0.10:80","rate":5},{"frontend":"10.96.0.53:53","protocol":"udp","rate":2,"burst":7}]}`))
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		key ratelimitRatelimitFrontend
		val ratelimitRatelimitLimit
	}{
		{frontendOf(netip.MustParseAddrPort("10.96.0.10:80"), layers.IPProtocolTCP), ratelimitRatelimitLimit{Rate: 5, Burst: 5}},
		{frontendOf(netip.MustParseAddrPort("10.96.0.53:53"), layers.IPProtocolUDP), ratelimitRatelimitLimit{Rate: 2, Burst: 7}},
	}
	if len(got) != len(want) {
		t.Fatalf("%d entries, want %d", len(got), len(want))
	}
	for i, w := range want {
		var k, v bytes.Buffer
		_ = binary.Write(&k, binary.NativeEndian, w.key)
		_ = binary.Write(&v, binary.NativeEndian, w.val)
		if !bytes.Equal(got[i].key, k.Bytes()) || !bytes.Equal(got[i].value, v.Bytes()) {
			t.Errorf("entry %d: key %x value %x, want %x %x", i, got[i].key, got[i].value, k.Bytes(), v.Bytes())
		}
	}
	for doc, msg := range map[string]string{
		`{"limits":[{"frontend":"10.96.0.10","rate":5}]}`:                                          `limits[0].frontend: "10.96.0.10" is not an IPv4 service address and port (such as 10.96.0.10:80)`,
		`{"limits":[{"frontend":"10.96.0.10:80","rate":0}]}`:                                       `limits[0].rate: give new connections per second per client (1 or more)`,
		`{"limits":[{"frontend":"10.96.0.10:80","protocol":"sctp","rate":1}]}`:                     `limits[0].protocol: "sctp" is not one of TCP, UDP`,
		`{"limits":[{"frontend":"10.96.0.10:80","rate":1},{"frontend":"10.96.0.10:80","rate":2}]}`: `limits[1].frontend: 10.96.0.10:80 is already limited by limits[0]`,
		`{"limit":[]}`: `limit: unknown field; allowed fields: limits`,
	} {
		if _, err := parse([]byte(doc)); err == nil || err.Error() != msg {
			t.Errorf("%s: %v, want %s", doc, err, msg)
		}
	}
}

// The README names every slot the plugin claims, every map it declares
// (its own and core's) and every setting, as in-tree modules' READMEs
// must (modules/readme_test.go).
func TestREADMEFollowsTheDescription(t *testing.T) {
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	d := (&rateLimit{}).Describe()
	var names []string
	for _, c := range d.Slots {
		names = append(names, c.Slot, c.Program)
	}
	for _, m := range d.Maps {
		names = append(names, m.Name)
	}
	names = append(names, d.CoreMaps...)
	for _, f := range []string{"limits", "frontend", "protocol", "rate", "burst"} {
		names = append(names, f)
	}
	for _, n := range names {
		if !strings.Contains(doc, "`"+n+"`") {
			t.Errorf("README.md does not name `%s`", n)
		}
	}
}
