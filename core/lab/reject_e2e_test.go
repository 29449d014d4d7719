package lab

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/weirnet/weir/core/datapath"
)

// A service without any endpoint is rejected as kube-proxy rejects it:
// curl fails with "connection refused" at once, a UDP client gets
// ECONNREFUSED; both counted as rejections.
func TestServiceWithoutEndpointsRefusesAtOnce(t *testing.T) {
	const svc = `services:
  - name: empty
    clusterIP: 10.96.0.90
    ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, targetPort: 5353, protocol: UDP}]
`
	l := upThreeNodes(t, "modules: [endpoints, lb, nativerouting]\n", nil, svc, 2)
	n1 := l.Node("n1")
	client := l.Pod("client")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	out, err := Exec(ctx, client.NetnsPath(), filepath.Join(n1.Cgroup, "pods"), "curl", "-sS", "--max-time", "5", "http://10.96.0.90/")
	took := time.Since(start)
	// curl's exit status 7: the connection was refused (curl 8 says
	// "Couldn't connect to server").
	if err == nil || !strings.Contains(err.Error(), "exit status 7") {
		t.Fatalf("curl to a service without endpoints: %q %v; want exit status 7 (could not connect)", out, err)
	}
	if took > time.Second {
		t.Errorf("curl took %v to be refused; want well under a second", took)
	}
	if _, err := Dial(ctx, client.NetnsPath(), "tcp4", "10.96.0.90:80"); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("connect to a service without endpoints: %v; want ECONNREFUSED", err)
	}
	_, err = UDPAsk(context.Background(), client.NetnsPath(), "10.96.0.90:53", "anyone?", 3*time.Second)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("UDP to a service without endpoints: %v; want ECONNREFUSED", err)
	}
	if n := metric(t, n1, "pod-egress", datapath.RejectNoEndpoints); n < 3 {
		t.Errorf("rejections counted on n1: %d, want at least 3", n)
	}
}
