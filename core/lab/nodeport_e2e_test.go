package lab

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/weirnet/weir/core/datapath"
)

// Addresses a load balancer would announce, routed by the external client
// to n1 and n2.
const (
	lbIP       = "198.51.100.10"
	externalIP = "198.51.100.11"
	closedIP   = "198.51.100.12"
)

const northSouthServices = `services:
  - name: web
    clusterIP: 10.96.0.10
    type: LoadBalancer
    loadBalancerIPs: [` + lbIP + `]
    externalIPs: [` + externalIP + `]
    ports:
      - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
      - {name: udp, port: 53, targetPort: 5353, protocol: UDP, nodePort: 30053}
    backends: [{ip: 10.244.1.11, nodeName: n1}, {ip: 10.244.2.11, nodeName: n2}, {ip: 10.244.3.11, nodeName: n3}]
  - name: local
    clusterIP: 10.96.0.40
    type: NodePort
    externalTrafficPolicy: Local
    healthCheckNodePort: 30999
    ports: [{port: 80, targetPort: 8080, nodePort: 30081}]
    backends: [{ip: 10.244.1.11, nodeName: n1}, {ip: 10.244.2.11, nodeName: n2}]
  - name: closed
    clusterIP: 10.96.0.60
    type: LoadBalancer
    loadBalancerIPs: [` + closedIP + `]
    loadBalancerSourceRanges: [10.0.0.0/8, 172.16.0.0/12]
    ports: [{port: 80, targetPort: 8080}]
    backends: [{ip: 10.244.1.11, nodeName: n1}, {ip: 10.244.3.11, nodeName: n3}]
`

// hcAnswer is kube-proxy's health check answer.
type hcAnswer struct {
	Service struct {
		Namespace string `json:"namespace"`
		Name      string `json:"name"`
	} `json:"service"`
	LocalEndpoints      int  `json:"localEndpoints"`
	ServiceProxyHealthy bool `json:"serviceProxyHealthy"`
}

// podNode says which node a lab pod of threeNodes runs on.
var podNode = map[string]string{"web-1": "n1", "web-2": "n2", "web-3": "n3", "web-4": "n3"}

// upNorthSouth is the multi-node lab of a forwarding mode with nodeport,
// an external client on the underlay and the north-south services.
func upNorthSouth(t *testing.T, m mode) *Lab {
	t.Helper()
	config := strings.Replace(m.config, "modules: [endpoints, lb,", "modules: [endpoints, lb, nodeport,", 1)
	ext := []ExternalSpec{{Name: "ext", Routes: map[string]string{lbIP + "/32": "n1", externalIP + "/32": "n2", closedIP + "/32": "n1"}}}
	return upThreeNodes(t, config, ext, northSouthServices, 13) // every frontend and scope
}

func TestNodePort(t *testing.T) {
	for _, m := range modes[:3] {
		t.Run(m.name, func(t *testing.T) {
			l := upNorthSouth(t, m)
			ctx := context.Background()
			ext := l.External("ext")
			c := HTTPClient(ext.NetnsPath(), 3*time.Second)

			t.Run("NodePort on every node reaches local and remote backends", func(t *testing.T) {
				for _, n := range l.Nodes {
					local, remote := 0, 0
					for range 30 {
						got, err := Get(ctx, c, "http://"+n.IP+":30080/client")
						if err != nil {
							t.Fatalf("ext -> %s:30080: %v", n.Name, err)
						}
						pod, seen, _ := strings.Cut(got, " ")
						from, err := netip.ParseAddrPort(seen)
						if err != nil {
							t.Fatalf("ext -> %s:30080: answer %q", n.Name, got)
						}
						// A local backend sees the client; a remote one
						// the node that received the request (SNAT).
						switch {
						case podNode[pod] == n.Name && from.Addr().String() == ext.IP:
							local++
						case podNode[pod] != n.Name && from.Addr().String() == n.IP:
							remote++
						default:
							t.Fatalf("ext -> %s:30080: backend %s (on %s) saw the client as %s", n.Name, pod, podNode[pod], from)
						}
					}
					if local == 0 || remote == 0 {
						t.Errorf("ext -> %s:30080: %d local, %d remote backends in 30 requests; want both", n.Name, local, remote)
					}
				}
			})

			t.Run("UDP NodePort answers from the address called", func(t *testing.T) {
				for _, n := range l.Nodes {
					// A connected UDP socket takes only datagrams from the
					// address it sent to.
					got, err := UDPAsk(ctx, ext.NetnsPath(), n.IP+":30053", "ping", 3*time.Second)
					if err != nil || !strings.HasSuffix(got, ": ping") {
						t.Errorf("ext -> %s:30053/udp: %q %v", n.Name, got, err)
					}
				}
			})

			t.Run("load-balancer and external IPs", func(t *testing.T) {
				for _, addr := range []string{lbIP, externalIP} {
					for range 6 {
						got, err := Get(ctx, c, "http://"+addr+"/")
						if err != nil || podNode[got] == "" {
							t.Fatalf("ext -> %s:80: %q %v", addr, got, err)
						}
					}
				}
			})

			t.Run("loadBalancerSourceRanges", func(t *testing.T) {
				n1 := l.Node("n1")
				before := metric(t, n1, "netdev-ingress", datapath.DropSourceRange)
				short := HTTPClient(ext.NetnsPath(), 500*time.Millisecond)
				if got, err := Get(ctx, short, "http://"+closedIP+"/"); err == nil {
					t.Errorf("ext -> %s answered %q; the client is outside the service's source ranges", closedIP, got)
				}
				if after := metric(t, n1, "netdev-ingress", datapath.DropSourceRange); after <= before {
					t.Errorf("source range drops on n1: %d -> %d", before, after)
				}
				// The client's network joins the ranges: served.
				open := strings.Replace(northSouthServices, "[10.0.0.0/8, 172.16.0.0/12]", "[10.0.0.0/8, "+ext.IP+"/32]", 1)
				for _, n := range l.Nodes {
					if err := l.Apply(n.Name, []byte(open)); err != nil {
						t.Fatal(err)
					}
				}
				waitFor(t, 10*time.Second, "the client to be let in", func() bool {
					got, err := Get(ctx, short, "http://"+closedIP+"/")
					return err == nil && podNode[got] != ""
				})
				for _, n := range l.Nodes {
					if err := l.Apply(n.Name, []byte(northSouthServices)); err != nil {
						t.Fatal(err)
					}
				}
				waitFor(t, 10*time.Second, "the client to be refused again", func() bool {
					before := metric(t, n1, "netdev-ingress", datapath.DropSourceRange)
					_, err := Get(ctx, short, "http://"+closedIP+"/")
					return err != nil && metric(t, n1, "netdev-ingress", datapath.DropSourceRange) > before
				})
			})

			t.Run("externalTrafficPolicy Local keeps the client address", func(t *testing.T) {
				for _, n := range l.Nodes[:2] {
					for range 5 {
						got, err := Get(ctx, c, "http://"+n.IP+":30081/client")
						if err != nil {
							t.Fatalf("ext -> %s:30081: %v", n.Name, err)
						}
						pod, seen, _ := strings.Cut(got, " ")
						from, _ := netip.ParseAddrPort(seen)
						if podNode[pod] != n.Name || from.Addr().String() != ext.IP {
							t.Fatalf("ext -> %s:30081: backend %s saw %s; want the local backend to see %s", n.Name, pod, seen, ext.IP)
						}
					}
				}
				// n3 has no local backend: the request is dropped and
				// counted there, not sent elsewhere.
				n3 := l.Node("n3")
				before := metric(t, n3, "netdev-ingress", datapath.DropNoBackend)
				short := HTTPClient(ext.NetnsPath(), 500*time.Millisecond)
				if got, err := Get(ctx, short, "http://"+n3.IP+":30081/"); err == nil {
					t.Errorf("ext -> n3:30081 answered %q; n3 has no local backend", got)
				}
				if after := metric(t, n3, "netdev-ingress", datapath.DropNoBackend); after <= before {
					t.Errorf("no-backend drops on n3: %d -> %d", before, after)
				}
			})

			t.Run("pods reach NodePorts and load-balancer IPs, themselves included", func(t *testing.T) {
				for _, pod := range []string{"client", "web-3"} {
					pc := HTTPClient(l.Pod(pod).NetnsPath(), 3*time.Second)
					for _, url := range []string{"http://" + l.Node("n1").IP + ":30080/", "http://" + l.Node("n3").IP + ":30080/", "http://" + lbIP + "/", "http://" + externalIP + "/"} {
						if got, err := Get(ctx, pc, url); err != nil || podNode[got] == "" {
							t.Errorf("%s -> %s: %q %v", pod, url, got, err)
						}
					}
				}
				// A backend reaching itself through its own service (a
				// hairpin) sees the hairpin address as the client, not
				// its own (which its stack would drop as a martian).
				web1 := l.Pod("web-1")
				pc := HTTPClient(web1.NetnsPath(), 3*time.Second)
				for _, url := range []string{"http://" + l.Node("n1").IP + ":30080/client", "http://10.96.0.10/client"} {
					self := 0
					for range 30 {
						got, err := Get(ctx, pc, url)
						if err != nil {
							t.Fatalf("web-1 -> %s: %v", url, err)
						}
						pod, seen, _ := strings.Cut(got, " ")
						if pod != "web-1" {
							continue
						}
						self++
						if from, err := netip.ParseAddrPort(seen); err != nil || from.Addr().String() != "169.254.42.1" {
							t.Errorf("web-1 -> %s -> web-1: the backend saw %q, want 169.254.42.1", url, seen)
						}
					}
					if self == 0 {
						t.Errorf("web-1 -> %s never reached web-1 in 30 requests", url)
					}
				}
			})

			t.Run("health check node port answers as kube-proxy", func(t *testing.T) {
				check := func(n *Node) (int, hcAnswer) {
					var ans hcAnswer
					resp, err := c.Get("http://" + n.IP + ":30999/")
					if err != nil {
						return 0, ans
					}
					defer resp.Body.Close()
					_ = json.NewDecoder(resp.Body).Decode(&ans)
					return resp.StatusCode, ans
				}
				want := map[string]int{"n1": http.StatusOK, "n2": http.StatusOK, "n3": http.StatusServiceUnavailable}
				for _, n := range l.Nodes {
					code, ans := check(n)
					wantLocal := 1
					if n.Name == "n3" {
						wantLocal = 0
					}
					if code != want[n.Name] || ans.LocalEndpoints != wantLocal || ans.Service.Name != "local" || ans.Service.Namespace != "default" || !ans.ServiceProxyHealthy {
						t.Errorf("%s:30999: HTTP %d %+v; want %d with %d local endpoints", n.Name, code, ans, want[n.Name], wantLocal)
					}
				}
				// n1's backend goes: n1 answers 503; it comes back: 200.
				gone := strings.Replace(northSouthServices, "backends: [{ip: 10.244.1.11, nodeName: n1}, {ip: 10.244.2.11, nodeName: n2}]", "backends: [{ip: 10.244.2.11, nodeName: n2}]", 1)
				for _, n := range l.Nodes {
					if err := l.Apply(n.Name, []byte(gone)); err != nil {
						t.Fatal(err)
					}
				}
				n1 := l.Node("n1")
				waitFor(t, 10*time.Second, "n1's health check to say 503", func() bool {
					code, ans := check(n1)
					return code == http.StatusServiceUnavailable && ans.LocalEndpoints == 0
				})
				for _, n := range l.Nodes {
					if err := l.Apply(n.Name, []byte(northSouthServices)); err != nil {
						t.Fatal(err)
					}
				}
				waitFor(t, 10*time.Second, "n1's health check to say 200 again", func() bool {
					code, ans := check(n1)
					return code == http.StatusOK && ans.LocalEndpoints == 1
				})
			})

			t.Run("on the wire SNAT replies return through the receiving node", func(t *testing.T) {
				n1 := l.Node("n1")
				var toExt, fromBackend, direct, encap, encapIn int
				frames := capture(t, l, "u-n1", func() {
					for range 20 {
						if _, err := Get(ctx, c, "http://"+n1.IP+":30080/"); err != nil {
							t.Errorf("ext -> n1:30080: %v", err)
						}
					}
				})
				extIP := netip.MustParseAddr(ext.IP)
				for _, f := range frames {
					pkt := gopacket.NewPacket(f, layers.LayerTypeEthernet, gopacket.Default)
					ip, _ := pkt.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
					tcp, _ := pkt.Layer(layers.LayerTypeTCP).(*layers.TCP)
					if ip == nil {
						continue
					}
					src, _ := netip.AddrFromSlice(ip.SrcIP)
					dst, _ := netip.AddrFromSlice(ip.DstIP)
					if udp, _ := pkt.Layer(layers.LayerTypeUDP).(*layers.UDP); udp != nil && (udp.DstPort == 8472 || udp.DstPort == 6081) {
						switch {
						case src.String() == n1.IP:
							encap++ // n1 toward a remote backend, tunnelled
						case dst.String() == n1.IP:
							encapIn++ // a remote backend's reply, tunnelled back to n1
						}
						continue
					}
					if tcp == nil {
						continue
					}
					switch {
					case dst == extIP:
						toExt++
						if src.String() != n1.IP || tcp.SrcPort != 30080 {
							t.Errorf("a reply to the client left n1 from %s:%d; want %s:30080", src, tcp.SrcPort, n1.IP)
						}
					case src.String() == n1.IP && dst.String() != ext.IP && uint16(tcp.SrcPort) >= 32768:
						direct++ // n1 toward a remote backend, translated
					case dst.String() == n1.IP && (strings.HasPrefix(src.String(), "10.244.2.") || strings.HasPrefix(src.String(), "10.244.3.")):
						fromBackend++ // a remote backend's reply, back to n1
					}
				}
				// Requests to remote backends and their replies take the
				// forwarding mode: tunnelled both ways (a pod's address
				// never crosses the underlay bare), or routed as they are.
				tunnelled := m.encap("n1", "n2") != ""
				if toExt == 0 {
					t.Errorf("on n1's uplink: no frame to the client")
				}
				if tunnelled && (encap == 0 || encapIn == 0 || fromBackend != 0) {
					t.Errorf("on n1's uplink in %s mode: %d tunnelled requests, %d tunnelled replies, %d bare replies from pod addresses; want only tunnelled", m.name, encap, encapIn, fromBackend)
				}
				if !tunnelled && (direct == 0 || fromBackend == 0) {
					t.Errorf("on n1's uplink in %s mode: %d translated requests and %d replies from remote backends; want both", m.name, direct, fromBackend)
				}
			})
		})
	}
}

// With a deliberately tiny SNAT range, flows beyond it are refused with a
// counted drop and an event naming the tuple, established flows keep
// working, and new flows succeed again once the old ones are over.
func TestNodePortSNATExhaustion(t *testing.T) {
	const config = "modules: [endpoints, lb, nodeport, nativerouting]\nsettings:\n  nodeport: {snatPortRange: 40000-40003}\n"
	// One remote backend: every flow through n1 needs a port of the four
	// for the same backend tuple.
	const svc = `services:
  - name: echo
    clusterIP: 10.96.0.50
    type: NodePort
    ports: [{port: 9000, nodePort: 30090}]
    backends: [{ip: 10.244.2.11, nodeName: n2}]
`
	l := upThreeNodes(t, config, []ExternalSpec{{Name: "ext"}}, svc, 2)
	n1 := l.Node("n1")
	ext := l.External("ext")
	events, err := datapath.OpenEvents(n1.PinDir)
	if err != nil {
		t.Fatal(err)
	}
	defer events.Close()
	ctx := context.Background()
	addr := n1.IP + ":30090"
	type conn struct {
		c net.Conn
		r *bufio.Reader
	}
	say := func(c conn, msg string) error {
		_ = c.c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := fmt.Fprintln(c.c, msg); err != nil {
			return err
		}
		line, err := c.r.ReadString('\n')
		if err != nil {
			return err
		}
		if strings.TrimSpace(line) != "web-2: "+msg {
			return fmt.Errorf("answer %q", line)
		}
		return nil
	}
	open := func(timeout time.Duration) (conn, error) {
		dctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		c, err := Dial(dctx, ext.NetnsPath(), "tcp4", addr)
		if err != nil {
			return conn{}, err
		}
		cn := conn{c, bufio.NewReader(c)}
		if err := say(cn, "hello"); err != nil {
			c.Close()
			return conn{}, err
		}
		return cn, nil
	}
	var held []conn
	for i := range 4 {
		c, err := open(3 * time.Second)
		if err != nil {
			t.Fatalf("connection %d of 4: %v", i+1, err)
		}
		held = append(held, c)
	}
	before := metric(t, n1, "netdev-ingress", datapath.DropNATExhausted)
	if c, err := open(1500 * time.Millisecond); err == nil {
		c.c.Close()
		t.Fatal("a fifth connection got through a SNAT range of four ports")
	}
	if after := metric(t, n1, "netdev-ingress", datapath.DropNATExhausted); after <= before {
		t.Errorf("NAT exhaustion drops on n1: %d -> %d", before, after)
	}
	ev, err := events.Read(time.Now().Add(3 * time.Second))
	for err == nil && ev.Code != uint8(datapath.DropNATExhausted) {
		ev, err = events.Read(time.Now().Add(3 * time.Second))
	}
	if err != nil {
		t.Fatalf("no NAT exhaustion event: %v", err)
	}
	if ev.Hook != "netdev-ingress" || ev.Src.Addr().String() != ext.IP || ev.Dst.String() != "10.244.2.11:9000" || ev.Proto != "TCP" {
		t.Errorf("event %v: want the client's flow to the backend", ev)
	}
	for i, c := range held {
		if err := say(c, "still here"); err != nil {
			t.Errorf("established connection %d after the refusal: %v", i+1, err)
		}
	}
	// weir bpf nat list shows the four flows, both halves each, on the
	// range's four ports.
	out, err := exec.Command(bin.weir, "bpf", "nat", "list", "--pin-dir", n1.PinDir, "-o", "json").Output()
	if err != nil {
		t.Fatal(err)
	}
	var rows []datapath.NATRow
	if err := json.Unmarshal(out, &rows); err != nil {
		t.Fatal(err)
	}
	ports := map[uint16]bool{}
	for _, r := range rows {
		p := r.To.Port()
		if r.Dir == "in" {
			p = r.Dst.Port()
		}
		if r.Owner != "nodeport" || p < 40000 || p > 40003 {
			t.Errorf("NAT entry %+v: want a nodeport entry on ports 40000-40003", r)
		}
		ports[p] = true
	}
	if len(rows) != 8 || len(ports) != 4 {
		t.Errorf("weir bpf nat list: %d entries on %d ports, want 8 on 4:\n%s", len(rows), len(ports), out)
	}
	// The agent's status counts the refusal (the collector's pressure
	// signal).
	waitFor(t, 10*time.Second, "the refusal in the agent's status", func() bool {
		st, err := n1.Client().Status(ctx)
		return err == nil && st.Conntrack != nil && st.Conntrack.NAT != nil && st.Conntrack.NAT.Exhausted > 0
	})
	// Reset closes the flows; their ports come back once their
	// conntrack entries expire.
	for _, c := range held {
		_ = c.c.(*net.TCPConn).SetLinger(0)
		c.c.Close()
	}
	waitFor(t, 30*time.Second, "a new connection once the old flows are over", func() bool {
		c, err := open(1500 * time.Millisecond)
		if err != nil {
			return false
		}
		c.c.Close()
		return true
	})
}

// NodePort (SNAT to a remote backend, and a local backend) and masquerade
// flows carry on through a graceful agent restart and a kill -9: the
// datapath, its conntrack and NAT entries stay while no agent runs, and
// the next agent takes them over.
func TestNorthSouthSurvivesAgentRestarts(t *testing.T) {
	const config = "modules: [endpoints, lb, nodeport, masquerade, tunnel]\n"
	const svc = `services:
  - name: echo-remote
    clusterIP: 10.96.0.50
    type: NodePort
    ports: [{port: 9000, nodePort: 30090}]
    backends: [{ip: 10.244.2.11, nodeName: n2}]
  - name: echo-local
    clusterIP: 10.96.0.51
    type: NodePort
    ports: [{port: 9000, nodePort: 30091}]
    backends: [{ip: 10.244.1.11, nodeName: n1}]
`
	l := upThreeNodes(t, config, []ExternalSpec{{Name: "ext"}, {Name: "inet", Subnet: "203.0.113.0/24", Serve: Workload{Echo: 9000}}}, svc, 4)
	n1 := l.Node("n1")
	ctx := context.Background()
	var targets []echoTarget
	for range 4 {
		targets = append(targets,
			echoTarget{ns: l.External("ext").NetnsPath(), addr: n1.IP + ":30090", name: "web-2"},
			echoTarget{ns: l.External("ext").NetnsPath(), addr: n1.IP + ":30091", name: "web-1"},
			echoTarget{ns: l.Pod("client").NetnsPath(), addr: inetIP + ":9000", name: "inet"})
	}
	// Traffic flows while the agent restarts gracefully, then dies.
	tk := talk(t, ctx, targets)
	restartAndKill(t, l, "n1", tk)
	if errs := tk.end(); len(errs) > 0 {
		t.Errorf("%d flows broke: %v", len(errs), errs)
	}
}
