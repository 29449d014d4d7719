package nodeport

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/weirnet/weir/core/model"
)

// Maglev's table gives every backend about the same share, is computed
// the same from the same names (every node sorts them the same way, see
// maglevFronts), and when one of ten backends goes, about a tenth of the
// entries (flows) move: its own, and few others.
func TestMaglevTable(t *testing.T) {
	names := make([]string, 10)
	for i := range names {
		names[i] = fmt.Sprintf("10.244.%d.11:8080", i+1)
	}
	before := maglevTable(names, MaglevM)
	share := map[int]int{}
	for _, b := range before {
		share[b]++
	}
	for b, n := range share {
		if n < MaglevM/10*9/10 || n > MaglevM/10*11/10 {
			t.Errorf("backend %s holds %d of %d entries; want about a tenth", names[b], n, MaglevM)
		}
	}
	again := maglevTable(append([]string(nil), names...), MaglevM)
	for i := range before {
		if before[i] != again[i] {
			t.Fatalf("the table differs at entry %d between two computations", i)
		}
	}
	// Backend 3 goes: the others keep their names, so compare by name.
	rest := append(append([]string(nil), names[:3]...), names[4:]...)
	after := maglevTable(rest, MaglevM)
	moved, others := 0, 0
	for i := range before {
		if names[before[i]] != rest[after[i]] {
			moved++
			if before[i] != 3 {
				others++
			}
		}
	}
	frac := float64(moved) / MaglevM
	t.Logf("one of 10 backends gone: %.2f%% of flows move (ideal 10%%), %.2f%% that were not on it", 100*frac, 100*float64(others)/MaglevM)
	if frac < 0.09 || frac > 0.13 {
		t.Errorf("%.3f of the entries moved; want about 0.10", frac)
	}
}

// BenchmarkMaglevDisruption: the share of flows (table entries) that move
// when one of N backends goes, beside the ideal 1/N, for N = 10 and 100;
// and the time to compute a table.
func BenchmarkMaglevDisruption(b *testing.B) {
	for _, n := range []int{10, 100} {
		b.Run(fmt.Sprintf("backends=%d", n), func(b *testing.B) {
			names := make([]string, n)
			for i := range names {
				names[i] = fmt.Sprintf("10.244.%d.%d:8080", i/200, i%200+10)
			}
			var before []int
			for b.Loop() {
				before = maglevTable(names, MaglevM)
			}
			gone := n / 2
			rest := append(append([]string(nil), names[:gone]...), names[gone+1:]...)
			after := maglevTable(rest, MaglevM)
			moved := 0
			for i := range before {
				if names[before[i]] != rest[after[i]] {
					moved++
				}
			}
			b.ReportMetric(float64(moved)/MaglevM, "share-moved")
			b.ReportMetric(1/float64(n), "share-ideal(baseline)")
			b.ReportMetric(float64(moved)/MaglevM*float64(n), "ratio-moved-vs-ideal")
		})
	}
}

// Every node lists a frontend's backends the same way whatever order its
// source gave them: sorted, without duplicates, active ones only while
// there are any; externalTrafficPolicy Local frontends and ClusterIPs get
// no table.
func TestMaglevFronts(t *testing.T) {
	b := func(s string, st model.BackendState) model.Backend {
		return model.Backend{Addr: netip.MustParseAddrPort(s), State: st}
	}
	svc := &model.Service{Frontends: []model.Frontend{
		{Addr: netip.MustParseAddrPort("10.96.0.10:80"), Proto: model.TCP, Type: model.ClusterIP},
		{Addr: netip.MustParseAddrPort("0.0.0.0:30080"), Proto: model.TCP, Type: model.NodePort, Backends: []model.Backend{
			b("10.244.3.11:8080", model.Active), b("10.244.1.11:8080", model.Active), b("10.244.2.11:8080", model.Terminating)}},
		{Addr: netip.MustParseAddrPort("198.51.100.1:80"), Proto: model.TCP, Type: model.LoadBalancer, Backends: []model.Backend{
			b("10.244.2.11:8080", model.Terminating), b("10.244.1.11:8080", model.Terminating)}},
		{Addr: netip.MustParseAddrPort("198.51.100.2:80"), Proto: model.TCP, Type: model.LoadBalancer, ExternalLocal: true},
	}}
	got := maglevFronts(svc, model.Topology{Node: "n1", Zone: "zone-a"})
	if len(got) != 2 {
		t.Fatalf("%d frontends with tables, want 2: %+v", len(got), got)
	}
	if fmt.Sprint(got[0].backends) != "[10.244.1.11:8080 10.244.3.11:8080]" {
		t.Errorf("NodePort backends %v: want the active ones, sorted", got[0].backends)
	}
	if fmt.Sprint(got[1].backends) != "[10.244.1.11:8080 10.244.2.11:8080]" {
		t.Errorf("load-balancer backends %v: want the terminating ones (none active), sorted", got[1].backends)
	}
}

// A zone's nodes build their tables over the backends hinted for their
// zone, as the slots hold them; in a zone without any, over all.
func TestMaglevFrontsFollowZoneHints(t *testing.T) {
	b := func(s, zone string) model.Backend {
		return model.Backend{Addr: netip.MustParseAddrPort(s), Hints: &model.Hints{Zones: []string{zone}}}
	}
	svc := &model.Service{Frontends: []model.Frontend{
		{Addr: netip.MustParseAddrPort("0.0.0.0:30080"), Proto: model.TCP, Type: model.NodePort, Backends: []model.Backend{
			b("10.244.1.11:8080", "zone-a"), b("10.244.2.11:8080", "zone-b"), b("10.244.1.12:8080", "zone-a")}},
	}}
	for zone, want := range map[string]string{
		"zone-a": "[10.244.1.11:8080 10.244.1.12:8080]",
		"zone-b": "[10.244.2.11:8080]",
		"zone-c": "[10.244.1.11:8080 10.244.1.12:8080 10.244.2.11:8080]",
	} {
		got := maglevFronts(svc, model.Topology{Node: "n1", Zone: zone})
		if len(got) != 1 || fmt.Sprint(got[0].backends) != want {
			t.Errorf("in %s: %+v, want one table over %s", zone, got, want)
		}
	}
}
