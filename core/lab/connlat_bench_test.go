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
// namespace and cgroup, alternating connection by connection between the
// service and the backend straight. Reported over five rounds: the
// medians of each path's p50 and p99, and the median of the rounds'
// ratios of service to direct.
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
	// Each client alternates, one connection at a time, between the
	// service and the same backend straight: both meet the same moments
	// of the machine, and their ratio is the load balancer's cost.
	type pair struct {
		name, direct string
		node         *Node
		client       *Pod
		vip, backend string
	}
	pairs := []pair{
		{"socketlb", "direct-n1", n1, l.Pod("client"), "10.96.0.10:80", "10.244.1.11:8080"},
		{"lb", "direct-n2", n2, l.Pod("client-2"), "10.96.0.11:80", "10.244.2.11:8080"},
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
			const rounds = 5
			p50s, p99s := map[string][]float64{}, map[string][]float64{}
			for range rounds {
				for _, p := range pairs {
					ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
					out, err := Exec(ctx, p.client.NetnsPath(), filepath.Join(p.node.Cgroup, "pods"),
						bin.weir, "connect-latency", "-o", "json", "-n", "2000", p.vip, p.backend)
					cancel()
					if err != nil {
						b.Fatalf("%s: %v", p.name, err)
					}
					var r []struct {
						N     int     `json:"n"`
						P50us float64 `json:"p50Micros"`
						P99us float64 `json:"p99Micros"`
					}
					if err := json.Unmarshal([]byte(out), &r); err != nil || len(r) != 2 || r[0].N != 2000 {
						b.Fatalf("%s answered %q (%v)", p.name, out, err)
					}
					for i, name := range []string{p.name, p.direct} {
						p50s[name] = append(p50s[name], r[i].P50us)
						p99s[name] = append(p99s[name], r[i].P99us)
					}
				}
			}
			med := func(v []float64) float64 { s := slices.Clone(v); slices.Sort(s); return s[len(s)/2] }
			var line []string
			for _, p := range pairs {
				var q50, q99 []float64
				for i := range rounds {
					q50 = append(q50, p50s[p.name][i]/p50s[p.direct][i])
					q99 = append(q99, p99s[p.name][i]/p99s[p.direct][i])
				}
				r50, r99 := med(q50), med(q99)
				for _, name := range []string{p.name, p.direct} {
					b.ReportMetric(med(p50s[name]), "us-p50-"+name)
					b.ReportMetric(med(p99s[name]), "us-p99-"+name)
				}
				b.ReportMetric(r50, "ratio-p50-"+p.name+"-vs-"+p.direct)
				b.ReportMetric(r99, "ratio-p99-"+p.name+"-vs-"+p.direct)
				line = append(line, fmt.Sprintf("%s p50 %.1f µs p99 %.1f µs, %s p50 %.1f µs p99 %.1f µs: %.3f× and %.3f× (ratios over rounds %s)",
					p.name, med(p50s[p.name]), med(p99s[p.name]), p.direct, med(p50s[p.direct]), med(p99s[p.direct]), r50, r99, fmtRatios(q50)))
			}
			b.Logf("%d services: %s", want, strings.Join(line, "; "))
		})
	}
}

func fmtRatios(v []float64) string {
	var out []string
	for _, x := range v {
		out = append(out, fmt.Sprintf("%.3f", x))
	}
	return strings.Join(out, " ")
}
