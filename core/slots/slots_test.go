package slots

import "testing"

func TestTableIsConsistent(t *testing.T) {
	if err := check(table); err != nil {
		t.Fatal(err)
	}
}

func TestCheckRejectsBadTables(t *testing.T) {
	cases := map[string][]Slot{
		"wrong hook prefix": {{Name: "pod-ingress/x", Hook: PodEgress}},
		"duplicate name":    {{Name: "pod-egress/x", Hook: PodEgress, Order: 1}, {Name: "pod-egress/x", Hook: PodEgress, Order: 2}},
		"shared index":      {{Name: "pod-egress/x", Hook: PodEgress, Order: 1}, {Name: "pod-egress/y", Hook: PodEgress, Order: 1}},
		"order too large":   {{Name: "pod-egress/x", Hook: PodEgress, Order: PerHook}},
	}
	for name, tab := range cases {
		if err := check(tab); err == nil {
			t.Errorf("%s: table accepted", name)
		}
	}
}

func TestStagesRunInTableOrder(t *testing.T) {
	lb, _ := Lookup("pod-egress/lb")
	local, _ := Lookup("pod-egress/local")
	arp, _ := Lookup("pod-egress/arp")
	if !(arp.Index() < lb.Index() && lb.Index() < local.Index()) {
		t.Fatalf("pod-egress order arp(%d) < lb(%d) < local(%d) broken", arp.Index(), lb.Index(), local.Index())
	}
	revnat, _ := Lookup("pod-ingress/lb-revnat")
	deliver, _ := Lookup("pod-ingress/deliver")
	if revnat.Index() >= deliver.Index() {
		t.Fatalf("reverse NAT (%d) must run before delivery (%d)", revnat.Index(), deliver.Index())
	}
}

func TestRanges(t *testing.T) {
	first, last := Range(PodEgress)
	if first != 0 || last != 12 {
		t.Fatalf("pod-egress range = %d..%d, want 0..12", first, last)
	}
	first, last = Range(PodIngress)
	if first != PerHook || last != PerHook+12 {
		t.Fatalf("pod-ingress range = %d..%d, want %d..%d", first, last, PerHook, PerHook+12)
	}
	first, last = Range(NetdevIngress)
	if first != 2*PerHook || last != 2*PerHook+8 {
		t.Fatalf("netdev-ingress range = %d..%d", first, last)
	}
	// Hooks nobody can fill yet have an empty range.
	first, last = Range(NetdevEgress)
	if first <= last {
		t.Fatalf("netdev-egress range %d..%d should be empty", first, last)
	}
}
