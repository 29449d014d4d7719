package lb

import (
	"bytes"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket/layers"

	"github.com/weirnet/weir/core/datapath/dptest"
)

// A 4000-byte datagram to a ClusterIP, in fragments, reaches the backend
// whole (every fragment addressed to it, the UDP checksum right over the
// reassembled datagram), and so does a 4000-byte answer on its way back.
func TestFragmentedUDPThroughAService(t *testing.T) {
	for _, zeroSum := range []bool{false, true} {
		name := "checksum"
		if zeroSum {
			name = "no checksum"
		}
		t.Run(name, func(t *testing.T) {
			f := newFixture(t, false)
			f.web()
			src := netip.AddrPortFrom(client, 34000)
			front := netip.AddrPortFrom(dnsVIP, 53)
			big := bytes.Repeat([]byte("0123456789abcdef"), 250)
			req := dptest.Build(t, dptest.Flow{Src: src, Dst: front, Proto: layers.IPProtocolUDP, Payload: big})
			if zeroSum {
				req[14+20+6], req[14+20+7] = 0, 0
			}
			var out [][]byte
			for i, frag := range dptest.Fragment(t, req, 1480) {
				res := dptest.Run(t, f.egress, frag)
				if res.Verdict != dptest.ActOK {
					t.Fatalf("fragment %d: verdict %d", i, res.Verdict)
				}
				out = append(out, res.Packet[:len(frag)])
			}
			whole := dptest.Decode(t, dptest.Reassemble(t, out))
			if whole.Dst.Port() != 5353 || whole.Src != src || !bytes.Equal(whole.Payload, big) {
				t.Fatalf("reassembled %v -> %v, %d bytes", whole.Src, whole.Dst, len(whole.Payload))
			}
			if zeroSum && whole.UDP.Checksum != 0 {
				t.Fatalf("UDP checksum %#x, want 0 kept", whole.UDP.Checksum)
			}
			backend := whole.Dst

			ans := dptest.Build(t, dptest.Flow{Src: backend, Dst: src, Proto: layers.IPProtocolUDP, Payload: big})
			out = nil
			for i, frag := range dptest.Fragment(t, ans, 1480) {
				res := dptest.Run(t, f.ingress, frag)
				if res.Verdict != dptest.ActOK {
					t.Fatalf("answer fragment %d: verdict %d", i, res.Verdict)
				}
				out = append(out, res.Packet[:len(frag)])
			}
			back := dptest.Decode(t, dptest.Reassemble(t, out))
			if back.Src != front || back.Dst != src || !bytes.Equal(back.Payload, big) {
				t.Fatalf("answer reassembled as %v -> %v, %d bytes", back.Src, back.Dst, len(back.Payload))
			}
		})
	}
}

// A later fragment whose first fragment was never seen is left alone:
// there is nothing to translate it by.
func TestLaterFragmentWithoutFirstIsUntouched(t *testing.T) {
	f := newFixture(t, false)
	f.web()
	req := dptest.Build(t, dptest.Flow{Src: netip.AddrPortFrom(client, 34001), Dst: netip.AddrPortFrom(dnsVIP, 53),
		Proto: layers.IPProtocolUDP, Payload: bytes.Repeat([]byte("x"), 3000)})
	later := dptest.Fragment(t, req, 1480)[1]
	res := dptest.Run(t, f.egress, later)
	if res.Verdict != dptest.ActOK || !bytes.Equal(res.Packet[:len(later)], later) {
		t.Fatalf("verdict %d, changed=%v", res.Verdict, !bytes.Equal(res.Packet[:len(later)], later))
	}
}

// ICMP errors about translated flows are translated back: the client
// hears of its own packet, as it sent it, from the address it sent it to.
func TestICMPErrorsAreTranslated(t *testing.T) {
	const unreach, portUnreach, fragNeeded = 3, 3, 4
	node := netip.MustParseAddr("192.168.100.12")
	for _, c := range []struct {
		name      string
		proto     layers.IPProtocol
		front     netip.AddrPort
		fromPeer  bool // the backend itself sends the error (else a node on the path)
		code      uint8
		wantOuter func(front netip.AddrPort) netip.Addr
		noSum     bool // the client's UDP datagram carries no checksum
	}{
		{"port unreachable from a UDP backend", layers.IPProtocolUDP, netip.AddrPortFrom(dnsVIP, 53), true, portUnreach,
			func(fr netip.AddrPort) netip.Addr { return fr.Addr() }, false},
		{"fragmentation needed from a node, TCP", layers.IPProtocolTCP, netip.AddrPortFrom(vip, 80), false, fragNeeded,
			func(netip.AddrPort) netip.Addr { return node }, false},
		{"fragmentation needed from a node, UDP", layers.IPProtocolUDP, netip.AddrPortFrom(dnsVIP, 53), false, fragNeeded,
			func(netip.AddrPort) netip.Addr { return node }, false},
		{"port unreachable quoting a datagram without checksum", layers.IPProtocolUDP, netip.AddrPortFrom(dnsVIP, 53), true, portUnreach,
			func(fr netip.AddrPort) netip.Addr { return fr.Addr() }, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t, false)
			f.web()
			src := netip.AddrPortFrom(client, 35000)
			sent := dptest.Build(t, dptest.Flow{Src: src, Dst: c.front, Proto: c.proto, SYN: true, Payload: []byte("data")})
			if c.noSum {
				sent[14+20+6], sent[14+20+7] = 0, 0
			}
			onWire := dptest.Run(t, f.egress, sent).Packet[:len(sent)]
			backend := dptest.Decode(t, onWire).Dst
			from := node
			if c.fromPeer {
				from = backend.Addr()
			}
			// The error quotes the packet as it was on the wire, whole.
			icmp := dptest.ICMPError(t, from, client, unreach, c.code, 1400, onWire[14:])
			res := dptest.Run(t, f.ingress, icmp)
			if res.Verdict != dptest.ActOK {
				t.Fatalf("verdict %d", res.Verdict)
			}
			d := dptest.DecodeICMP(t, res.Packet[:len(icmp)]) // every checksum verified
			if d.Src != c.wantOuter(c.front) || d.Dst != client || d.Type != unreach || d.Code != c.code {
				t.Fatalf("error from %v to %v type %d/%d", d.Src, d.Dst, d.Type, d.Code)
			}
			if d.Inner.Src != src || d.Inner.Dst != c.front {
				t.Fatalf("quoted packet %v -> %v, want what the client sent: %v -> %v", d.Inner.Src, d.Inner.Dst, src, c.front)
			}
			if !bytes.Equal(d.Inner.Payload, []byte("data")) {
				t.Fatalf("quoted payload %q", d.Inner.Payload)
			}
			if c.noSum && d.Inner.UDP.Checksum != 0 {
				t.Fatalf("quoted UDP checksum %#x, want 0 kept", d.Inner.UDP.Checksum)
			}
		})
	}
}

// Only the first 8 bytes of the quoted L4 header are promised: an error
// quoting no more still gets its addresses and ports translated.
func TestICMPErrorWithShortQuote(t *testing.T) {
	f := newFixture(t, false)
	f.web()
	src := netip.AddrPortFrom(client, 35100)
	sent := dptest.Build(t, tcp(src, netip.AddrPortFrom(vip, 80)))
	onWire := dptest.Run(t, f.egress, sent).Packet[:len(sent)]
	backend := dptest.Decode(t, onWire).Dst
	icmp := dptest.ICMPError(t, backend.Addr(), client, 3, 1, 0, onWire[14:14+28])
	res := dptest.Run(t, f.ingress, icmp)
	d := dptest.DecodeICMP(t, res.Packet[:len(icmp)])
	if d.Src != vip || d.Inner.Src != src || d.Inner.Dst != netip.AddrPortFrom(vip, 80) {
		t.Fatalf("error from %v quoting %v -> %v", d.Src, d.Inner.Src, d.Inner.Dst)
	}
}

// The client's own ICMP error about a reply it got from the service goes
// to the backend, about the packet the backend sent.
func TestICMPErrorFromTheClientIsTranslated(t *testing.T) {
	f := newFixture(t, false)
	f.web()
	src := netip.AddrPortFrom(client, 35200)
	front := netip.AddrPortFrom(dnsVIP, 53)
	backend := dptest.Decode(t, dptest.Run(t, f.egress, dptest.Build(t, udp(src, front))).Packet).Dst
	reply := dptest.Build(t, udp(backend, src))
	delivered := dptest.Run(t, f.ingress, reply).Packet[:len(reply)]
	icmp := dptest.ICMPError(t, client, front.Addr(), 3, 3, 0, delivered[14:])
	res := dptest.Run(t, f.egress, icmp)
	d := dptest.DecodeICMP(t, res.Packet[:len(icmp)])
	if d.Src != client || d.Dst != backend.Addr() || d.Inner.Src != backend || d.Inner.Dst != src {
		t.Fatalf("error %v -> %v quoting %v -> %v", d.Src, d.Dst, d.Inner.Src, d.Inner.Dst)
	}
}

// ICMP errors about flows Weir does not know, and ICMP that is not an
// error, pass unchanged.
func TestUnrelatedICMPIsUntouched(t *testing.T) {
	f := newFixture(t, false)
	f.web()
	other := dptest.Build(t, udp(netip.AddrPortFrom(client, 35300), netip.MustParseAddrPort("10.244.9.9:53")))
	for _, pkt := range [][]byte{
		dptest.ICMPError(t, netip.MustParseAddr("10.244.9.9"), client, 3, 3, 0, other[14:]),
		dptest.ICMPError(t, netip.MustParseAddr("10.244.9.9"), client, 8, 0, 0, []byte("ping-payload")),
	} {
		for _, prog := range []*struct{ name string }{{"egress"}, {"ingress"}} {
			p := f.ingress
			if prog.name == "egress" {
				p = f.egress
			}
			res := dptest.Run(t, p, pkt)
			if res.Verdict != dptest.ActOK || !bytes.Equal(res.Packet[:len(pkt)], pkt) {
				t.Fatalf("%s: verdict %d, changed=%v", prog.name, res.Verdict, !bytes.Equal(res.Packet[:len(pkt)], pkt))
			}
		}
	}
}
