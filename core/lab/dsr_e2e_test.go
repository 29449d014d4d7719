package lab

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/netns"
)

const dsrServices = `services:
  - name: web
    clusterIP: 10.96.0.10
    type: LoadBalancer
    loadBalancerIPs: [` + lbIP + `]
    ports:
      - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
      - {name: udp, port: 53, targetPort: 5353, protocol: UDP, nodePort: 30053}
      - {name: echo, port: 9000, nodePort: 30090}
    backends: [{ip: 10.244.2.11, nodeName: n2}]
`

func upDSR(t *testing.T, mode string) *Lab { return upDSRWith(t, "dsr-ipoption", "mode: "+mode) }

// upDSRWith brings up the DSR lab with a module and its settings (a YAML
// flow mapping's inside).
func upDSRWith(t *testing.T, module, settings string) *Lab {
	t.Helper()
	config := "modules: [endpoints, lb, nativerouting, " + module + "]\nsettings:\n  " + module + ": {" + settings + "}\n"
	return upThreeNodes(t, config, []ExternalSpec{{Name: "ext", Routes: map[string]string{lbIP + "/32": "n1"}}}, dsrServices, 9)
}

// wireStats are what crossed one underlay port, as gopacket decodes it.
type wireStats struct {
	toExt       map[string]int // replies to the client, by "src:port proto"
	dsrOptions  []string       // DSR options seen, as "addr:port"
	framesToExt int
}

func wire(frames [][]byte, extIP string) wireStats {
	st := wireStats{toExt: map[string]int{}}
	for _, f := range frames {
		pkt := gopacket.NewPacket(f, layers.LayerTypeEthernet, gopacket.Default)
		ip, _ := pkt.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
		if ip == nil {
			continue
		}
		for _, o := range ip.Options {
			if o.OptionType == 0x9a && o.OptionLength == 8 && len(o.OptionData) == 6 {
				a := netip.AddrFrom4([4]byte(o.OptionData[2:6]))
				st.dsrOptions = append(st.dsrOptions, netip.AddrPortFrom(a, binary.BigEndian.Uint16(o.OptionData[0:2])).String())
			}
		}
		if ip.DstIP.String() != extIP {
			continue
		}
		st.framesToExt++
		if tcp, _ := pkt.Layer(layers.LayerTypeTCP).(*layers.TCP); tcp != nil {
			st.toExt[ip.SrcIP.String()+":"+strconv.Itoa(int(tcp.SrcPort))+" TCP"]++
		}
		if udp, _ := pkt.Layer(layers.LayerTypeUDP).(*layers.UDP); udp != nil {
			st.toExt[ip.SrcIP.String()+":"+strconv.Itoa(int(udp.SrcPort))+" UDP"]++
		}
	}
	return st
}

// Direct Server Return with the service address in an IPv4 option, native
// routing: the client reaches a backend on n2 through n1's NodePort and
// load-balancer IP; the backend sees the client's address; on the wire the
// SYN reaches n2 with the option naming the address the client called, and
// the replies leave n2 for the client from that address without passing n1.
func TestDSRIPOption(t *testing.T) {
	l := upDSR(t, "dsr")
	ctx := context.Background()
	ext := l.External("ext")
	n1 := l.Node("n1")
	c := HTTPClient(ext.NetnsPath(), 3*time.Second)
	for _, url := range []string{"http://" + n1.IP + ":30080/client", "http://" + lbIP + "/client"} {
		got, err := Get(ctx, c, url)
		if err != nil {
			t.Fatalf("ext -> %s: %v", url, err)
		}
		if who, seen, _ := strings.Cut(got, " "); who != "web-2" || !strings.HasPrefix(seen, ext.IP+":") {
			t.Errorf("ext -> %s: %q; want web-2 to see the client %s", url, got, ext.IP)
		}
	}
	var atN1, atN2 [][]byte
	atN1 = capture(t, l, "u-n1", func() {
		atN2 = capture(t, l, "u-n2", func() {
			for range 5 {
				if _, err := Get(ctx, c, "http://"+n1.IP+":30080/"); err != nil {
					t.Errorf("ext -> n1:30080: %v", err)
				}
				if got, err := UDPAsk(ctx, ext.NetnsPath(), n1.IP+":30053", "ping", 3*time.Second); err != nil || got != "web-2: ping" {
					t.Errorf("ext -> n1:30053/udp: %q %v", got, err)
				}
			}
		})
	})
	w1, w2 := wire(atN1, ext.IP), wire(atN2, ext.IP)
	if w1.framesToExt != 0 {
		t.Errorf("%d frames to the client crossed n1's port: %v; DSR replies must not pass the receiving node", w1.framesToExt, w1.toExt)
	}
	want := map[string]bool{n1.IP + ":30080 TCP": true, n1.IP + ":30053 UDP": true}
	for k := range want {
		if w2.toExt[k] == 0 {
			t.Errorf("no reply to the client left n2 from %s; replies seen: %v", k, w2.toExt)
		}
	}
	for k := range w2.toExt {
		if !want[k] {
			t.Errorf("a reply to the client left n2 from %s", k)
		}
	}
	// One option per TCP connection (its SYN) and one per datagram.
	opts := map[string]int{}
	for _, o := range w2.dsrOptions {
		opts[o]++
	}
	if opts[n1.IP+":30080"] != 5 || opts[n1.IP+":30053"] != 5 || len(opts) != 2 {
		t.Errorf("DSR options reaching n2: %v; want 5 naming %s:30080 (SYNs) and 5 naming %s:30053 (datagrams)", opts, n1.IP, n1.IP)
	}
	// The client's FINs, which carry no option, still reached the flows'
	// entries on n2: the closed connections are closing there.
	p, err := datapath.OpenPinned(l.Node("n2").PinDir)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	rows, err := p.CT()
	if err != nil {
		t.Fatal(err)
	}
	closing := 0
	for _, r := range rows {
		if r.Dir == "orig" && r.Dst.String() == n1.IP+":30080" && strings.Contains(r.Flags, "DSR") && strings.Contains(r.Flags, "FIN_ORIG") {
			closing++
		}
	}
	if closing == 0 {
		t.Errorf("no DSR flow on n2 saw the client's FIN; entries: %+v", rows)
	}
}

// Hybrid mode: TCP by DSR (replies leave n2 for the client), UDP by SNAT
// (replies come back through n1), both seen on the wire.
func TestDSRHybrid(t *testing.T) {
	l := upDSR(t, "hybrid")
	ctx := context.Background()
	ext := l.External("ext")
	n1 := l.Node("n1")
	c := HTTPClient(ext.NetnsPath(), 3*time.Second)
	var atN1, atN2 [][]byte
	atN1 = capture(t, l, "u-n1", func() {
		atN2 = capture(t, l, "u-n2", func() {
			for range 5 {
				if got, err := Get(ctx, c, "http://"+n1.IP+":30080/client"); err != nil || !strings.HasPrefix(got, "web-2 "+ext.IP+":") {
					t.Errorf("ext -> n1:30080: %q %v", got, err)
				}
				if got, err := UDPAsk(ctx, ext.NetnsPath(), n1.IP+":30053", "ping", 3*time.Second); err != nil || got != "web-2: ping" {
					t.Errorf("ext -> n1:30053/udp: %q %v", got, err)
				}
			}
		})
	})
	w1, w2 := wire(atN1, ext.IP), wire(atN2, ext.IP)
	tcp, udp := n1.IP+":30080 TCP", n1.IP+":30053 UDP"
	if w2.toExt[tcp] == 0 || w1.toExt[tcp] != 0 {
		t.Errorf("TCP replies to the client: %d from n2, %d from n1; want them from n2 only (DSR)", w2.toExt[tcp], w1.toExt[tcp])
	}
	if w1.toExt[udp] != 5 || w2.toExt[udp] != 0 {
		t.Errorf("UDP replies to the client: %d from n1, %d from n2; want 5 from n1 only (SNAT)", w1.toExt[udp], w2.toExt[udp])
	}
	for _, o := range w2.dsrOptions {
		if o != n1.IP+":30080" {
			t.Errorf("a DSR option for %s reached n2; UDP goes by SNAT in hybrid mode", o)
		}
	}
}

// A datagram the option would push past the path MTU is answered with
// ICMP fragmentation needed announcing the room left: the client's kernel
// learns a path MTU 8 bytes smaller, and smaller datagrams go through.
func TestDSRIPOptionMTU(t *testing.T) {
	l := upDSR(t, "dsr")
	ext := l.External("ext")
	n1 := l.Node("n1")
	fd := dgramSocket(t, ext.NetnsPath())
	dst := &unix.SockaddrInet4{Port: 30053, Addr: netip.MustParseAddr(n1.IP).As4()}
	if err := unix.Connect(fd, dst); err != nil {
		t.Fatal(err)
	}
	full := make([]byte, 1500-20-8) // a 1,500-byte IP packet: the uplink's MTU
	if _, err := unix.Write(fd, full); err != nil {
		t.Fatalf("first send: %v", err)
	}
	waitFor(t, 5*time.Second, "the client to learn the path MTU", func() bool {
		mtu, err := unix.GetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MTU)
		return err == nil && mtu == 1492
	})
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 3})
	fits := make([]byte, 1492-20-8)
	copy(fits, "fits")
	// The ICMP error is also reported on the connected socket, once: the
	// next call returns it.
	if _, err := unix.Write(fd, fits); err == unix.EMSGSIZE {
		_, err = unix.Write(fd, fits)
		if err != nil {
			t.Fatalf("send within the path MTU: %v", err)
		}
	} else if err != nil {
		t.Fatalf("send within the path MTU: %v", err)
	}
	buf := make([]byte, 2048)
	n, err := unix.Read(fd, buf)
	if err != nil || !strings.HasPrefix(string(buf[:n]), "web-2: fits") {
		t.Fatalf("answer to a datagram that fits: %q %v", buf[:min(n, 20)], err)
	}
}

// 1,000 DSR connections held open at once all complete, and DSR flows
// carry on while the backend node's agent restarts and is killed, with
// either DSR module.
func TestDSRUnderLoad(t *testing.T) {
	for _, module := range []string{"dsr-ipoption", "dsr-ipip"} {
		t.Run(module, func(t *testing.T) { dsrUnderLoad(t, module) })
	}
}

func dsrUnderLoad(t *testing.T, module string) {
	l := upDSRWith(t, module, "mode: dsr")
	ctx := context.Background()
	target := echoTarget{ns: l.External("ext").NetnsPath(), addr: l.Node("n1").IP + ":30090", name: "web-2"}
	if failed := holdConnections(ctx, 1000, []echoTarget{target}); len(failed) > 0 {
		t.Fatalf("%d of 1000 DSR connections failed; first: %s", len(failed), failed[0])
	}
	// Long-lived flows through the agent's restart and kill on n2, the
	// node that holds their DSR state.
	targets := make([]echoTarget, 20)
	for i := range targets {
		targets[i] = target
	}
	tk := talk(t, ctx, targets)
	restartAndKill(t, l, "n2", tk)
	if errs := tk.end(); len(errs) > 0 {
		t.Errorf("%d flows broke: %v", len(errs), errs)
	}
}

// A service's own forwarding mode overrides the pool's, and changing it
// moves only new flows: an established DSR flow keeps working.
func TestDSRPerServiceMode(t *testing.T) {
	l := upDSR(t, "dsr")
	ctx := context.Background()
	ext := l.External("ext")
	n1 := l.Node("n1")
	c := HTTPClient(ext.NetnsPath(), 3*time.Second)
	seen := func() string {
		got, err := Get(ctx, c, "http://"+n1.IP+":30080/client")
		if err != nil {
			t.Fatalf("ext -> n1:30080: %v", err)
		}
		_, from, _ := strings.Cut(got, " ")
		a, _, _ := strings.Cut(from, ":")
		return a
	}
	if got := seen(); got != ext.IP {
		t.Fatalf("the pool's mode (dsr): the backend saw %s, want the client %s", got, ext.IP)
	}
	conn, err := Dial(ctx, ext.NetnsPath(), "tcp4", n1.IP+":30090")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := bufio.NewReader(conn)
	say := func(msg string) {
		t.Helper()
		_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := fmt.Fprintln(conn, msg); err != nil {
			t.Fatal(err)
		}
		if line, err := r.ReadString('\n'); err != nil || strings.TrimSpace(line) != "web-2: "+msg {
			t.Fatalf("established flow: %q %v", line, err)
		}
	}
	say("before")
	snat := strings.Replace(dsrServices, "    type: LoadBalancer\n", "    type: LoadBalancer\n    forwardingMode: snat\n", 1)
	for _, n := range l.Nodes {
		if err := l.Apply(n.Name, []byte(snat)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 10*time.Second, "new flows to go by SNAT", func() bool { return seen() == n1.IP })
	say("after the change")
	for range 5 {
		if got := seen(); got != n1.IP {
			t.Errorf("service mode snat: the backend saw %s, want n1 %s", got, n1.IP)
		}
	}
}

// DSR by IP-in-IP, native routing: requests reach n2 inside an outer IPv4
// header from n1 to the backend, the request itself untouched (the client
// and the address it called); n2 decapsulates and its replies leave for
// the client from the service address without passing n1. Pods get an MTU
// 20 bytes smaller.
func TestDSRIPIP(t *testing.T) {
	l := upDSRWith(t, "dsr-ipip", "mode: dsr")
	ctx := context.Background()
	ext := l.External("ext")
	n1 := l.Node("n1")
	c := HTTPClient(ext.NetnsPath(), 3*time.Second)
	for _, url := range []string{"http://" + n1.IP + ":30080/client", "http://" + lbIP + "/client"} {
		got, err := Get(ctx, c, url)
		if err != nil {
			t.Fatalf("ext -> %s: %v", url, err)
		}
		if who, seen, _ := strings.Cut(got, " "); who != "web-2" || !strings.HasPrefix(seen, ext.IP+":") {
			t.Errorf("ext -> %s: %q; want web-2 to see the client %s", url, got, ext.IP)
		}
	}
	var atN1, atN2 [][]byte
	atN1 = capture(t, l, "u-n1", func() {
		atN2 = capture(t, l, "u-n2", func() {
			for range 5 {
				if _, err := Get(ctx, c, "http://"+n1.IP+":30080/"); err != nil {
					t.Errorf("ext -> n1:30080: %v", err)
				}
				if got, err := UDPAsk(ctx, ext.NetnsPath(), n1.IP+":30053", "ping", 3*time.Second); err != nil || got != "web-2: ping" {
					t.Errorf("ext -> n1:30053/udp: %q %v", got, err)
				}
			}
		})
	})
	w1, w2 := wire(atN1, ext.IP), wire(atN2, ext.IP)
	if w1.framesToExt != 0 {
		t.Errorf("%d frames to the client crossed n1's port: %v", w1.framesToExt, w1.toExt)
	}
	if w2.toExt[n1.IP+":30080 TCP"] == 0 || w2.toExt[n1.IP+":30053 UDP"] == 0 || len(w2.toExt) != 2 {
		t.Errorf("replies to the client leaving n2: %v; want them from %s:30080 and :30053 only", w2.toExt, n1.IP)
	}
	inner := map[string]int{}
	for _, f := range atN2 {
		pkt := gopacket.NewPacket(f, layers.LayerTypeEthernet, gopacket.Default)
		var ips []*layers.IPv4
		for _, ly := range pkt.Layers() {
			if ip, ok := ly.(*layers.IPv4); ok {
				ips = append(ips, ip)
			}
		}
		if len(ips) != 2 || ips[0].Protocol != layers.IPProtocolIPv4 {
			continue
		}
		out, in := ips[0], ips[1]
		if out.SrcIP.String() != n1.IP || out.DstIP.String() != "10.244.2.11" || out.Flags&layers.IPv4DontFragment == 0 {
			t.Errorf("outer header %s -> %s flags %v; want %s -> 10.244.2.11 with DF", out.SrcIP, out.DstIP, out.Flags, n1.IP)
		}
		var dport int
		if tcp, _ := pkt.Layer(layers.LayerTypeTCP).(*layers.TCP); tcp != nil {
			dport = int(tcp.DstPort)
		} else if udp, _ := pkt.Layer(layers.LayerTypeUDP).(*layers.UDP); udp != nil {
			dport = int(udp.DstPort)
		}
		inner[in.SrcIP.String()+" -> "+in.DstIP.String()+":"+strconv.Itoa(dport)]++
	}
	want1, want2 := ext.IP+" -> "+n1.IP+":30080", ext.IP+" -> "+n1.IP+":30053"
	if inner[want1] == 0 || inner[want2] != 5 || len(inner) != 2 {
		t.Errorf("requests inside IP-in-IP reaching n2: %v; want %q and 5 of %q", inner, want1, want2)
	}
	var mtu int
	if err := netns.Do(l.Pod("web-2").NetnsPath(), func() error {
		ifi, err := net.InterfaceByName("eth0")
		if err == nil {
			mtu = ifi.MTU
		}
		return err
	}); err != nil || mtu != 1480 {
		t.Errorf("web-2's MTU %d (%v), want 1480: room for the outer header", mtu, err)
	}
}

// A client port used at once for a SNAT flow and a DSR flow to the same
// backend (the kernel picks ports per destination): the DSR flow keeps the
// client's port on the wire, so its replies, which bypass the receiving
// node, reach the client's socket. (A remapped port broke such flows.)
func TestDSRAndSNATShareAClientPort(t *testing.T) {
	l := upDSR(t, "dsr")
	for _, n := range l.Nodes {
		if err := l.Apply(n.Name, []byte(dsrBenchServices)); err != nil {
			t.Fatal(err)
		}
	}
	n1 := l.Node("n1")
	waitFor(t, 10*time.Second, "the services on n1", func() bool { return len(serviceRows(t, n1)) == 12 })
	ext := l.External("ext")
	dial := func(port int) net.Conn {
		t.Helper()
		c, err := dialFrom(context.Background(), ext.NetnsPath(), 45000, net.JoinHostPort(n1.IP, strconv.Itoa(port)))
		if err != nil {
			t.Fatalf("dial n1:%d from port 45000: %v", port, err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	snat, dsr := dial(30190), dial(30191)
	for i, c := range []net.Conn{snat, dsr, snat, dsr} {
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		msg := fmt.Sprintf("hello %d", i)
		if _, err := fmt.Fprintln(c, msg); err != nil {
			t.Fatal(err)
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || strings.TrimSpace(line) != "web-2: "+msg {
			t.Fatalf("exchange %d on %s: %q %v", i, c.RemoteAddr(), line, err)
		}
	}
}

// With ipipSourcePrefix, the outer sources of IP-in-IP come from that
// network and vary with the flow (the backend node's receive queues
// spread them); and a datagram the outer header would push past the MTU
// is answered with fragmentation needed announcing 1,480.
func TestDSRIPIPSourcesAndMTU(t *testing.T) {
	l := upDSRWith(t, "dsr-ipip", "mode: dsr, ipipSourcePrefix: 100.64.10.0/24")
	ctx := context.Background()
	ext := l.External("ext")
	n1 := l.Node("n1")
	prefix := netip.MustParsePrefix("100.64.10.0/24")
	sources := map[netip.Addr]int{}
	frames := capture(t, l, "u-n2", func() {
		for i := range 10 {
			if got, err := UDPAsk(ctx, ext.NetnsPath(), n1.IP+":30053", fmt.Sprintf("q%d", i), 3*time.Second); err != nil || got != fmt.Sprintf("web-2: q%d", i) {
				t.Errorf("ext -> n1:30053/udp: %q %v", got, err)
			}
		}
	})
	for _, f := range frames {
		pkt := gopacket.NewPacket(f, layers.LayerTypeEthernet, gopacket.Default)
		ip, _ := pkt.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
		if ip == nil || ip.Protocol != layers.IPProtocolIPv4 {
			continue
		}
		src, _ := netip.AddrFromSlice(ip.SrcIP)
		if !prefix.Contains(src) {
			t.Errorf("an IP-in-IP packet came from %s, outside %s", src, prefix)
		}
		sources[src]++
	}
	if len(sources) < 2 {
		t.Errorf("10 flows came from %d outer sources %v; want them spread", len(sources), sources)
	}
	fd := dgramSocket(t, ext.NetnsPath())
	if err := unix.Connect(fd, &unix.SockaddrInet4{Port: 30053, Addr: netip.MustParseAddr(n1.IP).As4()}); err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Write(fd, make([]byte, 1500-20-8)); err != nil {
		t.Fatalf("first send: %v", err)
	}
	waitFor(t, 5*time.Second, "the client to learn a path MTU of 1480", func() bool {
		mtu, err := unix.GetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MTU)
		return err == nil && mtu == 1480
	})
}
