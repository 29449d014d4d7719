package lb

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket/layers"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/datapath/dptest"
	"github.com/weirnet/weir/core/lbmap"
	"github.com/weirnet/weir/core/model"
	"github.com/weirnet/weir/core/slots"
)

func ctKey(src, dst netip.AddrPort, proto layers.IPProtocol) datapath.CTKey {
	return datapath.CTKey{Saddr: datapath.AddrToBE(src.Addr()), Daddr: datapath.AddrToBE(dst.Addr()),
		Sport: datapath.PortToBE(src.Port()), Dport: datapath.PortToBE(dst.Port()), Proto: uint8(proto)}
}

// entry returns the conntrack entry for the tuple, or false.
func (f *fixture) entry(src, dst netip.AddrPort, proto layers.IPProtocol) (datapath.CTEntry, bool) {
	f.t.Helper()
	var e datapath.CTEntry
	err := f.dp.CT().Lookup(ctKey(src, dst, proto), &e)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return e, false
	}
	if err != nil {
		f.t.Fatal(err)
	}
	return e, true
}

func (f *fixture) mustEntry(src, dst netip.AddrPort, proto layers.IPProtocol) datapath.CTEntry {
	f.t.Helper()
	e, ok := f.entry(src, dst, proto)
	if !ok {
		f.t.Fatalf("no conntrack entry for %v -> %v", src, dst)
	}
	return e
}

// shiftLifetime moves the lifetime of both entries of the flow whose ORIG
// key is given, as if time had passed.
func (f *fixture) shiftLifetime(src, dst netip.AddrPort, proto layers.IPProtocol, by int64) {
	f.t.Helper()
	o := f.mustEntry(src, dst, proto)
	f.shiftOne(src, dst, proto, by)
	f.shiftOne(netip.AddrPortFrom(datapath.AddrFromBE(o.NatDaddr), datapath.PortFromBE(o.NatDport)),
		netip.AddrPortFrom(datapath.AddrFromBE(o.NatSaddr), datapath.PortFromBE(o.NatSport)), proto, by)
}

// shiftOne moves the lifetime of one entry (its twin may be gone).
func (f *fixture) shiftOne(src, dst netip.AddrPort, proto layers.IPProtocol, by int64) {
	f.t.Helper()
	e := f.mustEntry(src, dst, proto)
	e.Lifetime = uint32(int64(e.Lifetime) + by)
	if err := f.dp.CT().Put(ctKey(src, dst, proto), e); err != nil {
		f.t.Fatal(err)
	}
}

func nowSec(t testing.TB) int64 {
	t.Helper()
	n, err := datapath.BootSeconds()
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func flags(syn, ack, fin, rst bool) func(*dptest.Flow) {
	return func(fl *dptest.Flow) { fl.SYN, fl.ACK, fl.FIN, fl.RST = syn, ack, fin, rst }
}

var (
	pSYN    = flags(true, false, false, false)
	pSYNACK = flags(true, true, false, false)
	pACK    = flags(false, true, false, false)
	pFIN    = flags(false, true, true, false)
	pRST    = flags(false, false, false, true)
)

// step is one packet of a conversation between the client and the
// service: from the client (orig) or the backend (reply).
type step struct {
	reply bool
	tcp   func(*dptest.Flow)
}

// converse runs the steps of one TCP flow from src to the web service and
// returns the backend the flow went to.
func (f *fixture) converse(src netip.AddrPort, steps ...step) netip.AddrPort {
	f.t.Helper()
	front := netip.AddrPortFrom(vip, 80)
	var backend netip.AddrPort
	for i, s := range steps {
		fl := dptest.Flow{Src: src, Dst: front, Proto: layers.IPProtocolTCP}
		prog := f.egress
		if s.reply {
			if !backend.IsValid() {
				f.t.Fatalf("step %d: a reply before any packet", i)
			}
			fl.Src, fl.Dst, prog = backend, src, f.ingress
		}
		s.tcp(&fl)
		res := dptest.Run(f.t, prog, dptest.Build(f.t, fl))
		if res.Verdict != dptest.ActOK {
			f.t.Fatalf("step %d: verdict %d", i, res.Verdict)
		}
		d := dptest.Decode(f.t, res.Packet)
		if s.reply {
			if d.Src != front || d.Dst != src {
				f.t.Fatalf("step %d: reply left as %v -> %v, want %v -> %v", i, d.Src, d.Dst, front, src)
			}
		} else {
			backend = d.Dst
		}
	}
	return backend
}

// Every TCP transition: the state both entries of the flow end in, and the
// lifetime it gives.
func TestConntrackTCPTransitions(t *testing.T) {
	O := func(p func(*dptest.Flow)) step { return step{false, p} }
	R := func(p func(*dptest.Flow)) step { return step{true, p} }
	hs := []step{O(pSYN), R(pSYNACK), O(pACK)}
	cases := []struct {
		name  string
		steps []step
		state string
		life  int64
	}{
		{"SYN", []step{O(pSYN)}, "syn", 60},
		{"SYN retransmitted", []step{O(pSYN), O(pSYN)}, "syn", 60},
		{"SYN, SYN-ACK", []step{O(pSYN), R(pSYNACK)}, "syn", 60},
		{"handshake done", hs, "established", 21600},
		{"data both ways", append(hs, R(pACK), O(pACK)), "established", 21600},
		{"client FIN: half-closed", append(hs, O(pFIN)), "half-closed", 120},
		{"server FIN: half-closed", append(hs, R(pFIN)), "half-closed", 120},
		{"half-closed, data flows on", append(hs, O(pFIN), R(pACK), R(pACK)), "half-closed", 120},
		{"both FINs: time-wait", append(hs, O(pFIN), R(pFIN), O(pACK)), "time-wait", 120},
		{"client RST", append(hs, O(pRST)), "reset", 10},
		{"server RST", append(hs, R(pRST)), "reset", 10},
		{"RST during the handshake", []step{O(pSYN), R(pRST)}, "reset", 10},
		// The side that sent a reset keeps talking: it was not its reset.
		{"stray RST, then the same side talks", append(hs, R(pRST), R(pACK)), "established", 21600},
		// Stragglers from the other side right after a reset change nothing.
		{"RST, then the other side at once", append(hs, R(pRST), O(pACK)), "reset", 10},
		{"RST after time-wait", append(hs, O(pFIN), R(pFIN), O(pRST)), "reset", 10},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t, false)
			f.web()
			src := netip.AddrPortFrom(client, 40100)
			backend := f.converse(src, c.steps...)
			now := nowSec(t)
			o := f.mustEntry(src, netip.AddrPortFrom(vip, 80), layers.IPProtocolTCP)
			r := f.mustEntry(backend, src, layers.IPProtocolTCP)
			for _, e := range []datapath.CTEntry{o, r} {
				if got := datapath.CTState(6, e.Flags); got != c.state {
					t.Errorf("dir %d: state %s (flags %#x), want %s", e.Dir, got, e.Flags, c.state)
				}
				if left := int64(e.Lifetime) - now; left < c.life-2 || left > c.life {
					t.Errorf("dir %d: expires in %ds, want %ds", e.Dir, left, c.life)
				}
			}
			if o.Dir != datapath.CTOrig || r.Dir != datapath.CTReply {
				t.Errorf("directions %d, %d", o.Dir, r.Dir)
			}
		})
	}
}

// Closed flows expire on the timer they got when they closed: later
// packets (retransmitted FINs, last ACKs, more resets) do not extend it.
func TestConntrackClosedTimersAreNotExtended(t *testing.T) {
	O := func(p func(*dptest.Flow)) step { return step{false, p} }
	R := func(p func(*dptest.Flow)) step { return step{true, p} }
	hs := []step{O(pSYN), R(pSYNACK), O(pACK)}
	for _, c := range []struct {
		name   string
		closed []step
		after  []step
	}{
		{"time-wait", append(hs, O(pFIN), R(pFIN)), []step{O(pACK), R(pFIN), O(pACK)}},
		{"reset", append(hs, O(pRST)), []step{O(pRST), O(pRST)}},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t, false)
			f.web()
			src := netip.AddrPortFrom(client, 40200)
			f.converse(src, c.closed...)
			front := netip.AddrPortFrom(vip, 80)
			f.shiftLifetime(src, front, layers.IPProtocolTCP, -5)
			before := f.mustEntry(src, front, layers.IPProtocolTCP).Lifetime
			f.converse(src, c.after...)
			if got := f.mustEntry(src, front, layers.IPProtocolTCP).Lifetime; got != before {
				t.Fatalf("lifetime moved from %d to %d", before, got)
			}
		})
	}
}

// A reset that really ended the connection stays; one the connection
// survived (the other side still talks after the grace) goes.
func TestConntrackStrayRSTAfterGrace(t *testing.T) {
	O := func(p func(*dptest.Flow)) step { return step{false, p} }
	R := func(p func(*dptest.Flow)) step { return step{true, p} }
	f := newFixture(t, false)
	f.web()
	src := netip.AddrPortFrom(client, 40300)
	front := netip.AddrPortFrom(vip, 80)
	f.converse(src, O(pSYN), R(pSYNACK), O(pACK), R(pRST))
	f.shiftLifetime(src, front, layers.IPProtocolTCP, -3) // the reset was 3 s ago
	f.converse(src, O(pACK))
	e := f.mustEntry(src, front, layers.IPProtocolTCP)
	if st := datapath.CTState(6, e.Flags); st != "established" {
		t.Fatalf("after a stray reset and traffic past the grace: %s", st)
	}
	if left := int64(e.Lifetime) - nowSec(t); left < 21598 {
		t.Fatalf("expires in %ds, want 21600", left)
	}
}

// A new SYN on a tuple whose connection is past its handshake starts a
// new flow (fresh entries, fresh backend choice); a retransmitted SYN
// does not.
func TestConntrackReopen(t *testing.T) {
	O := func(p func(*dptest.Flow)) step { return step{false, p} }
	R := func(p func(*dptest.Flow)) step { return step{true, p} }
	front := netip.AddrPortFrom(vip, 80)
	for _, c := range []struct {
		name  string
		steps []step
		fresh bool
	}{
		{"retransmitted SYN", []step{O(pSYN)}, false},
		{"after the handshake", []step{O(pSYN), R(pSYNACK), O(pACK)}, true},
		{"after time-wait", []step{O(pSYN), R(pSYNACK), O(pACK), O(pFIN), R(pFIN), O(pACK)}, true},
		{"after a reset", []step{O(pSYN), R(pSYNACK), O(pACK), O(pRST)}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t, false)
			f.web()
			moved := false
			for port := uint16(41000); port < 41030; port++ {
				src := netip.AddrPortFrom(client, port)
				first := f.converse(src, c.steps...)
				old := f.mustEntry(src, front, layers.IPProtocolTCP)
				again := f.converse(src, O(pSYN))
				e := f.mustEntry(src, front, layers.IPProtocolTCP)
				if c.fresh {
					if e.Packets != 1 || datapath.CTState(6, e.Flags) != "syn" {
						t.Fatalf("port %d: entry after the new SYN has %d packets, state %s", port, e.Packets, datapath.CTState(6, e.Flags))
					}
					if again != first {
						moved = true
						// The old flow's reply entry went with it.
						if _, ok := f.entry(first, src, layers.IPProtocolTCP); ok {
							t.Fatalf("port %d: the reply entry of the replaced flow is left", port)
						}
					}
				} else if e.Packets != old.Packets+1 || again != first {
					t.Fatalf("port %d: retransmitted SYN moved the flow (%v -> %v) or reset it (%d packets)", port, first, again, e.Packets)
				}
			}
			if c.fresh && !moved {
				t.Fatal("30 reopened flows all kept their backend: no fresh choice")
			}
		})
	}
}

// UDP: one timeout, refreshed by traffic; a reply marks the flow replied.
func TestConntrackUDP(t *testing.T) {
	f := newFixture(t, false)
	f.web()
	src := netip.AddrPortFrom(client, 33000)
	front := netip.AddrPortFrom(dnsVIP, 53)
	out := dptest.Decode(t, dptest.Run(t, f.egress, dptest.Build(t, udp(src, front))).Packet)
	if st := datapath.CTState(17, f.mustEntry(src, front, layers.IPProtocolUDP).Flags); st != "new" {
		t.Fatalf("state %s, want new", st)
	}
	dptest.Run(t, f.ingress, dptest.Build(t, udp(out.Dst, src)))
	e := f.mustEntry(src, front, layers.IPProtocolUDP)
	if st := datapath.CTState(17, e.Flags); st != "replied" {
		t.Fatalf("state %s, want replied", st)
	}
	if left := int64(e.Lifetime) - nowSec(t); left < 58 || left > 60 {
		t.Fatalf("expires in %ds, want 60", left)
	}
}

// Connections that share a tuple on the wire never share conntrack state:
// the later one gets another client port on the wire, replies of each go
// back to its own socket.
func TestTupleCollisionsAreRemapped(t *testing.T) {
	type conn struct {
		dst netip.AddrPort // what the client connects to
		be  netip.AddrPort // where it must arrive
	}
	web := netip.AddrPortFrom(vip, 80)
	direct := netip.AddrPortFrom(be1, 8080)
	other := netip.MustParseAddr("10.96.0.20")
	for _, c := range []struct {
		name  string
		proto layers.IPProtocol
		conns []conn
	}{
		{"service then direct", layers.IPProtocolTCP, []conn{{web, direct}, {direct, direct}}},
		{"direct then service", layers.IPProtocolTCP, []conn{{direct, direct}, {web, direct}}},
		{"two VIPs, one backend", layers.IPProtocolTCP, []conn{{web, direct}, {netip.AddrPortFrom(other, 80), direct}}},
		{"two ports, one backend", layers.IPProtocolTCP, []conn{{web, direct}, {netip.AddrPortFrom(vip, 8080), direct}}},
		{"all four", layers.IPProtocolTCP, []conn{{direct, direct}, {web, direct}, {netip.AddrPortFrom(other, 80), direct}, {netip.AddrPortFrom(vip, 8080), direct}}},
		{"UDP service then direct", layers.IPProtocolUDP, []conn{{web, direct}, {direct, direct}}},
		{"UDP direct then service", layers.IPProtocolUDP, []conn{{direct, direct}, {web, direct}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t, false)
			proto := model.TCP
			if c.proto == layers.IPProtocolUDP {
				proto = model.UDP
			}
			s1 := service("web", web, proto, 8080, be1)
			s1.Frontends = append(s1.Frontends, model.Frontend{Addr: netip.AddrPortFrom(vip, 8080), Proto: proto, Type: model.ClusterIP,
				Backends: []model.Backend{{Addr: direct}}})
			f.services(s1, service("other", netip.AddrPortFrom(other, 80), proto, 8080, be1))
			src := netip.AddrPortFrom(client, 40400)
			wire := map[uint16]int{}
			for i, cn := range c.conns {
				fl := dptest.Flow{Src: src, Dst: cn.dst, Proto: c.proto, SYN: true, Payload: []byte{byte(i)}}
				d := dptest.Decode(t, dptest.Run(t, f.egress, dptest.Build(t, fl)).Packet)
				if d.Dst != cn.be || d.Src.Addr() != client {
					t.Fatalf("connection %d to %v left as %v -> %v", i, cn.dst, d.Src, d.Dst)
				}
				if n, dup := wire[d.Src.Port()]; dup {
					t.Fatalf("connections %d and %d share client port %d on the wire", n, i, d.Src.Port())
				}
				wire[d.Src.Port()] = i
			}
			// Each connection's reply reaches its own socket as coming
			// from what it connected to.
			for port, i := range wire {
				cn := c.conns[i]
				fl := dptest.Flow{Src: cn.be, Dst: netip.AddrPortFrom(client, port), Proto: c.proto, SYN: true, ACK: true, Payload: []byte{byte(i)}}
				d := dptest.Decode(t, dptest.Run(t, f.ingress, dptest.Build(t, fl)).Packet)
				if d.Src != cn.dst || d.Dst != src {
					t.Fatalf("reply to connection %d (wire port %d) arrived as %v -> %v, want %v -> %v", i, port, d.Src, d.Dst, cn.dst, src)
				}
			}
			// Later packets of each keep their wire port.
			for port, i := range wire {
				fl := dptest.Flow{Src: src, Dst: c.conns[i].dst, Proto: c.proto, ACK: true}
				d := dptest.Decode(t, dptest.Run(t, f.egress, dptest.Build(t, fl)).Packet)
				if d.Src.Port() != port {
					t.Fatalf("connection %d moved from wire port %d to %d", i, port, d.Src.Port())
				}
			}
		})
	}
}

// An expired holder of a tuple does not force a new flow onto another
// port: it is removed.
func TestExpiredFlowFreesItsTuple(t *testing.T) {
	f := newFixture(t, false)
	f.services(service("web", netip.AddrPortFrom(vip, 80), model.TCP, 8080, be1))
	src := netip.AddrPortFrom(client, 40500)
	direct := netip.AddrPortFrom(be1, 8080)
	dptest.Run(t, f.egress, dptest.Build(t, tcp(src, direct)))
	f.shiftLifetime(src, direct, layers.IPProtocolTCP, -120)
	d := dptest.Decode(t, dptest.Run(t, f.egress, dptest.Build(t, tcp(src, netip.AddrPortFrom(vip, 80)))).Packet)
	if d.Src != src || d.Dst != direct {
		t.Fatalf("left as %v -> %v, want %v -> %v", d.Src, d.Dst, src, direct)
	}
	if _, ok := f.entry(src, direct, layers.IPProtocolTCP); ok {
		t.Fatal("the expired flow's entry is still there")
	}
}

// A flow whose conntrack entries cannot be written is dropped and
// counted, whichever of its two entries failed; nothing leaves
// translated without state.
func TestConntrackCreateFailureIsACountedDrop(t *testing.T) {
	for _, c := range []struct {
		name string
		size uint32
	}{
		{"no room for the reply entry", 2},
		{"no room for the original entry", 3},
	} {
		t.Run(c.name, func(t *testing.T) {
			dp := dptest.OpenWith(t, datapath.Options{MapSpec: func(name string, m *ebpf.MapSpec) {
				if name == datapath.MapCT {
					m.Type, m.MaxEntries = ebpf.Hash, c.size
				}
			}})
			dptest.Install(t, dp, lbObject(t))
			eg, _ := dp.Entry(slots.PodEgress)
			f := &fixture{t: t, dp: dp, egress: eg, rec: lbmap.NewFromDatapath(dp, nil)}
			f.web()
			// The first flow fills the map.
			dptest.Run(t, eg, dptest.Build(t, tcp(netip.AddrPortFrom(client, 40600), netip.AddrPortFrom(vip, 80))))
			res := dptest.Run(t, eg, dptest.Build(t, tcp(netip.AddrPortFrom(client, 40601), netip.AddrPortFrom(vip, 80))))
			if res.Verdict != dptest.ActShot {
				t.Fatalf("verdict %d, want a drop", res.Verdict)
			}
			if n := f.metric(slots.PodEgress, datapath.DropCTCreate); n != 1 {
				t.Fatalf("conntrack-create drops counted: %d, want 1", n)
			}
			if n, err := datapath.CountEntries(dp.CT()); err != nil || n != 2 {
				t.Fatalf("conntrack holds %d entries (%v), want the first flow's 2", n, err)
			}
		})
	}
}

// A flow whose reply entry was evicted (the LRU may take one half of a
// pair) gets it back from its next packet that moves the state or the
// lifetime, instead of translating one way only.
func TestEvictedReplyEntryIsWrittenAgain(t *testing.T) {
	O := func(p func(*dptest.Flow)) step { return step{false, p} }
	R := func(p func(*dptest.Flow)) step { return step{true, p} }
	f := newFixture(t, false)
	f.web()
	src := netip.AddrPortFrom(client, 40700)
	front := netip.AddrPortFrom(vip, 80)
	backend := f.converse(src, O(pSYN), R(pSYNACK), O(pACK))
	if err := f.dp.CT().Delete(ctKey(backend, src, layers.IPProtocolTCP)); err != nil {
		t.Fatal(err)
	}
	f.shiftOne(src, front, layers.IPProtocolTCP, -5) // a second later: the lifetime moves
	f.converse(src, O(pACK))
	r, ok := f.entry(backend, src, layers.IPProtocolTCP)
	if !ok || r.Dir != datapath.CTReply || datapath.CTState(6, r.Flags) != "established" {
		t.Fatalf("reply entry after the next packet: %+v present=%v", r, ok)
	}
	// And replies are translated again.
	fl := dptest.Flow{Src: backend, Dst: src, Proto: layers.IPProtocolTCP, ACK: true}
	if d := dptest.Decode(t, dptest.Run(t, f.ingress, dptest.Build(t, fl)).Packet); d.Src != front {
		t.Fatalf("reply arrived from %v, want %v", d.Src, front)
	}
}
