package lab

import (
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/weirnet/weir/core/netns"
)

// With Maglev, every node picks the same backend for a flow: the same
// client address and port reach the same backend through n1's NodePort
// and n2's (as a flow does that an ECMP rehash moves to another node).
func TestMaglevSameBackendOnEveryNode(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "agent.yaml")
	const config = "modules: [endpoints, lb, nativerouting, nodeport]\nsettings:\n  nodeport: {maglev: true}\n"
	if err := os.WriteFile(cfg, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	spec := threeNodes(cfg)
	spec.Externals = []ExternalSpec{{Name: "ext"}}
	l := up(t, spec)
	const svc = `services:
  - name: web
    clusterIP: 10.96.0.10
    type: NodePort
    ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
    backends: [{ip: 10.244.1.11, nodeName: n1}, {ip: 10.244.2.11, nodeName: n2}, {ip: 10.244.3.11, nodeName: n3}, {ip: 10.244.3.12, nodeName: n3}]
`
	for _, n := range l.Nodes {
		if err := l.Apply(n.Name, []byte(svc)); err != nil {
			t.Fatal(err)
		}
	}
	ext := l.External("ext")
	get := func(port int, node *Node) (string, error) {
		var c net.Conn
		err := netns.Do(ext.NetnsPath(), func() error {
			d := net.Dialer{Timeout: 3 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(ext.IP), Port: port},
				Control: func(_, _ string, rc syscall.RawConn) error {
					var serr error
					if err := rc.Control(func(fd uintptr) {
						serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
					}); err != nil {
						return err
					}
					return serr
				}}
			var err error
			c, err = d.Dial("tcp4", node.IP+":30080")
			return err
		})
		if err != nil {
			return "", err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := io.WriteString(c, "GET / HTTP/1.0\r\n\r\n"); err != nil {
			return "", err
		}
		b, err := io.ReadAll(c)
		if err != nil {
			return "", err
		}
		_, body, _ := strings.Cut(string(b), "\r\n\r\n")
		return strings.TrimSpace(body), nil
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
