package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// BenchmarkConnectLatency: connect + HTTP request + close from a pod, 2,000
// connections per path (after 200 not timed), with 1, 1,000 and 10,000
// services in the maps. Paths: socket LB (n1 runs socketlb), per-packet lb
// (n2 runs lb only), and straight to the same backend on each node without
// a service. Client and backend share a node, so only the load balancing
// differs. The client is `weir connect-latency`, run in the pod's
// namespace and cgroup; five rounds alternate the paths' order. Reported:
// the medians of each path's p50 and p99, and the median over rounds of
// each path's ratio to direct on the same node in the same round (paired,
// so a noisy round moves both sides).
func BenchmarkConnectLatency(b *testing.B) {
	cfg := filepath.Join(b.TempDir(), "agent.yaml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(socketLBConfig, "tunnel")), 0o600); err != nil {
		b.Fatal(err)
	}
	work := Workload{HTTP: 8080}
	l := up(b, &Spec{
		Name:        newLabName(),
		AgentConfig: cfg,
		Nodes: []NodeSpec{
			{Name: "n1", PodCIDR: "10.244.1.0/24", Labels: map[string]string{"weir.dev/socketlb": "on"}, Pods: []PodSpec{
				{Name: "client", IP: "10.244.1.10"}, {Name: "web-1", IP: "10.244.1.11", Serve: work}}},
			{Name: "n2", PodCIDR: "10.244.2.0/24", Pods: []PodSpec{
				{Name: "client-2", IP: "10.244.2.10"}, {Name: "web-2", IP: "10.244.2.11", Serve: work}}},
		},
	})
	n1, n2 := l.Node("n1"), l.Node("n2")
	type path struct {
		name    string
		node    *Node
		client  *Pod
		addr    string
		against string // the direct path on the same node
	}
	paths := []path{
		{"socketlb", n1, l.Pod("client"), "10.96.0.10:80", "direct-n1"},
		{"lb", n2, l.Pod("client-2"), "10.96.0.11:80", "direct-n2"},
		{"direct-n1", n1, l.Pod("client"), "10.244.1.11:8080", ""},
		{"direct-n2", n2, l.Pod("client-2"), "10.244.2.11:8080", ""},
	}
	for _, size := range []int{1, 1000, 10000} {
		b.Run(fmt.Sprintf("services=%d", size), func(b *testing.B) {
			var sb strings.Builder
			sb.WriteString("services:\n")
			sb.WriteString("  - name: web1\n    clusterIP: 10.96.0.10\n    ports: [{port: 80, targetPort: 8080}]\n    backends: [{ip: 10.244.1.11}]\n")
			sb.WriteString("  - name: web2\n    clusterIP: 10.96.0.11\n    ports: [{port: 80, targetPort: 8080}]\n    backends: [{ip: 10.244.2.11}]\n")
			for i := range max(size-2, 0) {
				fmt.Fprintf(&sb, "  - name: f%d\n    clusterIP: 10.97.%d.%d\n    ports: [{port: 80, targetPort: 8080}]\n    backends: [{ip: 10.250.%d.%d}, {ip: 10.251.%d.%d}, {ip: 10.252.%d.%d}]\n",
					i, i/250, 1+i%250, i/250, 1+i%250, i/250, 1+i%250, i/250, 1+i%250)
			}
			want := max(size, 2)
			for _, n := range l.Nodes {
				if err := l.Apply(n.Name, []byte(sb.String())); err != nil {
					b.Fatal(err)
				}
			}
			deadline := time.Now().Add(2 * time.Minute)
			for _, n := range l.Nodes {
				for len(serviceRows(b, n)) != want {
					if time.Now().After(deadline) {
						b.Fatalf("%s never held %d services", n.Name, want)
					}
					time.Sleep(100 * time.Millisecond)
				}
			}
			p50s, p99s := map[string][]float64{}, map[string][]float64{}
			const rounds = 5
			for round := range rounds {
				// Each round starts one path later.
				order := append(slices.Clone(paths[round%len(paths):]), paths[:round%len(paths)]...)
				for _, p := range order {
					ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
					out, err := Exec(ctx, p.client.NetnsPath(), filepath.Join(p.node.Cgroup, "pods"), bin.weir, "connect-latency", "-o", "json", "-n", "2000", p.addr)
					cancel()
					if err != nil {
						b.Fatalf("%s: %v", p.name, err)
					}
					var r struct {
						N     int     `json:"n"`
						P50us float64 `json:"p50Micros"`
						P99us float64 `json:"p99Micros"`
					}
					if err := json.Unmarshal([]byte(out), &r); err != nil || r.N != 2000 {
						b.Fatalf("%s answered %q (%v)", p.name, out, err)
					}
					p50s[p.name] = append(p50s[p.name], r.P50us)
					p99s[p.name] = append(p99s[p.name], r.P99us)
				}
			}
			med := func(v []float64) float64 { s := slices.Clone(v); slices.Sort(s); return s[len(s)/2] }
			var line []string
			for _, p := range paths {
				p50, p99 := med(p50s[p.name]), med(p99s[p.name])
				b.ReportMetric(p50, "us-p50-"+p.name)
				b.ReportMetric(p99, "us-p99-"+p.name)
				s := fmt.Sprintf("%s p50 %.1f µs p99 %.1f µs", p.name, p50, p99)
				if p.against != "" {
					var q50, q99 []float64
					for i := range rounds {
						q50 = append(q50, p50s[p.name][i]/p50s[p.against][i])
						q99 = append(q99, p99s[p.name][i]/p99s[p.against][i])
					}
					r50, r99 := med(q50), med(q99)
					b.ReportMetric(r50, "ratio-p50-"+p.name+"-vs-"+p.against)
					b.ReportMetric(r99, "ratio-p99-"+p.name+"-vs-"+p.against)
					s += fmt.Sprintf(" (%.3f×, %.3f× of %s)", r50, r99, p.against)
				}
				line = append(line, s)
			}
			b.Logf("%d services: %s", want, strings.Join(line, "; "))
		})
	}
}
