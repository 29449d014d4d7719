package lab

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// northSouthBenchConfig: n1 and n2 run nodeport and masquerade; n3 (the
// "native" pool of threeNodes) runs neither and carries kube-proxy-shaped
// iptables rules instead. Every node routes natively, so both paths reach
// the backend on n2 the same way.
const northSouthBenchConfig = `modules: [endpoints, lb, nativerouting, nodeport, masquerade]
nodePools:
  - name: baseline
    nodeSelector: {matchLabels: {weir.dev/mode: native}}
    modules: {disable: [nodeport, masquerade]}
`

// kubeProxyNodePort are the rules kube-proxy's iptables mode writes for a
// NodePort service with one endpoint (externalTrafficPolicy Cluster):
// NodePort match on local addresses, masquerade mark, DNAT to the
// endpoint, masquerade on the way out. Chain names shortened.
func kubeProxyNodePort(nodePort, endpoint string) [][]string {
	return [][]string{
		{"-t", "nat", "-N", "KUBE-SERVICES"}, {"-t", "nat", "-N", "KUBE-NODEPORTS"}, {"-t", "nat", "-N", "KUBE-EXT-WEB"},
		{"-t", "nat", "-N", "KUBE-SVC-WEB"}, {"-t", "nat", "-N", "KUBE-SEP-WEB"}, {"-t", "nat", "-N", "KUBE-MARK-MASQ"},
		{"-t", "nat", "-N", "KUBE-POSTROUTING"},
		{"-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"},
		{"-t", "nat", "-A", "OUTPUT", "-j", "KUBE-SERVICES"},
		{"-t", "nat", "-A", "POSTROUTING", "-j", "KUBE-POSTROUTING"},
		{"-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "MARK", "--or-mark", "0x4000"},
		{"-t", "nat", "-A", "KUBE-SERVICES", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "KUBE-NODEPORTS"},
		{"-t", "nat", "-A", "KUBE-NODEPORTS", "-p", "tcp", "--dport", nodePort, "-j", "KUBE-EXT-WEB"},
		{"-t", "nat", "-A", "KUBE-EXT-WEB", "-j", "KUBE-MARK-MASQ"},
		{"-t", "nat", "-A", "KUBE-EXT-WEB", "-j", "KUBE-SVC-WEB"},
		{"-t", "nat", "-A", "KUBE-SVC-WEB", "-j", "KUBE-SEP-WEB"},
		{"-t", "nat", "-A", "KUBE-SEP-WEB", "-p", "tcp", "-j", "DNAT", "--to-destination", endpoint},
		{"-t", "nat", "-A", "KUBE-POSTROUTING", "-m", "mark", "!", "--mark", "0x4000/0x4000", "-j", "RETURN"},
		{"-t", "nat", "-A", "KUBE-POSTROUTING", "-j", "MARK", "--xor-mark", "0x4000"},
		{"-t", "nat", "-A", "KUBE-POSTROUTING", "-j", "MASQUERADE", "--random-fully"},
	}
}

func iptables(b *testing.B, n *Node, rules [][]string) {
	b.Helper()
	for _, r := range rules {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, err := Exec(ctx, n.NetnsPath(), n.Cgroup, append([]string{"iptables", "-w"}, r...)...)
		cancel()
		if err != nil {
			b.Fatalf("iptables on %s: %v", n.Name, err)
		}
	}
}

// BenchmarkNorthSouth, in one lab, side by side:
//   - NodePort from an external client to a backend on another node:
//     through n1 (Weir's nodeport: BPF DNAT + SNAT) and through n3
//     (kube-proxy-shaped iptables rules, the kernel's conntrack NAT).
//     Connection latency (connect + HTTP request + close, 2,000
//     connections alternating between the two paths, five rounds: medians
//     of p50 and p99 and of the rounds' ratios) and requests/s (2,000
//     one-line round trips on one connection, best of 3).
//   - Bulk throughput from a pod to a host beyond the router (200 MiB,
//     best of 3): from n1's pod through Weir's masquerade and from n3's
//     pod through iptables MASQUERADE.
//
// Not measured: what n3's own Weir entry programs add to its iptables
// path (they parse every packet and pass it on).
func BenchmarkNorthSouth(b *testing.B) {
	const svc = `services:
  - name: web
    clusterIP: 10.96.0.10
    type: NodePort
    ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30180}, {name: echo, port: 9000, nodePort: 30190}]
    backends: [{ip: 10.244.2.11, nodeName: n2}]
`
	l := upThreeNodes(b, northSouthBenchConfig, []ExternalSpec{{Name: "ext"}, {Name: "inet", Subnet: "203.0.113.0/24", Serve: Workload{Sink: 7000}}}, svc, 4)
	n1, n3 := l.Node("n1"), l.Node("n3")

	iptables(b, n3, kubeProxyNodePort("30180", "10.244.2.11:8080"))
	// The echo port's chains, as kube-proxy writes them per service port.
	iptables(b, n3, [][]string{
		{"-t", "nat", "-N", "KUBE-EXT-ECHO"},
		{"-t", "nat", "-N", "KUBE-SEP-ECHO"},
		{"-t", "nat", "-A", "KUBE-EXT-ECHO", "-j", "KUBE-MARK-MASQ"},
		{"-t", "nat", "-A", "KUBE-EXT-ECHO", "-j", "KUBE-SEP-ECHO"},
		{"-t", "nat", "-A", "KUBE-SEP-ECHO", "-p", "tcp", "-j", "DNAT", "--to-destination", "10.244.2.11:9000"},
		{"-t", "nat", "-A", "KUBE-NODEPORTS", "-p", "tcp", "--dport", "30190", "-j", "KUBE-EXT-ECHO"},
	})
	// The pod masquerade kube-proxy leaves to the cluster's network
	// plugin, as an ip-masq-agent writes it.
	iptables(b, n3, [][]string{{"-t", "nat", "-A", "POSTROUTING", "-s", n3.PodCIDR, "!", "-d", "10.244.0.0/16", "-j", "MASQUERADE"}})

	ext := l.External("ext")
	cg := filepath.Join(l.Cgroup, "externals")
	if err := os.MkdirAll(cg, 0o755); err != nil {
		b.Fatal(err)
	}
	weirNP, iptNP := n1.IP+":30180", n3.IP+":30180"
	// Both paths answer before anything is timed.
	for _, a := range []string{weirNP, iptNP} {
		if got, err := Get(context.Background(), HTTPClient(ext.NetnsPath(), 3*time.Second), "http://"+a+"/"); err != nil || got != "web-2" {
			b.Fatalf("ext -> %s: %q %v", a, got, err)
		}
	}

	lat := connLatencyRounds(b, ext.NetnsPath(), cg, weirNP, iptNP, 5)
	p50w, p50i, p99w, p99i, r50, r99 := lat.p50[0], lat.p50[1], lat.p99[0], lat.p99[1], lat.r50, lat.r99
	med := func(v []float64) float64 { s := slices.Clone(v); slices.Sort(s); return s[len(s)/2] }
	b.ReportMetric(med(p50w), "us-conn-p50-nodeport")
	b.ReportMetric(med(p50i), "us-conn-p50-iptables(baseline)")
	b.ReportMetric(med(r50), "ratio-conn-p50")
	b.ReportMetric(med(p99w), "us-conn-p99-nodeport")
	b.ReportMetric(med(p99i), "us-conn-p99-iptables(baseline)")
	b.ReportMetric(med(r99), "ratio-conn-p99")

	bestRR := func(addr string) float64 {
		best := 0.0
		for range 3 {
			best = max(best, requestResponse(b, ext.NetnsPath(), addr))
		}
		return best
	}
	rrW, rrI := bestRR(n1.IP+":30190"), bestRR(n3.IP+":30190")
	b.ReportMetric(rrW, "rr/s-nodeport")
	b.ReportMetric(rrI, "rr/s-iptables(baseline)")
	b.ReportMetric(rrW/rrI, "ratio-rr")

	inet := inetIP + ":7000"
	bulkW := bulk(b, l.Pod("client").NetnsPath(), inet)
	bulkI := bulk(b, l.Pod("web-3").NetnsPath(), inet)
	b.ReportMetric(bulkW, "Mbit/s-masquerade")
	b.ReportMetric(bulkI, "Mbit/s-iptables-masquerade(baseline)")
	b.ReportMetric(bulkW/bulkI, "ratio-masquerade-bulk")

	b.Logf("NodePort to a remote backend: connection p50 %.1f µs (Weir) vs %.1f µs (iptables), %.3f× [rounds %s]; p99 %.1f vs %.1f µs, %.3f×; %.0f vs %.0f round trips/s, %.3f×",
		med(p50w), med(p50i), med(r50), fmtRatios(r50), med(p99w), med(p99i), med(r99), rrW, rrI, rrW/rrI)
	b.Logf("pod to the internet host: %.0f Mbit/s (Weir masquerade) vs %.0f Mbit/s (iptables MASQUERADE), %.3f×", bulkW, bulkI, bulkW/bulkI)
	// What crossed the iptables path is what the rules counted: the
	// baseline did take that path.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := Exec(ctx, n3.NetnsPath(), n3.Cgroup, "iptables", "-w", "-t", "nat", "-L", "KUBE-SEP-WEB", "-v", "-n", "-x")
	if err != nil {
		b.Fatal(err)
	}
	counted := false
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) > 2 && f[2] == "DNAT" && f[0] != "0" {
			counted = true
		}
	}
	if !counted {
		b.Fatalf("the iptables path counted no connection:\n%s", out)
	}
}

// latencyRounds are connect-latency's figures over rounds, for two
// addresses: p50 and p99 of each ([0] the first address), and the rounds'
// ratios of the first to the second.
type latencyRounds struct {
	p50, p99 [2][]float64
	r50, r99 []float64
}

// connLatencyRounds runs `weir connect-latency` (2,000 connections,
// alternating between a and base) rounds times from the namespace and
// cgroup.
func connLatencyRounds(b *testing.B, nsPath, cgroup, a, base string, rounds int) latencyRounds {
	b.Helper()
	var out latencyRounds
	for range rounds {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		res, err := Exec(ctx, nsPath, cgroup, bin.weir, "connect-latency", "-o", "json", "-n", "2000", a, base)
		cancel()
		if err != nil {
			b.Fatal(err)
		}
		var r []struct {
			N     int     `json:"n"`
			P50us float64 `json:"p50Micros"`
			P99us float64 `json:"p99Micros"`
		}
		if err := json.Unmarshal([]byte(res), &r); err != nil || len(r) != 2 || r[0].N != 2000 || r[1].N != 2000 {
			b.Fatalf("connect-latency answered %q (%v)", res, err)
		}
		for i := range 2 {
			out.p50[i] = append(out.p50[i], r[i].P50us)
			out.p99[i] = append(out.p99[i], r[i].P99us)
		}
		out.r50 = append(out.r50, r[0].P50us/r[1].P50us)
		out.r99 = append(out.r99, r[0].P99us/r[1].P99us)
	}
	return out
}
