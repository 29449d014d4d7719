package lab

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/netns"
	"github.com/weirnet/weir/core/proc"
)

var serverWork = Workload{HTTP: 8080, UDP: 5353, Echo: 9000, Sink: 7000, Source: 7100}

// threeNodes is the multi-node lab: three nodes on one underlay, two pods
// each.
func threeNodes(config string) *Spec {
	return &Spec{
		Name: newLabName(),
		Nodes: []NodeSpec{
			{Name: "n1", PodCIDR: "10.244.1.0/24", Pods: []PodSpec{
				{Name: "client", IP: "10.244.1.10"},
				{Name: "web-1", IP: "10.244.1.11", Serve: serverWork}}},
			{Name: "n2", PodCIDR: "10.244.2.0/24", Pods: []PodSpec{
				{Name: "web-2", IP: "10.244.2.11", Serve: serverWork},
				{Name: "peer-2", IP: "10.244.2.12", Serve: serverWork}}},
			{Name: "n3", PodCIDR: "10.244.3.0/24", Labels: map[string]string{"weir.dev/mode": "native"}, Pods: []PodSpec{
				{Name: "web-3", IP: "10.244.3.11", Serve: serverWork},
				{Name: "web-4", IP: "10.244.3.12", Serve: serverWork}}},
		},
		AgentConfig: config,
	}
}

const crossServices = `services:
  - name: web
    clusterIP: 10.96.0.10
    ports: [{name: http, port: 80, targetPort: 8080}]
    backends: [{ip: 10.244.1.11}, {ip: 10.244.2.11}, {ip: 10.244.3.11}, {ip: 10.244.3.12}]
  - name: remote
    clusterIP: 10.96.0.20
    ports: [{name: http, port: 80, targetPort: 8080}]
    backends: [{ip: 10.244.3.11}, {ip: 10.244.3.12}]
  - name: bulk
    clusterIP: 10.96.0.30
    ports: [{name: sink, port: 7000}]
    backends: [{ip: 10.244.2.11}]
  - name: bulk-udp
    clusterIP: 10.96.0.31
    ports: [{name: udp, port: 5353, protocol: UDP}]
    backends: [{ip: 10.244.2.11}]
`

// mode is one forwarding setup to run every multi-node test under.
type mode struct {
	name   string
	config string
	// encap says whether traffic between two nodes is encapsulated, and
	// how: "" for plain IP.
	encap func(a, b string) string
	mtu   int
}

var modes = []mode{
	{name: "vxlan", config: "modules: [endpoints, lb, tunnel]\nsettings: {tunnel: {protocol: vxlan}}\n",
		encap: func(_, _ string) string { return "vxlan" }, mtu: 1450},
	{name: "geneve", config: "modules: [endpoints, lb, tunnel]\nsettings: {tunnel: {protocol: geneve, vni: 42}}\n",
		encap: func(_, _ string) string { return "geneve" }, mtu: 1450},
	{name: "native", config: "modules: [endpoints, lb, nativerouting]\n",
		encap: func(_, _ string) string { return "" }, mtu: 1500},
	// n3 is in a pool that routes natively; n1 and n2 tunnel between
	// themselves and reach n3 natively (valid on a shared underlay).
	{name: "mixed", config: "modules: [endpoints, lb, tunnel]\nnodePools:\n  - name: native\n    nodeSelector: {matchLabels: {weir.dev/mode: native}}\n    modules: {disable: [tunnel], enable: [nativerouting]}\n",
		encap: func(a, b string) string {
			if a == "n3" || b == "n3" {
				return ""
			}
			return "vxlan"
		}, mtu: 1450},
}

func upMulti(t *testing.T, m mode) *Lab {
	t.Helper()
	return upThreeNodes(t, m.config, nil, crossServices, 4)
}

// upThreeNodes brings up threeNodes with the agent configuration config
// and the external hosts, applies services on every node, and waits until
// each holds frontends rows of the services map (every frontend and
// scope).
func upThreeNodes(tb testing.TB, config string, externals []ExternalSpec, services string, frontends int) *Lab {
	tb.Helper()
	cfg := filepath.Join(tb.TempDir(), "agent.yaml")
	if err := os.WriteFile(cfg, []byte(config), 0o600); err != nil {
		tb.Fatal(err)
	}
	spec := threeNodes(cfg)
	spec.Externals = externals
	l := up(tb, spec)
	for _, n := range l.Nodes {
		if err := l.Apply(n.Name, []byte(services)); err != nil {
			tb.Fatal(err)
		}
	}
	waitFor(tb, time.Minute, "services on every node", func() bool {
		for _, n := range l.Nodes {
			if len(serviceRows(tb, n)) != frontends {
				return false
			}
		}
		return true
	})
	return l
}

func TestMultiNode(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			l := upMulti(t, m)
			ctx := context.Background()
			client := l.Pod("client")

			t.Run("pod to pod on one node and across nodes", func(t *testing.T) {
				for _, c := range []struct{ from, to string }{
					{"client", "web-1"}, {"client", "web-2"}, {"client", "web-3"},
					{"peer-2", "web-3"}, {"web-3", "peer-2"}, {"web-4", "web-1"},
				} {
					from, to := l.Pod(c.from), l.Pod(c.to)
					who, err := Get(ctx, HTTPClient(from.NetnsPath(), 3*time.Second), "http://"+to.IP+":8080/")
					if err != nil || who != c.to {
						t.Errorf("%s -> %s: %q %v", c.from, c.to, who, err)
					}
				}
			})

			t.Run("service with only remote backends", func(t *testing.T) {
				n1 := l.Node("n1")
				egressBefore := metric(t, n1, "netdev-egress", datapath.ReasonPass)
				podBefore := metric(t, n1, "pod-egress", datapath.ReasonPass)
				got := get(t, client, "http://10.96.0.20/", 60)
				// Pod packets a stage already sent on (encapsulated, or
				// natively) are not looked at again on the uplink's egress.
				if eg, pod := metric(t, n1, "netdev-egress", datapath.ReasonPass)-egressBefore, metric(t, n1, "pod-egress", datapath.ReasonPass)-podBefore; pod < 300 || eg > pod/10 {
					t.Errorf("60 requests: %d packets passed pod-egress and %d went through the uplink's egress stages; want the pod packets not counted there", pod, eg)
				}
				if got["web-3"] == 0 || got["web-4"] == 0 || got["web-3"]+got["web-4"] != 60 {
					t.Fatalf("remote-only service answered %v", got)
				}
				if all := get(t, client, "http://10.96.0.10/", 120); len(all) != 4 {
					t.Fatalf("service over three nodes reached %v", all)
				}
			})

			t.Run("pod MTU leaves room for the tunnel", func(t *testing.T) {
				if got := linkMTU(t, client.NetnsPath(), "eth0"); got != m.mtu {
					t.Fatalf("pod MTU %d, want %d", got, m.mtu)
				}
			})

			t.Run("wire format on the underlay", func(t *testing.T) {
				for _, pair := range [][2]string{{"web-2", "n2"}, {"web-3", "n3"}} {
					target := l.Pod(pair[0])
					frames := capture(t, l, "u-n1", func() {
						if _, err := Get(ctx, HTTPClient(client.NetnsPath(), 3*time.Second), "http://"+target.IP+":8080/"); err != nil {
							t.Fatal(err)
						}
					})
					checkWire(t, frames, l.Node("n1").IP, l.Node(pair[1]).IP, client.IP, target.IP, m.encap("n1", pair[1]), m)
				}
			})

			t.Run("100 MB across nodes", func(t *testing.T) {
				cx, cancel := context.WithTimeout(ctx, 2*time.Minute)
				defer cancel()
				const size = 100 << 20
				start := time.Now()
				got, err := Send(cx, client.NetnsPath(), l.Pod("web-2").IP+":7000", size)
				if err != nil || got != size {
					t.Fatalf("sent %d of %d bytes: %v", got, size, err)
				}
				t.Logf("%s: 100 MiB n1 -> n2 in %v (%.0f Mbit/s)", m.name, time.Since(start).Round(time.Millisecond),
					float64(size*8)/time.Since(start).Seconds()/1e6)
			})

			t.Run("large UDP across nodes", func(t *testing.T) {
				// Larger than the MTU: the pod fragments it, the
				// fragments cross the tunnel, the peer reassembles.
				msg := strings.Repeat("u", 3000)
				ans, err := UDPAsk(ctx, client.NetnsPath(), l.Pod("web-2").IP+":5353", msg, 3*time.Second)
				if err != nil || ans != "web-2: "+msg {
					t.Fatalf("3000-byte UDP: %d bytes back, %v", len(ans), err)
				}
			})

			if m.name != "native" {
				t.Run("fragmentation needed for UDP with DF", func(t *testing.T) {
					pmtuUDP(t, l, m)
				})
			}
		})
	}
}

// pmtuUDP: the path shrinks under running pods (the uplink's MTU drops
// below what their MTU assumed). A DF datagram too big for it is answered
// with ICMP "fragmentation needed", the pod learns the path MTU (the next
// such send fails at once with EMSGSIZE instead of vanishing), datagrams
// that fit still pass, and TCP finds the smaller MSS and completes.
func pmtuUDP(t *testing.T, l *Lab, m mode) {
	client := l.Pod("client")
	n1 := l.Node("n1")
	h, err := netns.Handle(n1.NetnsPath())
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	uplink, err := h.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	const shrunk = 1400
	if err := h.LinkSetMTU(uplink, shrunk); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = h.LinkSetMTU(uplink, 1500) }()
	before := metric(t, n1, "pod-egress", datapath.DropFragNeeded)
	room := shrunk - 50

	target := netip.MustParseAddrPort(l.Pod("web-2").IP + ":5353")
	var fd int
	if err := netns.Do(client.NetnsPath(), func() error {
		var err error
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
		if err != nil {
			return err
		}
		return unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO)
	}); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	sa := &unix.SockaddrInet4{Port: int(target.Port()), Addr: target.Addr().As4()}
	big := make([]byte, m.mtu-28)
	if err := unix.Sendto(fd, big, 0, sa); err != nil {
		t.Fatalf("first send of a %d-byte datagram: %v", m.mtu, err)
	}
	waitFor(t, 5*time.Second, "the pod to learn the path MTU", func() bool {
		err := unix.Sendto(fd, big, 0, sa)
		return err == syscall.EMSGSIZE
	})
	if after := metric(t, n1, "pod-egress", datapath.DropFragNeeded); after <= before {
		t.Fatalf("no ICMP fragmentation needed counted (%d -> %d)", before, after)
	}
	if err := unix.Connect(fd, sa); err != nil {
		t.Fatal(err)
	}
	mtu, err := unix.GetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MTU)
	if err != nil || mtu != room {
		t.Fatalf("path MTU learnt %d (%v), want %d", mtu, err, room)
	}
	// Datagrams that fit the path go through (the answer, "web-2: " and
	// the datagram, must fit the way back too: only n1's uplink shrank).
	size := room - 28 - len("web-2: ")
	ans, err := UDPAsk(context.Background(), client.NetnsPath(), target.String(), strings.Repeat("f", size), 3*time.Second)
	if err != nil || len(ans) != len("web-2: ")+size {
		t.Fatalf("a datagram that fits: %d bytes back, %v", len(ans), err)
	}
	// TCP through the shrunk path completes.
	cx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if got, err := Send(cx, client.NetnsPath(), l.Pod("web-2").IP+":7000", 10<<20); err != nil || got != 10<<20 {
		t.Fatalf("10 MiB over the shrunk path: %d bytes, %v", got, err)
	}
	// And through a ClusterIP whose backend is behind it: the tunnel's
	// "fragmentation needed" reaches the client quoting the packet it
	// sent (to the ClusterIP), so it lowers its MSS for the ClusterIP.
	cx2, cancel2 := context.WithTimeout(context.Background(), time.Minute)
	defer cancel2()
	if got, err := Send(cx2, client.NetnsPath(), "10.96.0.30:7000", 10<<20); err != nil || got != 10<<20 {
		t.Fatalf("10 MiB through a ClusterIP over the shrunk path: %d bytes, %v", got, err)
	}
	// UDP through a ClusterIP (another one: path MTUs are learnt per
	// destination) learns the path MTU the same way.
	vfd := dgramSocket(t, client.NetnsPath())
	vsa := &unix.SockaddrInet4{Port: 5353, Addr: [4]byte{10, 96, 0, 31}}
	if err := unix.Sendto(vfd, big, 0, vsa); err != nil {
		t.Fatalf("first send to the ClusterIP: %v", err)
	}
	waitFor(t, 5*time.Second, "the pod to learn the path MTU to the ClusterIP", func() bool {
		return unix.Sendto(vfd, big, 0, vsa) == syscall.EMSGSIZE
	})
}

// dgramSocket is a UDP socket in the namespace that never fragments (DF),
// closed when the test ends.
func dgramSocket(t *testing.T, nsPath string) int {
	t.Helper()
	var fd int
	if err := netns.Do(nsPath, func() error {
		var err error
		if fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0); err != nil {
			return err
		}
		return unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO)
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// metric returns the packets counted on a node for a hook and reason.
func metric(t *testing.T, n *Node, hook string, r datapath.Reason) uint64 {
	t.Helper()
	p, err := datapath.OpenPinned(n.PinDir)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	rows, err := p.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	for _, row := range rows {
		if row.Hook == hook && row.Code == uint8(r) {
			return row.Packets
		}
	}
	return 0
}

// capture records the frames crossing one underlay port while fn runs.
func capture(t *testing.T, l *Lab, port string, fn func()) [][]byte {
	t.Helper()
	return captureOn(t, netns.Path(l.Underlay), port, fn)
}

// captureOn records the frames crossing one interface of a namespace
// while fn runs (taps see what arrives before tc ingress runs).
func captureOn(t *testing.T, nsPath, ifname string, fn func()) [][]byte {
	t.Helper()
	var fd int
	if err := netns.Do(nsPath, func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index})
	}); err != nil {
		t.Fatal(err)
	}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000})
	var mu sync.Mutex
	var frames [][]byte
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		buf := make([]byte, 65536)
		for {
			select {
			case <-done:
				return
			default:
			}
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				continue
			}
			mu.Lock()
			frames = append(frames, append([]byte(nil), buf[:n]...))
			mu.Unlock()
		}
	})
	time.Sleep(50 * time.Millisecond)
	fn()
	time.Sleep(100 * time.Millisecond)
	close(done)
	wg.Wait()
	unix.Close(fd)
	return frames
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// checkWire decodes the captured frames between two nodes with gopacket:
// with a tunnel, every pod packet is inside valid outer IPv4/UDP with the
// right VNI; natively, pod packets travel as they are.
func checkWire(t *testing.T, frames [][]byte, nodeA, nodeB, podA, podB, encap string, m mode) {
	t.Helper()
	a, b := netip.MustParseAddr(nodeA), netip.MustParseAddr(nodeB)
	pa, pb := netip.MustParseAddr(podA), netip.MustParseAddr(podB)
	tunnelled, plain := 0, 0
	for _, f := range frames {
		pkt := gopacket.NewPacket(f, layers.LayerTypeEthernet, gopacket.Default)
		ip, _ := pkt.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
		if ip == nil {
			continue
		}
		src, _ := netip.AddrFromSlice(ip.SrcIP)
		dst, _ := netip.AddrFromSlice(ip.DstIP)
		switch {
		case (src == a && dst == b) || (src == b && dst == a):
			udp, _ := pkt.Layer(layers.LayerTypeUDP).(*layers.UDP)
			if udp == nil || len(udp.Payload) < 8+14+20 {
				continue
			}
			c := *ip
			if err := c.SerializeTo(gopacket.NewSerializeBuffer(), gopacket.SerializeOptions{ComputeChecksums: true}); err != nil || c.Checksum != ip.Checksum {
				t.Errorf("outer IP checksum %#x, correct %#x", ip.Checksum, c.Checksum)
			}
			vni := binary.BigEndian.Uint32(udp.Payload[4:]) >> 8
			wantPort, wantVNI := uint16(8472), uint32(1)
			if encap == "geneve" {
				wantPort = 6081
				if m.name == "geneve" {
					wantVNI = 42
				}
			}
			if uint16(udp.DstPort) != wantPort || vni != wantVNI {
				t.Errorf("tunnel packet to port %d VNI %d, want %d/%d", udp.DstPort, vni, wantPort, wantVNI)
			}
			inner := gopacket.NewPacket(udp.Payload[8:], layers.LayerTypeEthernet, gopacket.Default)
			iip, _ := inner.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
			if iip == nil {
				t.Errorf("tunnel packet without inner IPv4: %v", inner)
				continue
			}
			isrc, _ := netip.AddrFromSlice(iip.SrcIP)
			idst, _ := netip.AddrFromSlice(iip.DstIP)
			if (isrc != pa || idst != pb) && (isrc != pb || idst != pa) {
				t.Errorf("inner %v -> %v, want between %v and %v", isrc, idst, pa, pb)
			}
			tunnelled++
		case (src == pa && dst == pb) || (src == pb && dst == pa):
			plain++
		}
	}
	if encap != "" && (tunnelled == 0 || plain != 0) {
		t.Fatalf("between %s and %s: %d tunnelled, %d plain pod packets; want all %s", nodeA, nodeB, tunnelled, plain, encap)
	}
	if encap == "" && (plain == 0 || tunnelled != 0) {
		t.Fatalf("between %s and %s: %d tunnelled, %d plain pod packets; want all plain", nodeA, nodeB, tunnelled, plain)
	}
}

// Pools that tunnel differently could not reach each other: the agent
// refuses such a configuration.
func TestPoolsThatTunnelDifferentlyAreRefused(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "agent.yaml")
	conf := "modules: [endpoints, lb, tunnel]\nnodePools:\n  - name: g\n    nodeSelector: {matchLabels: {weir.dev/mode: native}}\n    settings: {tunnel: {protocol: geneve}}\n"
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Up(context.Background(), threeNodes(cfg), Options{AgentBinary: bin.agent, StateRoot: testStateRoot, PinRoot: testPinRoot})
	want := `pool "g" tunnels with geneve/6081/vni=1 but the top-level modules tunnel with vxlan/8472/vni=1`
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("lab with pools tunnelling differently: %v", fmt.Sprint(err))
	}
}

// A configuration change that moves another node into a pool that routes
// natively rewrites how this node reaches it, though this node itself
// runs on unchanged: no stale encapsulation toward a node that no longer
// decapsulates.
func TestAnotherPoolsForwardingChange(t *testing.T) {
	l := upMulti(t, modes[0]) // every node tunnels (VXLAN)
	ctx := context.Background()
	client := l.Pod("client")
	reach := func(what string) {
		t.Helper()
		for _, to := range []string{"web-2", "web-3"} {
			var who string
			var err error
			waitFor(t, 20*time.Second, what+": client -> "+to, func() bool {
				who, err = Get(ctx, HTTPClient(client.NetnsPath(), time.Second), "http://"+l.Pod(to).IP+":8080/")
				return err == nil && who == to
			})
		}
	}
	via := func(node, prefix string) string {
		p, err := datapath.OpenPinned(l.Node(node).PinDir)
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		rows, err := p.IPCache()
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rows {
			if r.Prefix.String() == prefix {
				return r.Via
			}
		}
		return ""
	}
	reach("all tunnel")
	if v := via("n1", "10.244.3.0/24"); v != "tunnel" {
		t.Fatalf("n1 reaches n3's pods via %q, want tunnel", v)
	}
	for _, n := range l.Nodes {
		if err := os.WriteFile(n.Config, []byte(modes[3].config), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 30*time.Second, "n3 to run the native pool", func() bool {
		st, err := l.Node("n3").Client().Status(ctx)
		return err == nil && st.Ready && st.Pool == "native"
	})
	waitFor(t, 10*time.Second, "n1 to reach n3 natively", func() bool { return via("n1", "10.244.3.0/24") == "native" })
	if via("n1", "10.244.2.0/24") != "tunnel" {
		t.Fatal("n1 stopped tunnelling to n2")
	}
	reach("n3 native")
	if strings.Contains(proc.Tail(l.Node("n1").Log, 200), "restarting with the new module set") {
		t.Fatal("n1 restarted; it should have run on unchanged and only rewritten its ipcache")
	}
}
