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
	first, last = Range(NetdevEgress)
	if first != 3*PerHook || last != 3*PerHook+8 {
		t.Fatalf("netdev-egress range = %d..%d", first, last)
	}
	// A hook without slots has an empty range.
	saved := table
	defer func() { table = saved }()
	table = []Slot{{Name: "pod-egress/arp", Hook: PodEgress}}
	if first, last = Range(NetdevEgress); first <= last {
		t.Fatalf("netdev-egress range %d..%d should be empty without slots", first, last)
	}
}

// The longest chain of stages a packet can run through stays within the
// kernel's tail-call limit even if every slot position of its hooks were
// entered, filled or not.
func TestChainsFitTheTailCallLimit(t *testing.T) {
	longest := 0
	for _, c := range Chains {
		n := ChainTailCalls(c)
		t.Logf("chain %v: at most %d tail calls", c, n)
		if n > MaxTailCalls {
			t.Errorf("chain %v can make %d tail calls; the kernel allows %d", c, n, MaxTailCalls)
		}
		longest = max(longest, n)
	}
	// pod-egress (orders 0..12) into pod-ingress (4..12 of its range,
	// counted from 0): 13 + 13.
	if longest != 26 {
		t.Errorf("longest chain %d tail calls, want 26 for today's table", longest)
	}
}
