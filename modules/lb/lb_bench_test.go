package lb

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/weirnet/weir/core/datapath/dptest"
	"github.com/weirnet/weir/core/model"
	"github.com/weirnet/weir/core/slots"
)

// BenchmarkPodEgress measures the cost per packet of the pod-egress hook
// with BPF_PROG_TEST_RUN (1M repeats per case), beside the baseline of the
// entry program alone (no module installed) in the same run.
func BenchmarkPodEgress(b *testing.B) {
	const repeat = 1_000_000
	run := func(prog *ebpf.Program, pkt []byte) time.Duration {
		_, d, err := prog.Benchmark(pkt, repeat, nil)
		if err != nil {
			b.Fatal(err)
		}
		return d
	}
	svcPkt := dptest.Build(b, tcp(netip.AddrPortFrom(client, 40000), netip.AddrPortFrom(vip, 80)))
	svcPkt[14+20+13] = 0x10 // ACK: an established flow
	podPkt := dptest.Build(b, tcp(netip.AddrPortFrom(client, 40000), netip.AddrPortFrom(be2, 8080)))

	empty := dptest.Open(b)
	dptest.Install(b, empty)
	baseProg, _ := empty.Entry(slots.PodEgress)
	base := run(baseProg, podPkt)

	f := newFixture(b, true)
	// One local backend: every service packet is translated and delivered.
	f.services(service("web", netip.AddrPortFrom(vip, 80), model.TCP, 8080, be1))
	putEndpoint(b, f.dp, be1, 1, net.HardwareAddr{2, 0, 0, 0, 0, 1}, net.HardwareAddr{2, 0, 0, 0, 0, 2})
	putEndpoint(b, f.dp, client, 1, net.HardwareAddr{2, 0, 0, 0, 0, 3}, net.HardwareAddr{2, 0, 0, 0, 0, 2})
	nonSvc := run(f.egress, podPkt)
	svc := run(f.egress, svcPkt) // the first run creates the flow, the rest hit conntrack

	ns := func(d time.Duration) float64 { return float64(d.Nanoseconds()) }
	b.ReportMetric(ns(base), "ns/pkt-entry-only(baseline)")
	b.ReportMetric(ns(nonSvc), "ns/pkt-non-service")
	b.ReportMetric(ns(svc), "ns/pkt-service-established")
	b.ReportMetric(ns(svc)/ns(base), "ratio-service/baseline")
	b.Logf("per packet: entry only %v, non-service through endpoints+lb %v, service (conntrack hit, DNAT, local delivery) %v", base, nonSvc, svc)
}
