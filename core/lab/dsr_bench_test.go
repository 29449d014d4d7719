package lab

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// dsrBenchServices: the same backend (web-2 on n2) behind two services,
// one in the pool's DSR mode, one forced to SNAT, so both paths run in one
// lab and one pool.
const dsrBenchServices = `services:
  - name: by-dsr
    clusterIP: 10.96.0.10
    type: NodePort
    ports:
      - {name: http, port: 80, targetPort: 8080, nodePort: 30181}
      - {name: echo, port: 9000, nodePort: 30191}
      - {name: source, port: 7100, nodePort: 30171}
    backends: [{ip: 10.244.2.11, nodeName: n2}]
  - name: by-snat
    clusterIP: 10.96.0.11
    type: NodePort
    forwardingMode: snat
    ports:
      - {name: http, port: 80, targetPort: 8080, nodePort: 30180}
      - {name: echo, port: 9000, nodePort: 30190}
      - {name: source, port: 7100, nodePort: 30170}
    backends: [{ip: 10.244.2.11, nodeName: n2}]
`

// BenchmarkDSR: for each DSR module, in one lab routing natively, an
// external client reaches a backend on n2 through n1's NodePorts by DSR
// and, through a service forced to SNAT, by SNAT (the baseline). Connection
// latency (connect, HTTP request, close; 2,000 connections alternating
// between the two, five rounds: medians of p50 and p99 and of the rounds'
// ratios), round trips/s on one connection (2,000 one-line round trips,
// best of 3) and bulk from the backend to the client (200 MiB, best of 3:
// the replies DSR sends straight back).
func BenchmarkDSR(b *testing.B) {
	for _, module := range []string{"dsr-ipoption", "dsr-ipip"} {
		b.Run(module, func(b *testing.B) {
			config := "modules: [endpoints, lb, nativerouting, " + module + "]\n"
			l := upThreeNodes(b, config, []ExternalSpec{{Name: "ext"}}, dsrBenchServices, 12)
			n1 := l.Node("n1")
			ext := l.External("ext")
			cg := filepath.Join(l.Cgroup, "externals")
			if err := os.MkdirAll(cg, 0o755); err != nil {
				b.Fatal(err)
			}
			dsr, snat := n1.IP+":30181", n1.IP+":30180"
			lat := connLatencyRounds(b, ext.NetnsPath(), cg, dsr, snat, 5)
			p50d, p50s, p99d, p99s, r50, r99 := lat.p50[0], lat.p50[1], lat.p99[0], lat.p99[1], lat.r50, lat.r99
			med := func(v []float64) float64 { s := slices.Clone(v); slices.Sort(s); return s[len(s)/2] }
			bestRR := func(addr string) float64 {
				best := 0.0
				for range 3 {
					best = max(best, requestResponse(b, ext.NetnsPath(), addr))
				}
				return best
			}
			rrD, rrS := bestRR(n1.IP+":30191"), bestRR(n1.IP+":30190")
			fetch := func(addr string) float64 {
				const size = 200 << 20
				best := 0.0
				for range 3 {
					ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
					start := time.Now()
					got, err := Fetch(ctx, ext.NetnsPath(), addr, size)
					cancel()
					if err != nil || got != size {
						b.Fatalf("bulk from %s: %d bytes, %v", addr, got, err)
					}
					best = max(best, float64(size*8)/time.Since(start).Seconds()/1e6)
				}
				return best
			}
			bulkD, bulkS := fetch(n1.IP+":30171"), fetch(n1.IP+":30170")
			b.ReportMetric(med(p50d), "us-conn-p50-dsr")
			b.ReportMetric(med(p50s), "us-conn-p50-snat(baseline)")
			b.ReportMetric(med(r50), "ratio-conn-p50")
			b.ReportMetric(med(p99d), "us-conn-p99-dsr")
			b.ReportMetric(med(p99s), "us-conn-p99-snat(baseline)")
			b.ReportMetric(med(r99), "ratio-conn-p99")
			b.ReportMetric(rrD, "rr/s-dsr")
			b.ReportMetric(rrS, "rr/s-snat(baseline)")
			b.ReportMetric(rrD/rrS, "ratio-rr")
			b.ReportMetric(bulkD, "Mbit/s-replies-dsr")
			b.ReportMetric(bulkS, "Mbit/s-replies-snat(baseline)")
			b.ReportMetric(bulkD/bulkS, "ratio-replies-bulk")
			b.Logf("%s vs SNAT to a backend on another node: connection p50 %.1f vs %.1f µs (%.3f×, rounds %s), p99 %.1f vs %.1f µs (%.3f×); %.0f vs %.0f round trips/s (%.3f×); backend to client %.0f vs %.0f Mbit/s (%.3f×)",
				module, med(p50d), med(p50s), med(r50), fmtRatios(r50), med(p99d), med(p99s), med(r99), rrD, rrS, rrD/rrS, bulkD, bulkS, bulkD/bulkS)
		})
	}
}
