package main

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket/layers"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/datapath/dptest"
	"github.com/weirnet/weir/core/slots"
)

// BenchmarkPluginStage times a pod's packet through the pod-egress entry
// with the ratelimit stage loaded as a plugin (its core maps replaced by
// the node's, its own maps pinned for it) beside the same object loaded
// as an in-tree module's, and beside the entry alone: a SYN to a limited
// frontend (the bucket's work; the burst never runs out) and a segment of
// an established connection (one lookup). Each figure is the median of
// single runs whose verdict says the packet went on.
func BenchmarkPluginStage(b *testing.B) {
	const n = 20000
	front := netip.MustParseAddrPort("10.96.0.10:80")
	setup := func(plugin, withStage bool) *datapathUnderTest {
		dp := dptest.Open(b)
		var objs []datapath.Object
		if withStage {
			spec, err := loadRatelimit()
			if err != nil {
				b.Fatal(err)
			}
			objs = append(objs, datapath.Object{Module: "ratelimit", Spec: spec, Plugin: plugin, Slots: map[string]string{"pod-egress/plugin-early": "ratelimit"}})
		}
		in := dptest.Install(b, dp, objs...)
		if withStage {
			limits := in.Collections["ratelimit"].Maps["ratelimit_limits"]
			if err := limits.Put(frontendOf(front, layers.IPProtocolTCP), ratelimitRatelimitLimit{Rate: 1 << 30, Burst: 1 << 30}); err != nil {
				b.Fatal(err)
			}
		}
		entry, err := dp.Entry(slots.PodEgress)
		if err != nil {
			b.Fatal(err)
		}
		return &datapathUnderTest{entry: entry}
	}
	entryOnly, inTree, plugin := setup(false, false), setup(false, true), setup(true, true)
	for _, pkt := range []struct {
		name, unit string
		flow       dptest.Flow
	}{
		{"SYN to a limited frontend", "syn", dptest.Flow{Src: netip.MustParseAddrPort("10.244.1.5:40000"), Dst: front, Proto: layers.IPProtocolTCP, SYN: true}},
		{"established segment", "established", dptest.Flow{Src: netip.MustParseAddrPort("10.244.1.5:40000"), Dst: front, Proto: layers.IPProtocolTCP, ACK: true, Payload: []byte("GET / HTTP/1.1\r\n\r\n")}},
	} {
		frame := dptest.Build(b, pkt.flow)
		base := entryOnly.median(b, frame, n)
		it := inTree.median(b, frame, n)
		pl := plugin.median(b, frame, n)
		b.Logf("%-26s entry only %4d ns, in-tree stage %4d ns, plugin stage %4d ns: plugin/in-tree %.2f×",
			pkt.name, base.Nanoseconds(), it.Nanoseconds(), pl.Nanoseconds(), float64(pl)/float64(it))
		b.ReportMetric(float64(pl)/float64(it), "plugin/in-tree-"+pkt.unit)
	}
}

type datapathUnderTest struct {
	entry *ebpf.Program
}

// median runs frame through the entry n times, each time checking that
// the packet went on unchanged (the stage let it pass), and returns the
// median of the kernel's times.
func (d *datapathUnderTest) median(b *testing.B, frame []byte, n int) time.Duration {
	b.Helper()
	times := make([]time.Duration, n)
	out := make([]byte, 2048)
	for i := range n {
		ret, took, err := dptest.RunTimed(d.entry, frame, out)
		if err != nil {
			b.Fatal(err)
		}
		if ret != dptest.ActOK || !slices.Equal(out[:len(frame)], frame) {
			b.Fatalf("repeat %d: verdict %d, or the packet changed: it did not pass the stage", i, ret)
		}
		times[i] = took
	}
	slices.Sort(times)
	return times[n/2]
}
