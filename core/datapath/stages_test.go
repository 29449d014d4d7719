package datapath_test

import (
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket/layers"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/datapath/dptest"
	"github.com/weirnet/weir/core/slots"
)

func metric(t *testing.T, dp *datapath.Datapath, h slots.Hook, r datapath.Reason) uint64 {
	t.Helper()
	var per []datapath.Metric
	if err := dp.Metrics().Lookup(uint32(h)*datapath.NumReasons+uint32(r), &per); err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, m := range per {
		n += m.Packets
	}
	return n
}

func packet(t *testing.T) []byte {
	return dptest.Build(t, dptest.Flow{Src: netip.MustParseAddrPort("10.244.1.10:40000"), Dst: netip.MustParseAddrPort("10.244.1.11:80"),
		Proto: layers.IPProtocolTCP, SYN: true})
}

// With every slot of the longest chain filled, a packet runs through all
// of them (pod-egress into pod-ingress) and out, without a missed tail
// call.
func TestFullChainRuns(t *testing.T) {
	dp := dptest.Open(t)
	fill := map[string]string{}
	for _, s := range slots.All() {
		switch s.Hook {
		case slots.PodEgress:
			fill[s.Name] = "stage_pass"
		case slots.PodIngress:
			fill[s.Name] = "stage_pass"
		}
	}
	fill["pod-egress/forward"] = "stage_to_pod_ingress" // the last pod-egress slot
	dptest.Install(t, dp, dptest.StageObject(t, fill))
	eg, _ := dp.Entry(slots.PodEgress)
	res := dptest.Run(t, eg, packet(t))
	if res.Verdict != dptest.ActOK {
		t.Fatalf("verdict %d, want the packet through", res.Verdict)
	}
	if n := metric(t, dp, slots.PodIngress, datapath.ReasonPass); n != 1 {
		t.Fatalf("the packet did not reach the end of pod-ingress (%d passes counted)", n)
	}
	if n := metric(t, dp, slots.PodEgress, datapath.DropMissedTailCall) + metric(t, dp, slots.PodIngress, datapath.DropMissedTailCall); n != 0 {
		t.Fatalf("%d missed tail calls", n)
	}
}

// A chain that runs into the kernel's tail-call limit is a counted drop
// with its own reason, never a packet passed on with stages skipped.
func TestMissedTailCallIsACountedDrop(t *testing.T) {
	dp := dptest.Open(t)
	dptest.Install(t, dp, dptest.StageObject(t, map[string]string{"pod-egress/arp": "stage_reenter"}))
	eg, _ := dp.Entry(slots.PodEgress)
	res := dptest.Run(t, eg, packet(t))
	if res.Verdict != dptest.ActShot {
		t.Fatalf("verdict %d, want a drop", res.Verdict)
	}
	if n := metric(t, dp, slots.PodEgress, datapath.DropMissedTailCall); n != 1 {
		t.Fatalf("missed tail calls counted: %d, want 1", n)
	}
	if n := metric(t, dp, slots.PodEgress, datapath.ReasonPass); n != 0 {
		t.Fatalf("%d packets counted as passed", n)
	}
}

// A slot that was filled and then emptied is passed by: no missed tail
// call is counted for it (core unmarks a slot before emptying it).
func TestClearedSlotIsPassedBy(t *testing.T) {
	dp := dptest.Open(t)
	dptest.Install(t, dp, dptest.StageObject(t, map[string]string{"pod-egress/forward": "stage_pass"}))
	if ok, _ := dp.SlotFilled("pod-egress/lb"); ok {
		t.Fatal("an unclaimed slot is filled")
	}
	eg, _ := dp.Entry(slots.PodEgress)
	if res := dptest.Run(t, eg, packet(t)); res.Verdict != dptest.ActOK {
		t.Fatalf("verdict %d", res.Verdict)
	}
	if err := dp.ClearSlot("pod-egress/forward"); err != nil {
		t.Fatal(err)
	}
	if res := dptest.Run(t, eg, packet(t)); res.Verdict != dptest.ActOK {
		t.Fatalf("verdict %d after the slot was emptied", res.Verdict)
	}
	if n := metric(t, dp, slots.PodEgress, datapath.DropMissedTailCall); n != 0 {
		t.Fatalf("%d missed tail calls", n)
	}
}
