package lab

import (
	"context"
	"errors"
	"strings"
	"syscall"
	"testing"
	"time"
)

const noListenerServices = `services:
  - name: dns
    clusterIP: 10.96.0.53
    ports:
      - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
    backends: [{ip: 10.244.1.11}]
  - name: deaf
    clusterIP: 10.96.0.54
    ports:
      - {name: dns, port: 53, targetPort: 5399, protocol: UDP}
    backends: [{ip: 10.244.1.11}]
`

// The backend's "port unreachable" reaches the client as coming from the
// service, about the datagram it sent: a connected UDP socket gets
// ECONNREFUSED at once instead of waiting for an answer that never comes.
func TestUDPToServiceWithoutListenerIsRefused(t *testing.T) {
	l := up(t, oneNode())
	apply(t, l, noListenerServices, 2)
	ns := l.Pod("client").NetnsPath()
	ctx := context.Background()
	if ans, err := UDPAsk(ctx, ns, "10.96.0.53:53", "hello", 2*time.Second); err != nil || !strings.HasSuffix(ans, ": hello") {
		t.Fatalf("the listening service: %q, %v", ans, err)
	}
	c, err := Dial(ctx, ns, "udp4", "10.96.0.54:53")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write([]byte("anyone?")); err != nil {
		t.Fatal(err)
	}
	_, err = c.Read(make([]byte, 64))
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("read after sending to a service without listener: %v, want ECONNREFUSED", err)
	}
}

// A 4,000-byte datagram to a ClusterIP goes in fragments and its
// 4,000-byte answer comes back in fragments, whole.
func TestFragmentedUDPThroughAClusterIP(t *testing.T) {
	l := up(t, oneNode())
	apply(t, l, noListenerServices, 2)
	ns := l.Pod("client").NetnsPath()
	msg := strings.Repeat("0123456789", 400)
	ans, err := UDPAsk(context.Background(), ns, "10.96.0.53:53", msg, 3*time.Second)
	if err != nil || ans != "backend-1: "+msg {
		t.Fatalf("4000-byte datagram through the ClusterIP: %d bytes back, %v", len(ans), err)
	}
	// The same to the pod itself, for comparison.
	if ans, err := UDPAsk(context.Background(), ns, "10.244.1.11:5353", msg, 3*time.Second); err != nil || ans != "backend-1: "+msg {
		t.Fatalf("4000-byte datagram to the pod: %d bytes back, %v", len(ans), err)
	}
}
