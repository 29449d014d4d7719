package datapath_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/datapath/dptest"
	"github.com/weirnet/weir/core/ipcache"
	"github.com/weirnet/weir/core/lbmap"
	"github.com/weirnet/weir/core/model"
	"github.com/weirnet/weir/core/module"
	"github.com/weirnet/weir/core/node"
	"github.com/weirnet/weir/core/slots"
	"github.com/weirnet/weir/modules/endpoints"
	"github.com/weirnet/weir/modules/lb"
	"github.com/weirnet/weir/modules/tunnel"
)

// The node of the benchmark: a client pod and a backend pod here, a peer
// node reached over VXLAN with a pod behind it.
var (
	bSelf    = netip.MustParseAddr("192.168.100.11")
	bPeer    = netip.MustParseAddr("192.168.100.12")
	bClient  = netip.MustParseAddr("10.244.1.10")
	bBackend = netip.MustParseAddr("10.244.1.11")
	bRemote  = netip.MustParseAddr("10.244.2.20")
	bVIP     = netip.MustParseAddrPort("10.96.0.10:80")
	bPodMAC  = net.HardwareAddr{0x0a, 0, 0, 0, 0, 0x11}
	bGwMAC   = net.HardwareAddr{0x0a, 0, 0, 0, 0, 0xee}
)

// perPacket is one path a packet takes, run once per repeat on a fresh
// copy of its input: every repeat takes the path the figure names, which
// check confirms from the verdict and the packet that came out.
type perPacket struct {
	name  string
	prog  *ebpf.Program
	input func(i int) []byte
	check func(verdict uint32, in, out []byte) error
}

// measure runs the path n times and returns the median time of one run,
// as the kernel measured it (BPF_PROG_TEST_RUN with one repeat). A run
// with more repeats would rerun the packet the first run already
// translated: it would time another path. One repeat per call costs a
// cold start each time, the baseline's too, which is why every figure
// stands beside the entry program alone measured the same way.
func measure(b *testing.B, p perPacket, n int) time.Duration {
	b.Helper()
	times := make([]time.Duration, n)
	out := make([]byte, 2048)
	for i := range n {
		in := p.input(i)
		ret, d, err := dptest.RunTimed(p.prog, in, out)
		if err != nil {
			b.Fatalf("%s, repeat %d: %v", p.name, i, err)
		}
		if err := p.check(ret, in, out); err != nil {
			b.Fatalf("%s, repeat %d did not take the path: %v", p.name, i, err)
		}
		times[i] = d
	}
	slices.Sort(times)
	return times[n/2]
}

func claimsOf(cs []module.SlotClaim) map[string]string {
	out := map[string]string{}
	for _, c := range cs {
		out[c.Slot] = c.Program
	}
	return out
}

func be4(b []byte) netip.Addr { return netip.AddrFrom4([4]byte(b)) }

// frame offsets (no IP options)
const (
	offSrc   = 14 + 12
	offDst   = 14 + 16
	offSport = 14 + 20
	offDport = 14 + 22
)

func wantRedirect(v uint32) error {
	if v != dptest.ActRedirect {
		return fmt.Errorf("verdict %d, want redirect", v)
	}
	return nil
}

func delivered(v uint32, out []byte, src, dst netip.AddrPort) error {
	if err := wantRedirect(v); err != nil {
		return err
	}
	gotSrc := netip.AddrPortFrom(be4(out[offSrc:offSrc+4]), binary.BigEndian.Uint16(out[offSport:]))
	gotDst := netip.AddrPortFrom(be4(out[offDst:offDst+4]), binary.BigEndian.Uint16(out[offDport:]))
	if (src.IsValid() && gotSrc != src) || gotDst != dst {
		return fmt.Errorf("left as %v -> %v, want %v -> %v", gotSrc, gotDst, src, dst)
	}
	return nil
}

func tcpFrame(b *testing.B, src, dst netip.AddrPort, syn bool) []byte {
	return dptest.Build(b, dptest.Flow{Src: src, Dst: dst, Proto: layers.IPProtocolTCP, SYN: syn, ACK: !syn, Payload: []byte("GET / HTTP/1.1\r\n\r\n")})
}

// vxlanFrame is what the peer node sends for its pod: inner frame in
// VXLAN (VNI 1, port 8472) from the peer to this node.
func vxlanFrame(b *testing.B, inner []byte) []byte {
	eth := &layers.Ethernet{SrcMAC: dptest.PodMAC, DstMAC: dptest.HostMAC, EthernetType: layers.EthernetTypeIPv4}
	ip := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: bPeer.AsSlice(), DstIP: bSelf.AsSlice(), Flags: layers.IPv4DontFragment}
	udp := &layers.UDP{SrcPort: 50000, DstPort: tunnel.DefaultVXLANPort}
	_ = udp.SetNetworkLayerForChecksum(ip)
	vx := &layers.VXLAN{ValidIDFlag: true, VNI: 1}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, eth, ip, udp, vx, gopacket.Payload(inner)); err != nil {
		b.Fatal(err)
	}
	return buf.Bytes()
}

// BenchmarkPerPacket times every path a packet takes through the node's
// datapath (endpoints, lb, tunnel), each beside the entry program alone on
// an empty datapath, with 1 and with 100,000 services in the maps.
func BenchmarkPerPacket(b *testing.B) {
	const n = 20000
	base := dptest.OpenWith(b, datapath.Options{CTMaxEntries: 4096})
	dptest.Install(b, base)
	baseEntry, _ := base.Entry(slots.PodEgress)
	pod := tcpFrame(b, netip.AddrPortFrom(bClient, 40000), netip.AddrPortFrom(bBackend, 8080), false)
	baseline := measure(b, perPacket{name: "entry only", prog: baseEntry, input: func(int) []byte { return pod },
		check: func(v uint32, in, out []byte) error {
			if v != dptest.ActOK || !bytes.Equal(out[:len(in)], in) {
				return fmt.Errorf("verdict %d, packet changed", v)
			}
			return nil
		}}, n)
	b.ReportMetric(float64(baseline.Nanoseconds()), "ns/pkt-entry-only(baseline)")
	b.Logf("%-34s %6d ns", "entry only (baseline)", baseline.Nanoseconds())

	dp := dptest.OpenWith(b, datapath.Options{CTMaxEntries: 262144,
		MaxEntries: map[string]uint32{datapath.MapServices: 262144, datapath.MapRevNAT: 131072}})
	lbSpec, err := (&lb.Module{}).Object()
	if err != nil {
		b.Fatal(err)
	}
	epSpec, err := endpoints.ObjectSpec(endpoints.DefaultSettings())
	if err != nil {
		b.Fatal(err)
	}
	ts := tunnel.DefaultSettings()
	if err := ts.Validate(); err != nil {
		b.Fatal(err)
	}
	tunSpec, err := tunnel.ObjectSpec(ts, node.Uplink{Name: "lo", Index: 1, MTU: 65536, IP: bSelf})
	if err != nil {
		b.Fatal(err)
	}
	dptest.Install(b, dp,
		datapath.Object{Module: lb.Name, Spec: lbSpec, Slots: claimsOf(lb.Factory.Slots)},
		datapath.Object{Module: endpoints.Name, Spec: epSpec, Slots: claimsOf(endpoints.Factory.Slots)},
		datapath.Object{Module: tunnel.Name, Spec: tunSpec, Slots: claimsOf(tunnel.Factory.Slots)})
	key := ts.EncapsulationKey()
	if err := ipcache.New(ipcache.Options{Map: func() ipcache.Map { return dp.IPCache() }, Self: "n1", SelfKey: key,
		PeerKey: func(map[string]string) string { return key }}).Apply([]*model.Node{
		{Name: "n1", IP: bSelf, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")}},
		{Name: "n2", IP: bPeer, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.2.0/24")}},
	}); err != nil {
		b.Fatal(err)
	}
	for _, a := range []netip.Addr{bClient, bBackend} {
		v := datapath.Endpoint{Ifindex: 1}
		copy(v.Mac[:], bPodMAC)
		copy(v.NodeMac[:], bGwMAC)
		if err := dp.Endpoints().Put(datapath.EndpointKey{Addr: datapath.AddrToBE(a)}, v); err != nil {
			b.Fatal(err)
		}
	}
	egress, _ := dp.Entry(slots.PodEgress)
	uplink, _ := dp.Entry(slots.NetdevIngress)
	backend := netip.AddrPortFrom(bBackend, 8080)
	rec := lbmap.NewFromDatapath(dp, nil)
	services := func(count int) {
		svcs := make([]*model.Service, 0, count)
		for i := range count {
			addr := bVIP
			if i > 0 {
				addr = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 97 + byte(i>>16), byte(i >> 8), byte(i)}), 80)
			}
			svcs = append(svcs, &model.Service{Name: model.ServiceName{Namespace: "bench", Name: fmt.Sprintf("s%d", i)},
				Frontends: []model.Frontend{{Addr: addr, Proto: model.TCP, Type: model.ClusterIP, Backends: []model.Backend{{Addr: backend}}}}})
		}
		start := time.Now()
		if err := rec.ApplySnapshot(&model.Snapshot{Services: svcs}); err != nil {
			b.Fatal(err)
		}
		b.Logf("%d services written in %v", count, time.Since(start).Round(time.Millisecond))
	}

	round := 0
	for _, count := range []int{1, 100000} {
		services(count)
		round++
		client := netip.AddrPortFrom(bClient, uint16(41000+round))
		// The established flow the CT-hit and reply cases use.
		if err := delivered(dptest.Run(b, egress, tcpFrame(b, client, bVIP, true)).Verdict, dptest.Run(b, egress, tcpFrame(b, client, bVIP, false)).Packet, client, backend); err != nil {
			b.Fatal(err)
		}
		ack := tcpFrame(b, client, bVIP, false)
		reply := tcpFrame(b, backend, client, false)
		remote := tcpFrame(b, netip.AddrPortFrom(bClient, 40000), netip.AddrPortFrom(bRemote, 8080), false)
		fromPeer := vxlanFrame(b, tcpFrame(b, netip.AddrPortFrom(bRemote, 8080), netip.AddrPortFrom(bClient, 40000), false)[:])
		// Every repeat of the first-packet case is a new flow: a client
		// address of its own.
		missSrc := func(i int) netip.AddrPort {
			return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 250 + byte(round), byte(i >> 8), byte(i)}), 40000)
		}
		cases := []perPacket{
			{name: "non-service (pod to local pod)", prog: egress, input: func(int) []byte { return pod },
				check: func(v uint32, _, out []byte) error {
					return delivered(v, out, netip.AddrPortFrom(bClient, 40000), backend)
				}},
			{name: "service, first packet (CT miss)", prog: egress,
				input: func(i int) []byte { return tcpFrame(b, missSrc(i), bVIP, true) },
				check: func(v uint32, in, out []byte) error {
					src := netip.AddrPortFrom(be4(in[offSrc:offSrc+4]), 40000)
					return delivered(v, out, src, backend)
				}},
			{name: "service, established (CT hit)", prog: egress, input: func(int) []byte { return ack },
				check: func(v uint32, _, out []byte) error { return delivered(v, out, client, backend) }},
			{name: "reply, reverse NAT", prog: egress, input: func(int) []byte { return reply },
				check: func(v uint32, _, out []byte) error { return delivered(v, out, bVIP, client) }},
			{name: "tunnel encap (to a remote pod)", prog: egress, input: func(int) []byte { return remote },
				check: func(v uint32, in, out []byte) error {
					if err := wantRedirect(v); err != nil {
						return err
					}
					if be4(out[offDst:offDst+4]) != bPeer || binary.BigEndian.Uint16(out[offDport:]) != tunnel.DefaultVXLANPort ||
						!bytes.Equal(out[14+50:14+50+20], in[14:14+20]) {
						return fmt.Errorf("not a VXLAN packet to %v carrying the pod's", bPeer)
					}
					return nil
				}},
			{name: "tunnel decap (from a remote pod)", prog: uplink, input: func(int) []byte { return fromPeer },
				check: func(v uint32, _, out []byte) error {
					return delivered(v, out, netip.AddrPortFrom(bRemote, 8080), netip.AddrPortFrom(bClient, 40000))
				}},
		}
		for _, c := range cases {
			d := measure(b, c, n)
			label := fmt.Sprintf("%s, %d services", c.name, count)
			b.Logf("%-52s %6d ns  %.2fx the entry alone", label, d.Nanoseconds(), float64(d)/float64(baseline))
			b.ReportMetric(float64(d.Nanoseconds()), fmt.Sprintf("ns/pkt-%s-%dsvc", metricName(c.name), count))
			b.ReportMetric(float64(d)/float64(baseline), fmt.Sprintf("ratio-%s-%dsvc", metricName(c.name), count))
		}
	}
}

func metricName(s string) string {
	var out []rune
	for _, r := range strings.ToLower(s) {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			out = append(out, r)
		case r == ' ' || r == '-':
			if len(out) > 0 && out[len(out)-1] != '-' {
				out = append(out, '-')
			}
		}
	}
	return string(out)
}
