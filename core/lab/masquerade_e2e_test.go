package lab

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"

	"github.com/weirnet/weir/core/netns"
)

// The "internet" host beyond the lab's router.
const inetIP = "203.0.113.10"

// upMasquerade is the multi-node lab of a forwarding mode with masquerade,
// an internet host beyond the router and a client on the underlay.
func upMasquerade(t *testing.T, m mode) *Lab {
	t.Helper()
	config := strings.Replace(m.config, "modules: [endpoints, lb,", "modules: [endpoints, lb, masquerade,", 1)
	return upThreeNodes(t, config, []ExternalSpec{
		{Name: "inet", Subnet: "203.0.113.0/24", Serve: Workload{HTTP: 8080, UDP: 5353, Echo: 9000}},
		// ext also reaches n1's pods directly, as routable pod
		// addresses are reached.
		{Name: "ext", Serve: Workload{HTTP: 8080}, Routes: map[string]string{"10.244.1.0/24": "n1"}},
	}, crossServices, 4)
}

func TestMasquerade(t *testing.T) {
	for _, m := range []mode{modes[0], modes[2]} {
		t.Run(m.name, func(t *testing.T) {
			l := upMasquerade(t, m)
			ctx := context.Background()
			ext := l.External("ext")

			t.Run("pods reach the internet host with their node's address", func(t *testing.T) {
				for _, pod := range []string{"client", "peer-2", "web-3"} {
					p := l.Pod(pod)
					n := l.Node(p.Node)
					for _, host := range []string{inetIP, ext.IP} {
						got, err := Get(ctx, HTTPClient(p.NetnsPath(), 3*time.Second), "http://"+host+":8080/client")
						if err != nil {
							t.Fatalf("%s -> %s: %v", pod, host, err)
						}
						_, seen, _ := strings.Cut(got, " ")
						if from, err := netip.ParseAddrPort(seen); err != nil || from.Addr().String() != n.IP {
							t.Errorf("%s -> %s: the host saw %q; want the node's address %s", pod, host, seen, n.IP)
						}
					}
					got, err := UDPAsk(ctx, p.NetnsPath(), inetIP+":5353", "ping", 3*time.Second)
					if err != nil || got != "inet: ping" {
						t.Errorf("%s -> %s:5353/udp: %q %v", pod, inetIP, got, err)
					}
				}
			})

			t.Run("a pod answers connections from outside with its own address", func(t *testing.T) {
				got, err := Get(ctx, HTTPClient(ext.NetnsPath(), 3*time.Second), "http://10.244.1.11:8080/client")
				if err != nil {
					t.Fatalf("ext -> web-1 directly: %v", err)
				}
				if who, seen, _ := strings.Cut(got, " "); who != "web-1" || !strings.HasPrefix(seen, ext.IP+":") {
					t.Errorf("ext -> web-1: %q", got)
				}
				if got, err := UDPAsk(ctx, ext.NetnsPath(), "10.244.1.11:5353", "ping", 3*time.Second); err != nil || got != "web-1: ping" {
					t.Errorf("ext -> web-1:5353/udp: %q %v", got, err)
				}
			})

			t.Run("curl from a pod", func(t *testing.T) {
				client := l.Pod("client")
				cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				defer cancel()
				out, err := Exec(cctx, client.NetnsPath(), filepath.Join(l.Node("n1").Cgroup, "pods"),
					"curl", "-sS", "--max-time", "5", "http://"+inetIP+":8080/client")
				if err != nil {
					t.Fatal(err)
				}
				if who, seen, _ := strings.Cut(strings.TrimSpace(out), " "); who != "inet" || !strings.HasPrefix(seen, l.Node("n1").IP+":") {
					t.Errorf("curl from client: %q; want the internet host to see n1's %s", out, l.Node("n1").IP)
				}
			})

			t.Run("ICMP echo", func(t *testing.T) {
				client := l.Pod("client")
				n1 := l.Node("n1")
				var seen []string
				frames := captureOn(t, l.External("inet").NetnsPath(), "eth0", func() {
					for seq := 1; seq <= 3; seq++ {
						if err := ping(client.NetnsPath(), inetIP, seq); err != nil {
							t.Errorf("client -> %s ping %d: %v", inetIP, seq, err)
						}
					}
				})
				for _, f := range frames {
					pkt := gopacket.NewPacket(f, layers.LayerTypeEthernet, gopacket.Default)
					ip, _ := pkt.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
					ic, _ := pkt.Layer(layers.LayerTypeICMPv4).(*layers.ICMPv4)
					if ip != nil && ic != nil && ic.TypeCode.Type() == layers.ICMPv4TypeEchoRequest {
						seen = append(seen, ip.SrcIP.String())
					}
				}
				if len(seen) < 3 {
					t.Fatalf("the internet host saw %d echo requests, want 3", len(seen))
				}
				for _, s := range seen {
					if s != n1.IP {
						t.Errorf("an echo request reached the internet host from %s; want n1's %s", s, n1.IP)
					}
				}
			})

			t.Run("1000 concurrent connections from pods all complete", func(t *testing.T) {
				var targets []echoTarget
				for _, p := range []string{"client", "peer-2", "web-3", "web-4"} {
					targets = append(targets, echoTarget{ns: l.Pod(p).NetnsPath(), addr: inetIP + ":9000", name: "inet"})
				}
				if failed := holdConnections(ctx, 1000, targets); len(failed) > 0 {
					t.Errorf("%d of 1000 connections failed; first: %s", len(failed), failed[0])
				}
			})

			t.Run("on the wire only node addresses leave for the internet", func(t *testing.T) {
				frames := capture(t, l, "u-rt", func() {
					for _, pod := range []string{"client", "web-3"} {
						if _, err := Get(ctx, HTTPClient(l.Pod(pod).NetnsPath(), 3*time.Second), "http://"+inetIP+":8080/"); err != nil {
							t.Errorf("%s -> internet: %v", pod, err)
						}
					}
				})
				nodes := map[string]bool{}
				for _, n := range l.Nodes {
					nodes[n.IP] = true
				}
				toInet := 0
				for _, f := range frames {
					pkt := gopacket.NewPacket(f, layers.LayerTypeEthernet, gopacket.Default)
					ip, _ := pkt.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
					if ip == nil || ip.DstIP.String() != inetIP {
						continue
					}
					toInet++
					if !nodes[ip.SrcIP.String()] {
						t.Errorf("a packet left for the internet from %s, not a node address", ip.SrcIP)
					}
				}
				if toInet == 0 {
					t.Error("no packet to the internet host crossed the router's port")
				}
			})
		})
	}
}

// icmpSum is the ones' complement sum of an ICMP message, checksum
// included: 0xffff when the checksum is right.
func icmpSum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

// ping sends one ICMP echo request from the namespace and waits for its
// reply.
func ping(nsPath, addr string, seq int) error {
	var c *icmp.PacketConn
	if err := netns.Do(nsPath, func() error {
		var err error
		c, err = icmp.ListenPacket("ip4:icmp", "0.0.0.0")
		return err
	}); err != nil {
		return err
	}
	defer c.Close()
	id := os.Getpid() & 0xffff
	msg := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: id, Seq: seq, Data: []byte("weir")}}
	b, err := msg.Marshal(nil)
	if err != nil {
		return err
	}
	dst := &net.IPAddr{IP: net.ParseIP(addr)}
	if _, err := c.WriteTo(b, dst); err != nil {
		return err
	}
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 1500)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return err
		}
		rm, err := icmp.ParseMessage(1, buf[:n])
		if err != nil || rm.Type != ipv4.ICMPTypeEchoReply || from.String() != addr {
			continue
		}
		if e, ok := rm.Body.(*icmp.Echo); ok && e.Seq == seq && e.ID == id {
			// The reply's identifier was translated back: its
			// checksum must still hold (ParseMessage does not check).
			if sum := icmpSum(buf[:n]); sum != 0xffff {
				return fmt.Errorf("echo reply with a bad checksum (sums to %#x)", sum)
			}
			return nil
		}
	}
}
