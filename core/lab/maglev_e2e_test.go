package lab

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"

	"github.com/weirnet/weir/core/netns"
)

// With Maglev, every node picks the same backend for a flow: the same
// client address and port reach the same backend through n1's NodePort
// and n2's (as a flow does that an ECMP rehash moves to another node).
func TestMaglevSameBackendOnEveryNode(t *testing.T) {
	const config = "modules: [endpoints, lb, nativerouting, nodeport]\nsettings:\n  nodeport: {maglev: true}\n"
	const svc = `services:
  - name: web
    clusterIP: 10.96.0.10
    type: NodePort
    ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
    backends: [{ip: 10.244.1.11, nodeName: n1}, {ip: 10.244.2.11, nodeName: n2}, {ip: 10.244.3.11, nodeName: n3}, {ip: 10.244.3.12, nodeName: n3}]
`
	l := upThreeNodes(t, config, []ExternalSpec{{Name: "ext"}}, svc, 2)
	ext := l.External("ext")
	get := func(port int, node *Node) (string, error) {
		return httpOnce(context.Background(), ext.NetnsPath(), port, node.IP+":30080")
	}
	n1, n2 := l.Node("n1"), l.Node("n2")
	// The tables are written once the services are.
	waitFor(t, 10*time.Second, "a Maglev table on n1 and n2", func() bool {
		for _, n := range []*Node{n1, n2} {
			m, err := ebpf.LoadPinnedMap(filepath.Join(n.PinDir, "weir_maglev"), nil)
			if err != nil {
				return false
			}
			var k uint32
			var v uint32
			found := m.Iterate().Next(&k, &v)
			m.Close()
			if !found {
				return false
			}
		}
		return true
	})
	seen := map[string]bool{}
	for i := range 20 {
		port := 46001 + i
		a, err := get(port, n1)
		if err != nil {
			t.Fatalf("from port %d through n1: %v", port, err)
		}
		b, err := get(port, n2)
		if err != nil {
			t.Fatalf("from port %d through n2: %v", port, err)
		}
		if a != b {
			t.Errorf("client port %d: n1 chose %s, n2 chose %s", port, a, b)
		}
		seen[a] = true
	}
	if len(seen) < 2 {
		t.Errorf("20 client ports all reached %v: the table spreads no flows", seen)
	}
}

// A DSR flow that an ECMP rehash moves to another node mid-way keeps
// working: with Maglev the new node picks the same backend, and delivers
// it itself when the backend is its own.
func TestMaglevDSRFlowMovesNode(t *testing.T) {
	const config = "modules: [endpoints, lb, nativerouting, dsr-ipip]\nsettings:\n  dsr-ipip: {maglev: true}\n"
	const svc = `services:
  - name: echo
    clusterIP: 10.96.0.10
    type: LoadBalancer
    loadBalancerIPs: [` + lbIP + `]
    ports: [{port: 9000}]
    backends: [{ip: 10.244.2.11, nodeName: n2}, {ip: 10.244.3.11, nodeName: n3}]
`
	l := upThreeNodes(t, config, []ExternalSpec{{Name: "ext", Routes: map[string]string{lbIP + "/32": "n1"}}}, svc, 2)
	waitFor(t, 10*time.Second, "Maglev tables on every node", func() bool {
		for _, n := range l.Nodes {
			m, err := ebpf.LoadPinnedMap(filepath.Join(n.PinDir, "weir_maglev"), nil)
			if err != nil {
				return false
			}
			var k, v uint32
			found := m.Iterate().Next(&k, &v)
			m.Close()
			if !found {
				return false
			}
		}
		return true
	})
	ext := l.External("ext")
	route := func(node *Node) {
		t.Helper()
		h, err := netns.Handle(ext.NetnsPath())
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		_, dst, _ := net.ParseCIDR(lbIP + "/32")
		if err := h.RouteReplace(&netlink.Route{Dst: dst, Gw: net.ParseIP(node.IP)}); err != nil {
			t.Fatal(err)
		}
	}
	// Several flows, so that some land on each backend.
	type flow struct {
		c   net.Conn
		r   *bufio.Reader
		who string
	}
	var flows []*flow
	for range 6 {
		c, err := Dial(context.Background(), ext.NetnsPath(), "tcp4", lbIP+":9000")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		flows = append(flows, &flow{c: c, r: bufio.NewReader(c)})
	}
	say := func(step string) {
		t.Helper()
		for i, f := range flows {
			_ = f.c.SetDeadline(time.Now().Add(3 * time.Second))
			if _, err := fmt.Fprintln(f.c, step); err != nil {
				t.Fatalf("flow %d, %s: %v", i, step, err)
			}
			line, err := f.r.ReadString('\n')
			if err != nil {
				t.Fatalf("flow %d, %s: %v", i, step, err)
			}
			who, _, _ := strings.Cut(line, ":")
			if f.who == "" {
				f.who = who
			}
			if who != f.who {
				t.Fatalf("flow %d, %s: answered by %s, began with %s", i, step, who, f.who)
			}
		}
	}
	say("through n1")
	route(l.Node("n3"))
	say("through n3")
	route(l.Node("n2"))
	say("through n2")
	seen := map[string]bool{}
	for _, f := range flows {
		seen[f.who] = true
	}
	t.Logf("flows on %v", seen)
}
