package tunnel

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/vishvananda/netlink"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/datapath/dptest"
	"github.com/weirnet/weir/core/ipcache"
	"github.com/weirnet/weir/core/model"
	"github.com/weirnet/weir/core/module"
	"github.com/weirnet/weir/core/netns"
	"github.com/weirnet/weir/core/node"
	"github.com/weirnet/weir/core/slots"
	"github.com/weirnet/weir/modules/endpoints"
)

var (
	self     = netip.MustParseAddr("192.168.100.11")
	peer     = netip.MustParseAddr("192.168.100.12")
	localPod = netip.MustParseAddr("10.244.1.10")
	peerPod  = netip.MustParseAddr("10.244.2.20")
	podMAC   = net.HardwareAddr{0x0a, 0, 0, 0, 0, 0x10}
	gwMAC    = net.HardwareAddr{0x0a, 0, 0, 0, 0, 0xee}
)

type fixture struct {
	dp             *datapath.Datapath
	egress, uplink *ebpf.Program
}

func claims(cs []module.SlotClaim) map[string]string {
	out := map[string]string{}
	for _, c := range cs {
		out[c.Slot] = c.Program
	}
	return out
}

// newFixture installs endpoints and the tunnel for node "n1" (uplink on
// loopback) with peer "n2" tunnelling the same way.
func newFixture(t *testing.T, s *Settings) *fixture {
	return newFixtureOn(t, s, node.Uplink{Name: "lo", Index: 1, MTU: 65536, IP: self})
}

// uplinkNetns makes a namespace with a veth of the given MTU to serve as
// the uplink; programs must run inside it (BPF_PROG_TEST_RUN resolves
// devices in the caller's namespace).
func uplinkNetns(t *testing.T, mtu int) (string, node.Uplink) {
	t.Helper()
	u := dptest.UniqueName(t)
	name := "wt-tun-" + u[len(u)-8:]
	path, err := netns.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = netns.Delete(name) })
	h, err := netns.Handle(path)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "upl", MTU: mtu}, PeerName: "upl-peer"}); err != nil {
		t.Fatal(err)
	}
	l, err := h.LinkByName("upl")
	if err != nil {
		t.Fatal(err)
	}
	return path, node.Uplink{Name: "upl", Index: l.Attrs().Index, MTU: mtu, IP: self}
}

func newFixtureOn(t *testing.T, s *Settings, up node.Uplink) *fixture {
	t.Helper()
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	dp := dptest.Open(t)
	tspec, err := ObjectSpec(s, up)
	if err != nil {
		t.Fatal(err)
	}
	espec, err := endpoints.ObjectSpec(endpoints.DefaultSettings())
	if err != nil {
		t.Fatal(err)
	}
	dptest.Install(t, dp,
		datapath.Object{Module: Name, Spec: tspec, Slots: claims(Factory.Slots)},
		datapath.Object{Module: endpoints.Name, Spec: espec, Slots: claims(endpoints.Factory.Slots)})
	key := s.EncapsulationKey()
	rec := ipcache.New(ipcache.Options{Map: func() ipcache.Map { return dp.IPCache() }, Self: "n1", SelfKey: key,
		PeerKey: func(map[string]string) string { return key }})
	err = rec.Apply([]*model.Node{
		{Name: "n1", IP: self, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")}},
		{Name: "n2", IP: peer, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.2.0/24")}},
	})
	if err != nil {
		t.Fatal(err)
	}
	v := datapath.Endpoint{Ifindex: 1}
	copy(v.Mac[:], podMAC)
	copy(v.NodeMac[:], gwMAC)
	if err := dp.Endpoints().Put(datapath.EndpointKey{Addr: datapath.AddrToBE(localPod)}, v); err != nil {
		t.Fatal(err)
	}
	eg, _ := dp.Entry(slots.PodEgress)
	ul, _ := dp.Entry(slots.NetdevIngress)
	return &fixture{dp: dp, egress: eg, uplink: ul}
}

func podFlow(payload int) dptest.Flow {
	return dptest.Flow{Src: netip.AddrPortFrom(localPod, 40000), Dst: netip.AddrPortFrom(peerPod, 8080),
		Proto: layers.IPProtocolTCP, SYN: true, Payload: bytes.Repeat([]byte("x"), payload)}
}

// checkOuter decodes an encapsulated frame with gopacket, checks the
// outer headers, and returns the inner frame.
func checkOuter(t *testing.T, frame []byte, proto string, port uint16, vni uint32) []byte {
	t.Helper()
	pkt := gopacket.NewPacket(frame, layers.LayerTypeEthernet, gopacket.Default)
	ip, _ := pkt.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
	udp, _ := pkt.Layer(layers.LayerTypeUDP).(*layers.UDP)
	if ip == nil || udp == nil {
		t.Fatalf("not IPv4/UDP outside: %v", pkt)
	}
	if got, _ := netip.AddrFromSlice(ip.SrcIP); got != self {
		t.Errorf("outer source %v, want %v", ip.SrcIP, self)
	}
	if got, _ := netip.AddrFromSlice(ip.DstIP); got != peer {
		t.Errorf("outer destination %v, want %v", ip.DstIP, peer)
	}
	if int(ip.Length) != len(frame)-14 || ip.Flags&layers.IPv4DontFragment == 0 || ip.TTL != 64 {
		t.Errorf("outer IP length %d (frame %d), flags %v, ttl %d", ip.Length, len(frame), ip.Flags, ip.TTL)
	}
	c := *ip
	if err := c.SerializeTo(gopacket.NewSerializeBuffer(), gopacket.SerializeOptions{ComputeChecksums: true}); err != nil || c.Checksum != ip.Checksum {
		t.Errorf("outer IP checksum %#x, correct %#x", ip.Checksum, c.Checksum)
	}
	if uint16(udp.DstPort) != port || udp.SrcPort < 49152 || udp.Checksum != 0 || int(udp.Length) != len(frame)-34 {
		t.Errorf("outer UDP %d->%d len %d csum %#x", udp.SrcPort, udp.DstPort, udp.Length, udp.Checksum)
	}
	payload := udp.Payload
	switch proto {
	case "vxlan":
		if len(payload) < 8 || payload[0] != 0x08 || binary.BigEndian.Uint32(payload[4:])>>8 != vni {
			t.Fatalf("VXLAN header % x", payload[:8])
		}
		return payload[8:]
	default:
		g := &layers.Geneve{}
		if err := g.DecodeFromBytes(payload, gopacket.NilDecodeFeedback); err != nil {
			t.Fatalf("Geneve: %v", err)
		}
		if g.Version != 0 || g.OptionsLength != 0 || g.Protocol != layers.EthernetTypeTransparentEthernetBridging || g.VNI != vni {
			t.Fatalf("Geneve header %+v", g)
		}
		return payload[8:]
	}
}

func TestEncapsulation(t *testing.T) {
	for _, c := range []struct {
		s    *Settings
		port uint16
	}{
		{&Settings{Protocol: "vxlan", VNI: 1}, 8472},
		{&Settings{Protocol: "geneve", VNI: 77}, 6081},
		{&Settings{Protocol: "vxlan", Port: 4789, VNI: 5}, 4789},
	} {
		t.Run(c.s.Protocol, func(t *testing.T) {
			f := newFixture(t, c.s)
			in := dptest.Build(t, podFlow(100))
			res := dptest.Run(t, f.egress, in)
			if res.Verdict != dptest.ActRedirect {
				t.Fatalf("verdict %d, want redirect to the uplink", res.Verdict)
			}
			if len(res.Packet) != len(in)+Overhead {
				t.Fatalf("encapsulated %d bytes, want %d + %d", len(res.Packet), len(in), Overhead)
			}
			inner := checkOuter(t, res.Packet, c.s.Protocol, c.port, uint32(c.s.VNI))
			// The inner frame is the pod's, unchanged (checksums
			// verified by the decoder).
			if !bytes.Equal(inner, in) {
				t.Fatalf("inner frame changed")
			}
			d := dptest.Decode(t, inner)
			if d.Src.Addr() != localPod || d.Dst.Addr() != peerPod {
				t.Fatalf("inner %v -> %v", d.Src, d.Dst)
			}

			// Flows spread: another flow, another source port.
			other := podFlow(100)
			other.Src = netip.AddrPortFrom(localPod, 40001)
			out2 := dptest.Run(t, f.egress, dptest.Build(t, other)).Packet
			if binary.BigEndian.Uint16(out2[34:]) == binary.BigEndian.Uint16(res.Packet[34:]) {
				t.Errorf("two flows got the same outer source port %d", binary.BigEndian.Uint16(out2[34:]))
			}
		})
	}
}

// The peer node's view: the encapsulated frame arrives on the uplink and
// is delivered into the local pod.
func TestDecapsulationDelivers(t *testing.T) {
	for _, s := range []*Settings{{Protocol: "vxlan", VNI: 1}, {Protocol: "geneve", VNI: 1}} {
		t.Run(s.Protocol, func(t *testing.T) {
			f := newFixture(t, s)
			// A frame from n2's pod to our pod, as n2 would encapsulate it:
			// build it with n2's own tunnel stage, swapping roles.
			fl := dptest.Flow{Src: netip.AddrPortFrom(peerPod, 8080), Dst: netip.AddrPortFrom(localPod, 40000),
				Proto: layers.IPProtocolTCP, SYN: true, ACK: true, Payload: []byte("answer")}
			encap := encapsulate(t, s, dptest.Build(t, fl))
			res := dptest.Run(t, f.uplink, encap)
			if res.Verdict != dptest.ActRedirect {
				t.Fatalf("verdict %d, want redirect into the pod", res.Verdict)
			}
			d := dptest.Decode(t, res.Packet)
			if d.Src.Addr() != peerPod || d.Dst.Addr() != localPod || string(d.Payload) != "answer" || d.IP.TTL != 63 {
				t.Fatalf("delivered %v -> %v %q ttl %d", d.Src, d.Dst, d.Payload, d.IP.TTL)
			}
			if !bytes.Equal(d.Eth.DstMAC, podMAC) || !bytes.Equal(d.Eth.SrcMAC, gwMAC) {
				t.Fatalf("MACs %v -> %v", d.Eth.SrcMAC, d.Eth.DstMAC)
			}
			// Another VNI is not ours: dropped with its reason.
			wrong := *s
			wrong.VNI = 9
			if r := dptest.Run(t, f.uplink, encapsulate(t, &wrong, dptest.Build(t, fl))); r.Verdict != dptest.ActShot {
				t.Fatalf("packet of another VNI: verdict %d", r.Verdict)
			}
		})
	}
}

// encapsulate builds what node n2 sends to n1: its own tunnel object run
// with the roles swapped.
func encapsulate(t *testing.T, s *Settings, frame []byte) []byte {
	t.Helper()
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	dp := dptest.Open(t)
	tspec, err := ObjectSpec(s, node.Uplink{Name: "lo", Index: 1, MTU: 1500, IP: peer})
	if err != nil {
		t.Fatal(err)
	}
	dptest.Install(t, dp, datapath.Object{Module: Name, Spec: tspec, Slots: claims(Factory.Slots)})
	key := s.EncapsulationKey()
	rec := ipcache.New(ipcache.Options{Map: func() ipcache.Map { return dp.IPCache() }, Self: "n2", SelfKey: key,
		PeerKey: func(map[string]string) string { return key }})
	if err := rec.Apply([]*model.Node{
		{Name: "n1", IP: self, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")}},
		{Name: "n2", IP: peer, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.2.0/24")}},
	}); err != nil {
		t.Fatal(err)
	}
	eg, _ := dp.Entry(slots.PodEgress)
	res := dptest.Run(t, eg, frame)
	if res.Verdict != dptest.ActRedirect {
		t.Fatalf("n2 did not encapsulate (verdict %d)", res.Verdict)
	}
	return res.Packet
}

// A DF packet too big once encapsulated is answered with ICMP
// "fragmentation needed" announcing the room left, back to the pod.
func TestTooBigForTheTunnel(t *testing.T) {
	path, up := uplinkNetns(t, 1500)
	f := newFixtureOn(t, &Settings{Protocol: "vxlan", VNI: 1}, up)
	run := func(pkt []byte) dptest.Result {
		var r dptest.Result
		if err := netns.Do(path, func() error { r = dptest.Run(t, f.egress, pkt); return nil }); err != nil {
			t.Fatal(err)
		}
		return r
	}
	in := dptest.Build(t, podFlow(1500-20-20)) // a full 1500-byte IP packet
	res := run(in)
	if res.Verdict != dptest.ActRedirect {
		t.Fatalf("verdict %d, want the ICMP error sent back", res.Verdict)
	}
	pkt := gopacket.NewPacket(res.Packet, layers.LayerTypeEthernet, gopacket.Default)
	ip, _ := pkt.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
	icmp, _ := pkt.Layer(layers.LayerTypeICMPv4).(*layers.ICMPv4)
	if ip == nil || icmp == nil {
		t.Fatalf("not an ICMP packet: %v", pkt)
	}
	if src, _ := netip.AddrFromSlice(ip.SrcIP); src != self {
		t.Errorf("ICMP from %v, want the node %v", ip.SrcIP, self)
	}
	if dst, _ := netip.AddrFromSlice(ip.DstIP); dst != localPod {
		t.Errorf("ICMP to %v, want the pod %v", ip.DstIP, localPod)
	}
	if icmp.TypeCode != layers.CreateICMPv4TypeCode(3, 4) || icmp.Seq != 1500-Overhead {
		t.Errorf("ICMP %v next-hop MTU %d, want 3/4 and %d", icmp.TypeCode, icmp.Seq, 1500-Overhead)
	}
	c := *icmp
	b := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(b, gopacket.SerializeOptions{ComputeChecksums: true}, &c, gopacket.Payload(icmp.Payload)); err != nil || c.Checksum != icmp.Checksum {
		t.Errorf("ICMP checksum %#x, correct %#x (%v)", icmp.Checksum, c.Checksum, err)
	}
	ipc := *ip
	if err := ipc.SerializeTo(gopacket.NewSerializeBuffer(), gopacket.SerializeOptions{ComputeChecksums: true}); err != nil || ipc.Checksum != ip.Checksum {
		t.Errorf("IP checksum %#x, correct %#x", ip.Checksum, ipc.Checksum)
	}
	// The quote is the original IP header and the 20-byte TCP header
	// (up to its checksum, which a CHECKSUM_PARTIAL skb cannot lose).
	if q := icmp.Payload; len(q) != 40 || !bytes.Equal(q, in[14:14+40]) {
		t.Errorf("quoted % x, want % x", q, in[14:14+40])
	}
	if !bytes.Equal(res.Packet[0:6], dptest.PodMAC) {
		t.Errorf("ICMP sent to MAC %v, want the pod's", net.HardwareAddr(res.Packet[0:6]))
	}
	// A packet that fits is encapsulated.
	if r := run(dptest.Build(t, podFlow(1450-40))); r.Verdict != dptest.ActRedirect || len(r.Packet) != 1450+14+Overhead {
		t.Fatalf("a packet that fits: verdict %d, %d bytes", r.Verdict, len(r.Packet))
	}
	// Without DF it cannot be fragmented here: dropped, and counted.
	noDF := dptest.Build(t, podFlow(1500-20-20))
	noDF[14+6] = 0
	binary.BigEndian.PutUint16(noDF[14+10:], 0)
	binary.BigEndian.PutUint16(noDF[14+10:], dptest.IPChecksum(noDF[14:34]))
	if r := run(noDF); r.Verdict != dptest.ActShot {
		t.Fatalf("too big without DF: verdict %d, want a drop", r.Verdict)
	}
}

func TestSettings(t *testing.T) {
	s := &Settings{Protocol: "GENEVE", VNI: 1}
	if err := s.Validate(); err != nil || s.Port != DefaultGenevePort || s.Protocol != "geneve" {
		t.Fatalf("defaults: %+v %v", s, err)
	}
	for _, bad := range []*Settings{{Protocol: "gre", VNI: 1}, {Protocol: "vxlan", Port: 70000, VNI: 1}, {Protocol: "vxlan", VNI: 0}, {Protocol: "vxlan", VNI: 1 << 24}} {
		if err := bad.Validate(); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
	err := (&Settings{Protocol: "gre", VNI: 1}).Validate()
	if err == nil || err.Error() != `protocol: "gre" is not one of vxlan, geneve` {
		t.Fatalf("error %v", err)
	}
}

// The uplink carries the node's own traffic too: what Weir does not handle
// (IPv6 here) goes to the stack untouched, not dropped.
func TestUplinkPassesOtherTraffic(t *testing.T) {
	f := newFixture(t, &Settings{Protocol: "vxlan", VNI: 1})
	v6 := dptest.Build(t, podFlow(10))
	v6[12], v6[13] = 0x86, 0xdd
	if r := dptest.Run(t, f.uplink, v6); r.Verdict != dptest.ActOK || !bytes.Equal(r.Packet, v6) {
		t.Fatalf("IPv6 on the uplink: verdict %d", r.Verdict)
	}
	// UDP to the tunnel port of another address is not ours either.
	other := dptest.Build(t, dptest.Flow{Src: netip.MustParseAddrPort("192.168.100.50:5000"), Dst: netip.MustParseAddrPort("192.168.100.60:8472"), Proto: layers.IPProtocolUDP, Payload: make([]byte, 60)})
	if r := dptest.Run(t, f.uplink, other); r.Verdict != dptest.ActOK || !bytes.Equal(r.Packet, other) {
		t.Fatalf("UDP 8472 to another address: verdict %d", r.Verdict)
	}
}
