package lb

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/datapath/dptest"
	"github.com/weirnet/weir/core/lbmap"
	"github.com/weirnet/weir/core/model"
	"github.com/weirnet/weir/core/module"
	"github.com/weirnet/weir/core/slots"
	"github.com/weirnet/weir/modules/endpoints"
)

// fixture is a node datapath with the lb module installed (and endpoints,
// when a test wants local delivery), services written by the real
// reconciler.
type fixture struct {
	t       testing.TB
	dp      *datapath.Datapath
	egress  *ebpf.Program
	ingress *ebpf.Program
	rec     *lbmap.Reconciler
}

var (
	client = netip.MustParseAddr("10.244.1.10")
	vip    = netip.MustParseAddr("10.96.0.10")
	dnsVIP = netip.MustParseAddr("10.96.0.53")
	be1    = netip.MustParseAddr("10.244.1.11")
	be2    = netip.MustParseAddr("10.244.1.12")
	be3    = netip.MustParseAddr("10.244.1.13")
)

func claimsOf(cs []module.SlotClaim) map[string]string {
	out := map[string]string{}
	for _, c := range cs {
		out[c.Slot] = c.Program
	}
	return out
}

func lbObject(t testing.TB) datapath.Object {
	t.Helper()
	spec, err := (&Module{}).Object()
	if err != nil {
		t.Fatal(err)
	}
	return datapath.Object{Module: Name, Spec: spec, Slots: claimsOf(Factory.Slots)}
}

func endpointsObject(t testing.TB) datapath.Object {
	t.Helper()
	spec, err := endpoints.ObjectSpec(endpoints.DefaultSettings())
	if err != nil {
		t.Fatal(err)
	}
	return datapath.Object{Module: endpoints.Name, Spec: spec, Slots: claimsOf(endpoints.Factory.Slots)}
}

func newFixture(t testing.TB, withEndpoints bool) *fixture {
	t.Helper()
	dp := dptest.Open(t)
	objs := []datapath.Object{lbObject(t)}
	if withEndpoints {
		objs = append(objs, endpointsObject(t))
	}
	dptest.Install(t, dp, objs...)
	eg, _ := dp.Entry(slots.PodEgress)
	in, _ := dp.Entry(slots.PodIngress)
	return &fixture{t: t, dp: dp, egress: eg, ingress: in, rec: lbmap.NewFromDatapath(dp, nil)}
}

func (f *fixture) services(svcs ...*model.Service) {
	f.t.Helper()
	if err := f.rec.ApplySnapshot(&model.Snapshot{Services: svcs}); err != nil {
		f.t.Fatal(err)
	}
}

func service(name string, front netip.AddrPort, proto model.Proto, targetPort uint16, bes ...netip.Addr) *model.Service {
	fe := model.Frontend{Addr: front, Proto: proto, Type: model.ClusterIP}
	for _, b := range bes {
		fe.Backends = append(fe.Backends, model.Backend{Addr: netip.AddrPortFrom(b, targetPort)})
	}
	return &model.Service{Name: model.ServiceName{Namespace: "default", Name: name}, Frontends: []model.Frontend{fe}}
}

func (f *fixture) web() {
	f.services(
		service("web", netip.AddrPortFrom(vip, 80), model.TCP, 8080, be1, be2, be3),
		service("dns", netip.AddrPortFrom(dnsVIP, 53), model.UDP, 5353, be1, be2, be3),
	)
}

// metric returns the packets counted for a hook and reason.
func (f *fixture) metric(h slots.Hook, r datapath.Reason) uint64 {
	f.t.Helper()
	var per []datapath.Metric
	if err := f.dp.Metrics().Lookup(uint32(h)*datapath.NumReasons+uint32(r), &per); err != nil {
		f.t.Fatal(err)
	}
	var n uint64
	for _, m := range per {
		n += m.Packets
	}
	return n
}

func tcp(src, dst netip.AddrPort) dptest.Flow {
	return dptest.Flow{Src: src, Dst: dst, Proto: layers.IPProtocolTCP, SYN: true, Payload: []byte("hello")}
}

func udp(src, dst netip.AddrPort) dptest.Flow {
	return dptest.Flow{Src: src, Dst: dst, Proto: layers.IPProtocolUDP, Payload: []byte("query")}
}

func TestTCPToServiceIsTranslated(t *testing.T) {
	f := newFixture(t, false)
	f.web()
	src := netip.AddrPortFrom(client, 40000)
	in := dptest.Build(t, tcp(src, netip.AddrPortFrom(vip, 80)))
	res := dptest.Run(t, f.egress, in)
	if res.Verdict != dptest.ActOK {
		t.Fatalf("verdict %d, want TC_ACT_OK (no delivery stage: on to the stack)", res.Verdict)
	}
	d := dptest.Decode(t, res.Packet) // checksums verified here
	if d.Src != src {
		t.Fatalf("source changed to %v", d.Src)
	}
	if d.Dst.Port() != 8080 || (d.Dst.Addr() != be1 && d.Dst.Addr() != be2 && d.Dst.Addr() != be3) {
		t.Fatalf("destination %v is not a backend:8080", d.Dst)
	}
	if string(d.Payload) != "hello" || !d.TCP.SYN {
		t.Fatalf("payload or flags changed: %q SYN=%v", d.Payload, d.TCP.SYN)
	}
}

func TestUDPToServiceIsTranslated(t *testing.T) {
	f := newFixture(t, false)
	f.web()
	src := netip.AddrPortFrom(client, 33333)
	res := dptest.Run(t, f.egress, dptest.Build(t, udp(src, netip.AddrPortFrom(dnsVIP, 53))))
	d := dptest.Decode(t, res.Packet)
	if res.Verdict != dptest.ActOK || d.UDP == nil || d.Dst.Port() != 5353 || d.Src != src {
		t.Fatalf("verdict %d, packet %v -> %v", res.Verdict, d.Src, d.Dst)
	}
	if string(d.Payload) != "query" {
		t.Fatalf("payload %q", d.Payload)
	}
}

// UDP without a checksum (0) must keep none rather than get a wrong one.
func TestUDPZeroChecksumStaysZero(t *testing.T) {
	f := newFixture(t, false)
	f.web()
	in := dptest.Build(t, udp(netip.AddrPortFrom(client, 33333), netip.AddrPortFrom(dnsVIP, 53)))
	binary.BigEndian.PutUint16(in[14+20+6:], 0)
	res := dptest.Run(t, f.egress, in)
	d := dptest.Decode(t, res.Packet)
	if d.UDP.Checksum != 0 || d.Dst.Port() != 5353 {
		t.Fatalf("UDP checksum %#x dst %v, want 0 and port 5353", d.UDP.Checksum, d.Dst)
	}
}

func TestReplyIsReverseTranslated(t *testing.T) {
	for _, proto := range []layers.IPProtocol{layers.IPProtocolTCP, layers.IPProtocolUDP} {
		t.Run(proto.String(), func(t *testing.T) {
			f := newFixture(t, false)
			f.web()
			front := netip.AddrPortFrom(vip, 80)
			if proto == layers.IPProtocolUDP {
				front = netip.AddrPortFrom(dnsVIP, 53)
			}
			src := netip.AddrPortFrom(client, 41000)
			fl := dptest.Flow{Src: src, Dst: front, Proto: proto, SYN: true}
			out := dptest.Decode(t, dptest.Run(t, f.egress, dptest.Build(t, fl)).Packet)
			backend := out.Dst

			reply := dptest.Flow{Src: backend, Dst: src, Proto: proto, SYN: true, ACK: true, Payload: []byte("answer")}
			res := dptest.Run(t, f.ingress, dptest.Build(t, reply))
			d := dptest.Decode(t, res.Packet)
			if res.Verdict != dptest.ActOK {
				t.Fatalf("reply verdict %d", res.Verdict)
			}
			if d.Src != front || d.Dst != src {
				t.Fatalf("reply %v -> %v, want %v -> %v", d.Src, d.Dst, front, src)
			}
			if string(d.Payload) != "answer" {
				t.Fatalf("payload %q", d.Payload)
			}
		})
	}
}

func TestNonServiceTrafficIsUntouched(t *testing.T) {
	f := newFixture(t, false)
	f.web()
	cases := []dptest.Flow{
		tcp(netip.AddrPortFrom(client, 40000), netip.AddrPortFrom(be1, 8080)),         // pod to pod
		tcp(netip.AddrPortFrom(client, 40000), netip.AddrPortFrom(vip, 81)),           // service address, other port
		udp(netip.AddrPortFrom(client, 40000), netip.AddrPortFrom(vip, 80)),           // service port, other protocol
		udp(netip.AddrPortFrom(client, 40000), netip.MustParseAddrPort("1.1.1.1:53")), // outside
	}
	for _, c := range cases {
		in := dptest.Build(t, c)
		for _, prog := range []*ebpf.Program{f.egress, f.ingress} {
			res := dptest.Run(t, prog, in)
			if res.Verdict != dptest.ActOK || !bytes.Equal(res.Packet, in) {
				t.Errorf("%v -> %v %v: verdict %d, packet changed=%v", c.Src, c.Dst, c.Proto, res.Verdict, !bytes.Equal(res.Packet, in))
			}
		}
	}
	// A reply-shaped packet with no conntrack entry is not translated.
	stray := dptest.Build(t, tcp(netip.AddrPortFrom(be1, 8080), netip.AddrPortFrom(client, 40000)))
	if res := dptest.Run(t, f.ingress, stray); !bytes.Equal(res.Packet, stray) {
		t.Error("a packet without conntrack entry was reverse-translated")
	}
}

func TestFlowKeepsItsBackend(t *testing.T) {
	f := newFixture(t, false)
	f.web()
	seen := map[netip.Addr]int{}
	for port := uint16(20000); port < 20300; port++ {
		src := netip.AddrPortFrom(client, port)
		first := dptest.Decode(t, dptest.Run(t, f.egress, dptest.Build(t, tcp(src, netip.AddrPortFrom(vip, 80)))).Packet).Dst
		seen[first.Addr()]++
		// Every later packet of the flow (ACKs, data) goes to the same one.
		for range 5 {
			fl := tcp(src, netip.AddrPortFrom(vip, 80))
			fl.SYN, fl.ACK = false, true
			if got := dptest.Decode(t, dptest.Run(t, f.egress, dptest.Build(t, fl)).Packet).Dst; got != first {
				t.Fatalf("flow from %v moved from %v to %v", src, first, got)
			}
		}
	}
	// 300 flows over 3 backends: each gets a fair share (expected 100;
	// below 50 would be a broken choice, not bad luck: p < 1e-9).
	for _, b := range []netip.Addr{be1, be2, be3} {
		if seen[b] < 50 {
			t.Errorf("backend %v got %d of 300 flows: %v", b, seen[b], seen)
		}
	}
}

// sessionAffinity ClientIP: every new flow of a client goes to the backend
// it got first, while other clients still spread; once the timeout passed,
// the client is balanced afresh.
func TestSessionAffinity(t *testing.T) {
	f := newFixture(t, false)
	web := service("web", netip.AddrPortFrom(vip, 80), model.TCP, 8080, be1, be2, be3)
	web.AffinityTimeout = 1
	f.services(web)
	first := map[netip.Addr]netip.Addr{}
	seen := map[netip.Addr]bool{}
	for c := range 30 {
		cl := netip.AddrFrom4([4]byte{10, 244, 2, byte(c + 1)})
		for port := uint16(40000); port < 40010; port++ {
			d := dptest.Decode(t, dptest.Run(t, f.egress, dptest.Build(t, tcp(netip.AddrPortFrom(cl, port), netip.AddrPortFrom(vip, 80)))).Packet)
			if b, ok := first[cl]; ok && b != d.Dst.Addr() {
				t.Fatalf("client %v moved from %v to %v on a new flow", cl, b, d.Dst.Addr())
			}
			first[cl] = d.Dst.Addr()
			seen[d.Dst.Addr()] = true
		}
	}
	if len(seen) != 3 {
		t.Fatalf("30 clients reached only %v", seen)
	}
	// After the timeout a client may land anywhere. Time passes by
	// moving the client's affinity entry into the past (lifetimes count
	// whole seconds): over 30 such new flows it must not always get the
	// backend it had ((1/3)^30 by chance); within the timeout it always
	// does.
	cl := netip.MustParseAddr("10.244.2.1")
	var rn datapath.ServiceValue
	if err := f.dp.Services().Lookup(datapath.ServiceKey{Addr: datapath.AddrToBE(vip), Port: datapath.PortToBE(80), Proto: 6}, &rn); err != nil {
		t.Fatal(err)
	}
	key := datapath.AffinityKey{Client: datapath.AddrToBE(cl), RevNat: rn.RevNat}
	age := func(by uint32) {
		var a datapath.Affinity
		if err := f.dp.Affinity().Lookup(key, &a); err != nil {
			t.Fatal(err)
		}
		a.LastUsed -= by
		if err := f.dp.Affinity().Put(key, a); err != nil {
			t.Fatal(err)
		}
	}
	moved := false
	for i := range 30 {
		age(2)
		d := dptest.Decode(t, dptest.Run(t, f.egress, dptest.Build(t, tcp(netip.AddrPortFrom(cl, uint16(41000+i)), netip.AddrPortFrom(vip, 80)))).Packet)
		if d.Dst.Addr() != first[cl] {
			moved = true
		}
		first[cl] = d.Dst.Addr()
		// Within the timeout, the next flow sticks.
		again := dptest.Decode(t, dptest.Run(t, f.egress, dptest.Build(t, tcp(netip.AddrPortFrom(cl, uint16(42000+i)), netip.AddrPortFrom(vip, 80)))).Packet)
		if again.Dst.Addr() != first[cl] {
			t.Fatalf("within the timeout, client %v moved from %v to %v", cl, first[cl], again.Dst.Addr())
		}
	}
	if !moved {
		t.Fatal("affinity outlived its timeout")
	}
}

func TestRemovedBackendGetsNoFlows(t *testing.T) {
	f := newFixture(t, false)
	f.web()
	f.services(service("web", netip.AddrPortFrom(vip, 80), model.TCP, 8080, be1, be3))
	for port := uint16(30000); port < 30200; port++ {
		d := dptest.Decode(t, dptest.Run(t, f.egress, dptest.Build(t, tcp(netip.AddrPortFrom(client, port), netip.AddrPortFrom(vip, 80)))).Packet)
		if d.Dst.Addr() == be2 {
			t.Fatalf("new flow %d went to removed backend %v", port, be2)
		}
	}
}

// A flow whose backend disappears picks a live one; a flow whose backend is
// terminating keeps it.
func TestExistingFlowsAndBackendChanges(t *testing.T) {
	f := newFixture(t, false)
	f.services(service("web", netip.AddrPortFrom(vip, 80), model.TCP, 8080, be1))
	src := netip.AddrPortFrom(client, 45000)
	ack := tcp(src, netip.AddrPortFrom(vip, 80))
	ack.SYN, ack.ACK = false, true
	dptest.Run(t, f.egress, dptest.Build(t, tcp(src, netip.AddrPortFrom(vip, 80))))

	// be1 terminating, be2 active: the existing flow stays on be1.
	term := service("web", netip.AddrPortFrom(vip, 80), model.TCP, 8080, be2)
	term.Frontends[0].Backends = append(term.Frontends[0].Backends, model.Backend{Addr: netip.AddrPortFrom(be1, 8080), State: model.Terminating})
	f.services(term)
	if got := dptest.Decode(t, dptest.Run(t, f.egress, dptest.Build(t, ack)).Packet).Dst.Addr(); got != be1 {
		t.Fatalf("flow on a terminating backend moved to %v", got)
	}
	// New flows do not go to the terminating backend.
	for port := uint16(46000); port < 46100; port++ {
		if got := dptest.Decode(t, dptest.Run(t, f.egress, dptest.Build(t, tcp(netip.AddrPortFrom(client, port), netip.AddrPortFrom(vip, 80)))).Packet).Dst.Addr(); got != be2 {
			t.Fatalf("new flow went to %v, want only %v", got, be2)
		}
	}
	// be1 removed: the flow is re-balanced to a live backend.
	f.services(service("web", netip.AddrPortFrom(vip, 80), model.TCP, 8080, be2))
	if got := dptest.Decode(t, dptest.Run(t, f.egress, dptest.Build(t, ack)).Packet).Dst.Addr(); got != be2 {
		t.Fatalf("flow of a removed backend went to %v, want %v", got, be2)
	}
}

// A service without any endpoint is rejected as kube-proxy rejects it:
// TCP gets a reset and UDP an ICMP port unreachable, from the address the
// client called, sent back toward the client; one whose endpoints exist but
// none serves this traffic (internalTrafficPolicy Local, remote ones only)
// drops.
func TestServiceWithoutEndpointsIsRejected(t *testing.T) {
	localVIP := netip.MustParseAddr("10.96.0.77")
	f := newFixture(t, false)
	local := service("local", netip.AddrPortFrom(localVIP, 80), model.TCP, 8080, be1)
	local.Frontends[0].InternalLocal = true
	local.Frontends[0].Backends[0].NodeName = "elsewhere"
	f.services(service("empty", netip.AddrPortFrom(vip, 80), model.TCP, 8080),
		service("empty-udp", netip.AddrPortFrom(dnsVIP, 53), model.UDP, 5353), local)

	syn := dptest.Build(t, tcp(netip.AddrPortFrom(client, 40000), netip.AddrPortFrom(vip, 80)))
	res := dptest.Run(t, f.egress, syn)
	if res.Verdict != dptest.ActRedirect {
		t.Fatalf("TCP to a service without endpoints: verdict %d, want a reset sent back", res.Verdict)
	}
	rst := dptest.Decode(t, res.Packet)
	if rst.TCP == nil || !rst.TCP.RST || !rst.TCP.ACK || rst.Src != netip.AddrPortFrom(vip, 80) || rst.Dst != netip.AddrPortFrom(client, 40000) {
		t.Fatalf("reset %+v from %v to %v; want RST|ACK from the service to the client", rst.TCP, rst.Src, rst.Dst)
	}
	in := dptest.Decode(t, syn)
	// The SYN and its 5 bytes of payload are acknowledged.
	if want := in.TCP.Seq + 1 + uint32(len(in.Payload)); rst.TCP.Ack != want {
		t.Errorf("reset acknowledges %d, want %d", rst.TCP.Ack, want)
	}

	res = dptest.Run(t, f.egress, dptest.Build(t, udp(netip.AddrPortFrom(client, 40001), netip.AddrPortFrom(dnsVIP, 53))))
	if res.Verdict != dptest.ActRedirect {
		t.Fatalf("UDP to a service without endpoints: verdict %d, want an ICMP error sent back", res.Verdict)
	}
	icmp := dptest.DecodeICMP(t, res.Packet)
	if icmp.Type != 3 || icmp.Code != 3 || icmp.Src != dnsVIP || icmp.Dst != client || icmp.Inner.Dst != netip.AddrPortFrom(dnsVIP, 53) {
		t.Errorf("ICMP %d/%d from %v to %v quoting %v; want port unreachable from the service quoting the datagram", icmp.Type, icmp.Code, icmp.Src, icmp.Dst, icmp.Inner.Dst)
	}
	if n := f.metric(slots.PodEgress, datapath.RejectNoEndpoints); n != 2 {
		t.Errorf("rejections counted: %d, want 2", n)
	}

	res = dptest.Run(t, f.egress, dptest.Build(t, tcp(netip.AddrPortFrom(client, 40002), netip.AddrPortFrom(localVIP, 80))))
	if res.Verdict != dptest.ActShot {
		t.Fatalf("TCP to a service whose endpoints all are elsewhere (internalTrafficPolicy Local): verdict %d, want drop", res.Verdict)
	}
	if n := f.metric(slots.PodEgress, datapath.DropNoBackend); n != 1 {
		t.Fatalf("no-backend drops counted: %d, want 1", n)
	}
}

// Malformed and truncated packets are dropped with their reason counted;
// none of them crashes or gets translated. (BPF_PROG_TEST_RUN refuses IPv4
// frames shorter than 34 bytes, so a cut IPv4 header is sent for real from a
// lab pod in core/lab's end-to-end tests.)
func TestMalformedPacketsAreCountedDrops(t *testing.T) {
	f := newFixture(t, true)
	f.web()
	good := func() []byte {
		return dptest.Build(t, tcp(netip.AddrPortFrom(client, 40000), netip.AddrPortFrom(vip, 80)))
	}
	goodUDP := func() []byte {
		return dptest.Build(t, udp(netip.AddrPortFrom(client, 40000), netip.AddrPortFrom(dnsVIP, 53)))
	}
	cases := []struct {
		name   string
		pkt    []byte
		reason datapath.Reason
	}{
		{"IHL below 5", func() []byte { p := good(); p[14] = 0x44; return p }(), datapath.DropIPBadHeader},
		{"version 6 in an IPv4 frame", func() []byte { p := good(); p[14] = 0x65; return p }(), datapath.DropIPBadHeader},
		{"total length beyond the frame", func() []byte { p := good(); binary.BigEndian.PutUint16(p[16:], 1500); return p }(), datapath.DropIPBadLength},
		{"total length below the header", func() []byte { p := good(); binary.BigEndian.PutUint16(p[16:], 10); return p }(), datapath.DropIPBadLength},
		{"TCP header cut short", func() []byte {
			p := good()[:14+20+10]
			binary.BigEndian.PutUint16(p[16:], 30)
			return p
		}(), datapath.DropL4Truncated},
		{"TCP data offset below 5", func() []byte { p := good(); p[14+20+12] = 0x30; return p }(), datapath.DropTCPBadOffset},
		{"TCP data offset beyond the segment", func() []byte { p := good(); p[14+20+12] = 0xf0; return p }(), datapath.DropTCPBadOffset},
		{"UDP header cut short", func() []byte {
			p := goodUDP()[:14+20+4]
			binary.BigEndian.PutUint16(p[16:], 24)
			return p
		}(), datapath.DropL4Truncated},
		{"ARP cut short", append(bytes.Repeat([]byte{0xff}, 12), 0x08, 0x06, 0, 1, 8, 0), datapath.DropARPMalformed},
		{"ARP for IPv6", func() []byte {
			p := arpRequest(client, netip.MustParseAddr("169.254.1.1"))
			p[16] = 0x86
			p[17] = 0xdd
			return p
		}(), datapath.DropARPMalformed},
		{"IPv6 frame", func() []byte { p := good(); p[12], p[13] = 0x86, 0xdd; return p }(), datapath.DropUnsupportedL3},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := f.metric(slots.PodEgress, c.reason)
			res := dptest.Run(t, f.egress, c.pkt)
			if res.Verdict != dptest.ActShot {
				t.Fatalf("verdict %d, want drop", res.Verdict)
			}
			if got := f.metric(slots.PodEgress, c.reason) - before; got != 1 {
				t.Fatalf("reason %q counted %d times, want 1", c.reason, got)
			}
		})
	}
}

// Local delivery: with endpoints, a translated packet for a local backend
// goes through the pod-ingress stages and is redirected into the pod, with
// the pod's MAC, the gateway's MAC and the TTL decremented; the reply is
// reverse-translated on its way back to the client.
func TestLocalDeliveryThroughBothHooks(t *testing.T) {
	f := newFixture(t, true)
	f.services(service("web", netip.AddrPortFrom(vip, 80), model.TCP, 8080, be1))
	podMAC := net.HardwareAddr{0x0a, 0, 0, 0, 0, 0x11}
	gwMAC := net.HardwareAddr{0x0a, 0, 0, 0, 0, 0xee}
	clientMAC := net.HardwareAddr{0x0a, 0, 0, 0, 0, 0x10}
	putEndpoint(t, f.dp, be1, 1, podMAC, gwMAC)
	putEndpoint(t, f.dp, client, 1, clientMAC, gwMAC)

	src := netip.AddrPortFrom(client, 42000)
	res := dptest.Run(t, f.egress, dptest.Build(t, tcp(src, netip.AddrPortFrom(vip, 80))))
	if res.Verdict != dptest.ActRedirect {
		t.Fatalf("verdict %d, want TC_ACT_REDIRECT", res.Verdict)
	}
	d := dptest.Decode(t, res.Packet)
	if d.Dst != netip.AddrPortFrom(be1, 8080) || d.IP.TTL != 63 {
		t.Fatalf("delivered %v TTL %d, want %v TTL 63", d.Dst, d.IP.TTL, netip.AddrPortFrom(be1, 8080))
	}
	if !bytes.Equal(d.Eth.DstMAC, podMAC) || !bytes.Equal(d.Eth.SrcMAC, gwMAC) {
		t.Fatalf("MACs %v -> %v, want %v -> %v", d.Eth.SrcMAC, d.Eth.DstMAC, gwMAC, podMAC)
	}

	reply := dptest.Flow{Src: netip.AddrPortFrom(be1, 8080), Dst: src, Proto: layers.IPProtocolTCP, SYN: true, ACK: true}
	res = dptest.Run(t, f.egress, dptest.Build(t, reply))
	d = dptest.Decode(t, res.Packet)
	if res.Verdict != dptest.ActRedirect || d.Src != netip.AddrPortFrom(vip, 80) || !bytes.Equal(d.Eth.DstMAC, clientMAC) {
		t.Fatalf("reply verdict %d, %v -> %v to %v", res.Verdict, d.Src, d.Dst, d.Eth.DstMAC)
	}
}

func TestTTLExhaustedIsDropped(t *testing.T) {
	f := newFixture(t, true)
	putEndpoint(t, f.dp, be1, 1, net.HardwareAddr{2, 0, 0, 0, 0, 1}, net.HardwareAddr{2, 0, 0, 0, 0, 2})
	fl := tcp(netip.AddrPortFrom(client, 40000), netip.AddrPortFrom(be1, 8080))
	fl.TTL = 1
	res := dptest.Run(t, f.egress, dptest.Build(t, fl))
	if res.Verdict != dptest.ActShot || f.metric(slots.PodIngress, datapath.DropTTLExceeded) != 1 {
		t.Fatalf("verdict %d, TTL drops %d", res.Verdict, f.metric(slots.PodIngress, datapath.DropTTLExceeded))
	}
}

func putEndpoint(t testing.TB, dp *datapath.Datapath, a netip.Addr, ifindex uint32, mac, gw net.HardwareAddr) {
	t.Helper()
	v := datapath.Endpoint{Ifindex: ifindex}
	copy(v.Mac[:], mac)
	copy(v.NodeMac[:], gw)
	if err := dp.Endpoints().Put(datapath.EndpointKey{Addr: datapath.AddrToBE(a)}, v); err != nil {
		t.Fatal(err)
	}
}

func arpRequest(sender, target netip.Addr) []byte {
	b := make([]byte, 42)
	copy(b[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(b[6:12], dptest.PodMAC)
	b[12], b[13] = 0x08, 0x06
	binary.BigEndian.PutUint16(b[14:], 1)      // Ethernet
	binary.BigEndian.PutUint16(b[16:], 0x0800) // IPv4
	b[18], b[19] = 6, 4
	binary.BigEndian.PutUint16(b[20:], 1) // request
	copy(b[22:28], dptest.PodMAC)
	s, tg := sender.As4(), target.As4()
	copy(b[28:32], s[:])
	copy(b[38:42], tg[:])
	return b
}

func TestARPForTheGatewayIsAnswered(t *testing.T) {
	f := newFixture(t, true)
	gw := netip.MustParseAddr("169.254.1.1")
	gwMAC := net.HardwareAddr{0x0a, 0, 0, 0, 0, 0xee}
	putEndpoint(t, f.dp, client, 1, dptest.PodMAC, gwMAC)

	res := dptest.Run(t, f.egress, arpRequest(client, gw))
	if res.Verdict != dptest.ActRedirect {
		t.Fatalf("verdict %d, want redirect back to the pod", res.Verdict)
	}
	p := res.Packet
	c4, g4 := client.As4(), gw.As4()
	if !bytes.Equal(p[0:6], dptest.PodMAC) || !bytes.Equal(p[6:12], gwMAC) ||
		binary.BigEndian.Uint16(p[20:]) != 2 || !bytes.Equal(p[22:28], gwMAC) ||
		!bytes.Equal(p[28:32], g4[:]) || !bytes.Equal(p[32:38], dptest.PodMAC) || !bytes.Equal(p[38:42], c4[:]) {
		t.Fatalf("ARP reply is wrong: % x", p[:42])
	}

	// Not for the gateway, or from an unknown sender: not answered.
	for _, req := range [][]byte{arpRequest(client, be1), arpRequest(be2, gw)} {
		if res := dptest.Run(t, f.egress, req); res.Verdict != dptest.ActOK || !bytes.Equal(res.Packet, req) {
			t.Fatalf("ARP %x answered (verdict %d)", req[28:42], res.Verdict)
		}
	}
}

// With no module installed every slot is empty and every packet falls
// through unchanged: a missing optional module costs nothing but a miss.
func TestEmptySlotsFallThrough(t *testing.T) {
	dp := dptest.Open(t)
	dptest.Install(t, dp)
	eg, _ := dp.Entry(slots.PodEgress)
	in := dptest.Build(t, tcp(netip.AddrPortFrom(client, 40000), netip.AddrPortFrom(vip, 80)))
	if res := dptest.Run(t, eg, in); res.Verdict != dptest.ActOK || !bytes.Equal(res.Packet, in) {
		t.Fatalf("verdict %d, changed=%v", res.Verdict, !bytes.Equal(res.Packet, in))
	}
}

// An install that fails leaves the running stages in place.
func TestFailedInstallKeepsRunningStages(t *testing.T) {
	dp := dptest.Open(t)
	dptest.Install(t, dp, lbObject(t))
	bad := lbObject(t)
	bad.Slots = map[string]string{"pod-egress/lb": "no_such_program"}
	if _, err := dp.Install([]datapath.Object{endpointsObject(t), bad}); err == nil {
		t.Fatal("install with a missing program succeeded")
	}
	for _, s := range []string{"pod-egress/lb", "pod-ingress/lb-revnat"} {
		if ok, err := dp.SlotFilled(s); err != nil || !ok {
			t.Fatalf("slot %s emptied by a failed install (%v)", s, err)
		}
	}
	if ok, _ := dp.SlotFilled("pod-egress/arp"); ok {
		t.Fatal("slot of the failed install was filled")
	}
}

// FuzzEntry feeds arbitrary frames to the pod-egress and pod-ingress entry
// programs: the verdict is always one of ours and nothing panics.
func FuzzEntry(f *testing.F) {
	seeds := [][]byte{
		arpRequest(client, netip.MustParseAddr("169.254.1.1")),
		make([]byte, 14),
	}
	for _, fl := range []dptest.Flow{
		tcp(netip.AddrPortFrom(client, 40000), netip.AddrPortFrom(vip, 80)),
		udp(netip.AddrPortFrom(client, 40000), netip.AddrPortFrom(dnsVIP, 53)),
	} {
		b, err := dptest.BuildErr(fl)
		if err != nil {
			f.Fatal(err)
		}
		seeds = append(seeds, b)
	}
	for _, s := range seeds {
		f.Add(s)
	}
	// One datapath for every input: it lives as long as the fuzz target.
	fx := newFixture(f, true)
	fx.web()
	putEndpoint(f, fx.dp, be1, 1, net.HardwareAddr{2, 0, 0, 0, 0, 1}, net.HardwareAddr{2, 0, 0, 0, 0, 2})
	f.Fuzz(func(t *testing.T, frame []byte) {
		if len(frame) < 14 || len(frame) > 9000 {
			return
		}
		for _, prog := range []*ebpf.Program{fx.egress, fx.ingress} {
			ret, err := prog.Run(&ebpf.RunOptions{Data: frame, DataOut: make([]byte, len(frame)+256)})
			if errors.Is(err, unix.EINVAL) {
				return // the kernel refuses some frames (short IPv4) before our program runs
			}
			if err != nil {
				t.Fatalf("test run: %v", err)
			}
			if ret != dptest.ActOK && ret != dptest.ActShot && ret != dptest.ActRedirect {
				t.Fatalf("verdict %d", ret)
			}
		}
	})
}
