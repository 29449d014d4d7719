package lab

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/weirnet/weir/core/netns"
)

// collisionServices has two VIPs and two ports of one service that all
// lead to the same single backend, so that one client port used for
// several of them produces the same tuple on the wire.
const collisionServices = `services:
  - name: web
    clusterIP: 10.96.0.10
    ports:
      - {name: http, port: 80, targetPort: 8080}
      - {name: echo, port: 9000}
    backends: [{ip: 10.244.1.11}, {ip: 10.244.1.12}, {ip: 10.244.1.13}]
  - name: one
    clusterIP: 10.96.0.30
    ports:
      - {name: echo, port: 9000}
      - {name: echo-alt, port: 9001, targetPort: 9000}
    backends: [{ip: 10.244.1.11}]
  - name: other
    clusterIP: 10.96.0.31
    ports:
      - {name: echo, port: 9000}
    backends: [{ip: 10.244.1.11}]
`

// dialFrom connects from inside the namespace, from local port port (0:
// the kernel's choice). SO_REUSEADDR lets several sockets share the port
// towards different destinations, as the kernel itself does for
// ephemeral ports.
func dialFrom(ctx context.Context, nsPath string, port int, addr string) (net.Conn, error) {
	var c net.Conn
	err := netns.Do(nsPath, func() error {
		d := net.Dialer{Timeout: 2 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
			}); err != nil {
				return err
			}
			return serr
		}}
		if port != 0 {
			d.LocalAddr = &net.TCPAddr{Port: port}
		}
		var err error
		c, err = d.DialContext(ctx, "tcp4", addr)
		return err
	})
	return c, err
}

// httpOnce sends one HTTP/1.0 request on a new connection from port and
// returns who answered. The server closes first, so the client port is
// free again at once (the server side keeps TIME_WAIT), as with most
// request/response clients.
func httpOnce(ctx context.Context, nsPath string, port int, addr string) (string, error) {
	c, err := dialFrom(ctx, nsPath, port, addr)
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
	_, body, ok := strings.Cut(string(b), "\r\n\r\n")
	if !ok || !strings.HasPrefix(string(b), "HTTP/1.0 200") && !strings.HasPrefix(string(b), "HTTP/1.1 200") {
		return "", fmt.Errorf("bad answer %q", b)
	}
	return strings.TrimSpace(body), nil
}

var backendIP = map[string]string{"backend-1": "10.244.1.11", "backend-2": "10.244.1.12", "backend-3": "10.244.1.13"}

type lineConn struct {
	c  net.Conn
	rd *bufio.Reader
}

func (l *lineConn) ask(line string) (string, error) {
	_ = l.c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := fmt.Fprintln(l.c, line); err != nil {
		return "", err
	}
	ans, err := l.rd.ReadString('\n')
	if err != nil {
		return "", err
	}
	who, echoed, _ := strings.Cut(strings.TrimSpace(ans), ": ")
	if echoed != line {
		return "", fmt.Errorf("answer %q to %q", ans, line)
	}
	return who, nil
}

// A client that uses one source port for a service and then for one of
// its backends directly (or the other way round, or for two frontends
// that share a backend) gets a working connection every time: the
// datapath never lets one flow's translation apply to another that
// happens to have the same tuple on the wire.
func TestTupleCollisions(t *testing.T) {
	l := up(t, oneNode())
	apply(t, l, collisionServices, 5)
	ns := l.Pod("client").NetnsPath()
	ctx := context.Background()

	t.Run("service-then-direct", func(t *testing.T) {
		fails := 0
		for i := range 300 {
			port := 42000 + i
			who, err := httpOnce(ctx, ns, port, "10.96.0.10:80")
			if err != nil {
				t.Fatalf("port %d through the service: %v", port, err)
			}
			got, err := httpOnce(ctx, ns, port, backendIP[who]+":8080")
			if err != nil || got != who {
				fails++
				t.Logf("port %d direct to %s after the service: %q, %v", port, who, got, err)
				if fails == 10 {
					t.Fatalf("the first 10 failed (of %d tried)", i+1)
				}
			}
		}
		if fails != 0 {
			t.Fatalf("%d of 300 direct connections after a service connection from the same port failed", fails)
		}
	})

	t.Run("direct-then-service", func(t *testing.T) {
		fails := 0
		for i := range 300 {
			port := 43000 + i
			for _, who := range []string{"backend-1", "backend-2", "backend-3"} {
				if got, err := httpOnce(ctx, ns, port, backendIP[who]+":8080"); err != nil || got != who {
					t.Fatalf("port %d direct to %s: %q, %v", port, who, got, err)
				}
			}
			if _, err := httpOnce(ctx, ns, port, "10.96.0.10:80"); err != nil {
				fails++
				t.Logf("port %d through the service after direct connections: %v", port, err)
				if fails == 10 {
					t.Fatalf("the first 10 failed (of %d tried)", i+1)
				}
			}
		}
		if fails != 0 {
			t.Fatalf("%d of 300 service connections after direct ones from the same port failed", fails)
		}
	})

	// Live at the same time, from one port: a direct connection, two
	// VIPs and two ports of one service, all to backend-1:9000.
	t.Run("simultaneous", func(t *testing.T) {
		for i := range 20 {
			port := 44000 + i
			var conns []*lineConn
			for _, addr := range []string{"10.244.1.11:9000", "10.96.0.30:9000", "10.96.0.30:9001", "10.96.0.31:9000"} {
				c, err := dialFrom(ctx, ns, port, addr)
				if err != nil {
					t.Fatalf("port %d: connecting to %s while the others are open: %v", port, addr, err)
				}
				defer c.Close()
				conns = append(conns, &lineConn{c: c, rd: bufio.NewReader(c)})
			}
			for round := range 3 {
				for j, lc := range conns {
					who, err := lc.ask(fmt.Sprintf("p%d-c%d-r%d", port, j, round))
					if err != nil || who != "backend-1" {
						t.Fatalf("port %d, connection %d, round %d: %q, %v", port, j, round, who, err)
					}
				}
			}
			for _, lc := range conns {
				lc.c.Close()
			}
		}
	})

	// As measured before the fix: 2,000 short connections through the
	// ClusterIP, then 2,000 directly to the backends, ports chosen by the
	// kernel.
	t.Run("2000-service-then-2000-direct", func(t *testing.T) {
		fails := 0
		for i := range 4000 {
			addr := "10.96.0.10:80"
			if i >= 2000 {
				addr = []string{"10.244.1.11:8080", "10.244.1.12:8080", "10.244.1.13:8080"}[i%3]
			}
			if _, err := httpOnce(ctx, ns, 0, addr); err != nil {
				fails++
				t.Logf("connection %d to %s: %v", i, addr, err)
				if fails == 10 {
					t.Fatalf("10 of the first %d failed", i+1)
				}
			}
		}
		if fails != 0 {
			t.Fatalf("%d of 4000 connections failed", fails)
		}
	})

	// The kernel's own port choice in a narrow range, so that ports are
	// reused all the time, with service and direct connections mixed.
	t.Run("mixed", func(t *testing.T) {
		if err := netns.Do(ns, func() error {
			return os.WriteFile("/proc/sys/net/ipv4/ip_local_port_range", []byte("45000 45199"), 0o644)
		}); err != nil {
			t.Fatal(err)
		}
		targets := []string{"10.96.0.10:80", "10.96.0.10:80", "10.244.1.11:8080", "10.244.1.12:8080", "10.244.1.13:8080"}
		fails := 0
		for i := range 3000 {
			addr := targets[rand.IntN(len(targets))]
			if _, err := httpOnce(ctx, ns, 0, addr); err != nil {
				fails++
				t.Logf("connection %d to %s: %v", i, addr, err)
				if fails == 10 {
					t.Fatalf("10 of the first %d failed", i+1)
				}
			}
		}
		if fails != 0 {
			t.Fatalf("%d of 3000 mixed connections failed", fails)
		}
	})
}
