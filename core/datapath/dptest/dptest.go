// Package dptest helps tests run the real datapath: a node datapath in a
// pin directory unique to the test (removed when it ends), packets built
// and checked with gopacket, and BPF_PROG_TEST_RUN.
package dptest

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/mounts"
)

// TestPinRoot holds the pin directories of tests.
const TestPinRoot = mounts.DefaultBPFFS + "/weir-test"

var unsafeChars = regexp.MustCompile(`[^A-Za-z0-9_-]+`)

// UniqueName returns a name unique to this test run, safe for paths.
func UniqueName(t testing.TB) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	n := unsafeChars.ReplaceAllString(t.Name(), "_")
	if len(n) > 40 {
		n = n[:40]
	}
	return n + "-" + hex.EncodeToString(b[:])
}

// Open opens a datapath in a fresh pin directory and removes every pinned
// object when the test ends, also when it fails.
func Open(t testing.TB) *datapath.Datapath {
	t.Helper()
	return OpenWith(t, datapath.Options{CTMaxEntries: 4096})
}

// OpenWith is Open with options (PinDir is chosen here).
func OpenWith(t testing.TB, opts datapath.Options) *datapath.Datapath {
	t.Helper()
	dir := filepath.Join(TestPinRoot, UniqueName(t))
	// Registered first: a load that fails part-way has pinned some maps.
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("removing pin directory: %v", err)
		}
		_ = os.Remove(TestPinRoot) // only succeeds once no other test uses it
	})
	opts.PinDir = dir
	dp, err := datapath.Open(opts)
	if err != nil {
		t.Fatalf("opening datapath: %v", err)
	}
	t.Cleanup(func() {
		if err := dp.Remove(); err != nil {
			t.Errorf("removing datapath pins: %v", err)
		}
	})
	return dp
}

// Install installs objects and closes them when the test ends.
func Install(t testing.TB, dp *datapath.Datapath, objs ...datapath.Object) *datapath.Installation {
	t.Helper()
	in, err := dp.Install(objs)
	if err != nil {
		t.Fatalf("install: %v", err)
	}
	t.Cleanup(in.Close)
	return in
}

// Result is the outcome of one program run.
type Result struct {
	Verdict uint32
	Packet  []byte
}

// TC verdicts.
const (
	ActOK       = 0
	ActShot     = 2
	ActRedirect = 7
)

// Run runs prog once on pkt (with ifindex 1, loopback, as the device).
func Run(t testing.TB, prog *ebpf.Program, pkt []byte) Result {
	t.Helper()
	opts := &ebpf.RunOptions{Data: pkt, DataOut: make([]byte, len(pkt)+512)}
	ret, err := prog.Run(opts)
	if err != nil {
		t.Fatalf("BPF_PROG_TEST_RUN: %v", err)
	}
	return Result{Verdict: ret, Packet: opts.DataOut}
}

// MACs used in crafted frames.
var (
	PodMAC  = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x01}
	HostMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0xfe}
)

// Flow describes one crafted IPv4 packet.
type Flow struct {
	Src, Dst netip.AddrPort
	Proto    layers.IPProtocol
	// SYN, ACK, FIN, RST for TCP.
	SYN, ACK, FIN, RST bool
	Payload            []byte
	TTL                uint8
}

// Build serializes the flow as an Ethernet frame with correct checksums.
func Build(t testing.TB, f Flow) []byte {
	t.Helper()
	b, err := BuildErr(f)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// BuildErr is Build returning the error.
func BuildErr(f Flow) ([]byte, error) {
	ttl := f.TTL
	if ttl == 0 {
		ttl = 64
	}
	eth := &layers.Ethernet{SrcMAC: PodMAC, DstMAC: HostMAC, EthernetType: layers.EthernetTypeIPv4}
	ip := &layers.IPv4{Version: 4, IHL: 5, TTL: ttl, Protocol: f.Proto, Id: 0x1234,
		SrcIP: f.Src.Addr().AsSlice(), DstIP: f.Dst.Addr().AsSlice(), Flags: layers.IPv4DontFragment}
	ls := []gopacket.SerializableLayer{eth, ip}
	switch f.Proto {
	case layers.IPProtocolTCP:
		tcp := &layers.TCP{SrcPort: layers.TCPPort(f.Src.Port()), DstPort: layers.TCPPort(f.Dst.Port()),
			SYN: f.SYN, ACK: f.ACK, FIN: f.FIN, RST: f.RST, Seq: 1000, Window: 65535}
		if f.ACK {
			tcp.Ack = 1
		}
		if err := tcp.SetNetworkLayerForChecksum(ip); err != nil {
			return nil, err
		}
		ls = append(ls, tcp)
	case layers.IPProtocolUDP:
		udp := &layers.UDP{SrcPort: layers.UDPPort(f.Src.Port()), DstPort: layers.UDPPort(f.Dst.Port())}
		if err := udp.SetNetworkLayerForChecksum(ip); err != nil {
			return nil, err
		}
		ls = append(ls, udp)
	default:
		return nil, fmt.Errorf("dptest: protocol %v not supported", f.Proto)
	}
	ls = append(ls, gopacket.Payload(f.Payload))
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Decoded is a frame taken apart by gopacket.
type Decoded struct {
	Eth     *layers.Ethernet
	IP      *layers.IPv4
	TCP     *layers.TCP
	UDP     *layers.UDP
	Src     netip.AddrPort
	Dst     netip.AddrPort
	Payload []byte
}

// Decode takes a frame apart and verifies its IPv4 and TCP/UDP checksums by
// recomputing them with gopacket, independently of the kernel's incremental
// updates. Any mismatch fails the test.
func Decode(t testing.TB, frame []byte) Decoded {
	t.Helper()
	pkt := gopacket.NewPacket(frame, layers.LayerTypeEthernet, gopacket.Default)
	// gopacket guesses application protocols from ports (5353 is mDNS);
	// only errors up to L4 concern the datapath.
	if el := pkt.ErrorLayer(); el != nil && pkt.TransportLayer() == nil {
		t.Fatalf("decoding frame: %v", el.Error())
	}
	var d Decoded
	d.Eth, _ = pkt.Layer(layers.LayerTypeEthernet).(*layers.Ethernet)
	d.IP, _ = pkt.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
	if d.Eth == nil || d.IP == nil {
		t.Fatalf("frame is not Ethernet/IPv4: %v", pkt)
	}
	src, _ := netip.AddrFromSlice(d.IP.SrcIP)
	dst, _ := netip.AddrFromSlice(d.IP.DstIP)
	if err := verifyChecksums(pkt, d.IP); err != nil {
		t.Fatalf("checksum: %v\n%v", err, pkt)
	}
	if l, ok := pkt.Layer(layers.LayerTypeTCP).(*layers.TCP); ok {
		d.TCP = l
		d.Src = netip.AddrPortFrom(src, uint16(l.SrcPort))
		d.Dst = netip.AddrPortFrom(dst, uint16(l.DstPort))
		d.Payload = l.Payload
	}
	if l, ok := pkt.Layer(layers.LayerTypeUDP).(*layers.UDP); ok {
		d.UDP = l
		d.Src = netip.AddrPortFrom(src, uint16(l.SrcPort))
		d.Dst = netip.AddrPortFrom(dst, uint16(l.DstPort))
		d.Payload = l.Payload
	}
	return d
}

func verifyChecksums(pkt gopacket.Packet, ip *layers.IPv4) error {
	want := ip.Checksum
	ipCopy := *ip
	buf := gopacket.NewSerializeBuffer()
	if err := ipCopy.SerializeTo(buf, gopacket.SerializeOptions{ComputeChecksums: true}); err != nil {
		return err
	}
	if got := ipCopy.Checksum; got != want {
		return fmt.Errorf("IPv4 header checksum is %#04x, correct is %#04x", want, got)
	}
	opts := gopacket.SerializeOptions{ComputeChecksums: true}
	if tcp, ok := pkt.Layer(layers.LayerTypeTCP).(*layers.TCP); ok {
		c := *tcp
		_ = c.SetNetworkLayerForChecksum(ip)
		b := gopacket.NewSerializeBuffer()
		if err := gopacket.SerializeLayers(b, opts, &c, gopacket.Payload(tcp.Payload)); err != nil {
			return err
		}
		if c.Checksum != tcp.Checksum {
			return fmt.Errorf("TCP checksum is %#04x, correct is %#04x", tcp.Checksum, c.Checksum)
		}
	}
	if udp, ok := pkt.Layer(layers.LayerTypeUDP).(*layers.UDP); ok && udp.Checksum != 0 {
		c := *udp
		_ = c.SetNetworkLayerForChecksum(ip)
		b := gopacket.NewSerializeBuffer()
		if err := gopacket.SerializeLayers(b, opts, &c, gopacket.Payload(udp.Payload)); err != nil {
			return err
		}
		if c.Checksum != udp.Checksum {
			return fmt.Errorf("UDP checksum is %#04x, correct is %#04x", udp.Checksum, c.Checksum)
		}
	}
	return nil
}

// IPChecksum computes the IPv4 header checksum of h (its checksum field
// zeroed), for tests that edit headers by hand.
func IPChecksum(h []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(h); i += 2 {
		s += uint32(h[i])<<8 | uint32(h[i+1])
	}
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

// Fragment cuts an Ethernet/IPv4 frame into fragments whose IP payloads
// hold at most size bytes (a multiple of 8), as a host would send them.
func Fragment(t testing.TB, frame []byte, size int) [][]byte {
	t.Helper()
	if size%8 != 0 || len(frame) < 34 {
		t.Fatalf("dptest: cannot fragment by %d", size)
	}
	hdr := frame[:34]
	payload := frame[34:]
	var out [][]byte
	for off := 0; off < len(payload); off += size {
		end := min(off+size, len(payload))
		f := append(append([]byte{}, hdr...), payload[off:end]...)
		binary.BigEndian.PutUint16(f[16:], uint16(20+end-off))
		flags := uint16(off / 8)
		if end < len(payload) {
			flags |= 0x2000 // more fragments
		}
		binary.BigEndian.PutUint16(f[20:], flags)
		f[24], f[25] = 0, 0
		binary.BigEndian.PutUint16(f[24:], IPChecksum(f[14:34]))
		out = append(out, f)
	}
	return out
}

// Reassemble puts fragments (in order, as Fragment made them and a
// program left them) back into one frame, checking that every fragment's
// header checksum is right and that they agree on addresses.
func Reassemble(t testing.TB, frags [][]byte) []byte {
	t.Helper()
	var out []byte
	for i, f := range frags {
		if IPChecksum(f[14:34]) != 0 {
			t.Fatalf("fragment %d: IPv4 header checksum is wrong", i)
		}
		n := int(binary.BigEndian.Uint16(f[16:])) - 20
		if i == 0 {
			out = append(out, f[:34]...)
		} else if !bytesEqual(f[26:34], out[26:34]) {
			t.Fatalf("fragment %d: addresses %v differ from the first fragment's %v", i, f[26:34], out[26:34])
		}
		out = append(out, f[34:34+n]...)
	}
	binary.BigEndian.PutUint16(out[16:], uint16(len(out)-14))
	binary.BigEndian.PutUint16(out[20:], 0)
	out[24], out[25] = 0, 0
	binary.BigEndian.PutUint16(out[24:], IPChecksum(out[14:34]))
	return out
}

func bytesEqual(a, b []byte) bool { return string(a) == string(b) }

// ICMPError builds an ICMP error (type, code, and for "fragmentation
// needed" the next-hop MTU) from src to dst quoting quoted, an IPv4 packet
// (a frame without its Ethernet header).
func ICMPError(t testing.TB, src, dst netip.Addr, typ, code uint8, mtu uint16, quoted []byte) []byte {
	t.Helper()
	eth := &layers.Ethernet{SrcMAC: PodMAC, DstMAC: HostMAC, EthernetType: layers.EthernetTypeIPv4}
	ip := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolICMPv4, Id: 0x4321,
		SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
	icmp := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(typ, code), Seq: mtu}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true},
		eth, ip, icmp, gopacket.Payload(quoted)); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// ICMPDecoded is an ICMP error taken apart.
type ICMPDecoded struct {
	Src, Dst netip.Addr
	Type     uint8
	Code     uint8
	// Inner is the quoted packet (its checksums verified when it is
	// quoted whole).
	Inner Decoded
}

// DecodeICMP takes an ICMP error apart, verifying the outer IPv4 and ICMP
// checksums, the quoted IPv4 header checksum and, when the quote holds the
// whole packet, its TCP or UDP checksum.
func DecodeICMP(t testing.TB, frame []byte) ICMPDecoded {
	t.Helper()
	pkt := gopacket.NewPacket(frame, layers.LayerTypeEthernet, gopacket.Default)
	ip, _ := pkt.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
	icmp, _ := pkt.Layer(layers.LayerTypeICMPv4).(*layers.ICMPv4)
	if ip == nil || icmp == nil {
		t.Fatalf("not an ICMP packet: %v", pkt)
	}
	if IPChecksum(frame[14:34]) != 0 {
		t.Fatal("outer IPv4 header checksum is wrong")
	}
	body := frame[34 : 14+int(ip.Length)]
	if IPChecksum(body) != 0 {
		t.Fatalf("ICMP checksum is wrong (%#04x)", icmp.Checksum)
	}
	var d ICMPDecoded
	d.Src, _ = netip.AddrFromSlice(ip.SrcIP)
	d.Dst, _ = netip.AddrFromSlice(ip.DstIP)
	d.Type, d.Code = icmp.TypeCode.Type(), icmp.TypeCode.Code()
	quoted := body[8:]
	if IPChecksum(quoted[:20]) != 0 {
		t.Fatal("quoted IPv4 header checksum is wrong")
	}
	// Decode the quote as a frame of its own.
	inner := append(append([]byte{}, frame[:14]...), quoted...)
	if n := int(binary.BigEndian.Uint16(quoted[2:])); n <= len(quoted) {
		d.Inner = Decode(t, inner[:14+n])
	} else {
		p := gopacket.NewPacket(inner, layers.LayerTypeEthernet, gopacket.Default)
		d.Inner.IP, _ = p.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
		src, _ := netip.AddrFromSlice(d.Inner.IP.SrcIP)
		dst, _ := netip.AddrFromSlice(d.Inner.IP.DstIP)
		d.Inner.Src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(quoted[20:]))
		d.Inner.Dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(quoted[22:]))
	}
	return d
}

// StageObject is a test object whose programs fill the named slots:
// "stage_pass" runs the next stage, "stage_reenter" re-enters its hook
// from the first slot, forever.
func StageObject(t testing.TB, fill map[string]string) datapath.Object {
	t.Helper()
	spec, err := loadStages()
	if err != nil {
		t.Fatal(err)
	}
	return datapath.Object{Module: "stages", Spec: spec, Slots: fill}
}
