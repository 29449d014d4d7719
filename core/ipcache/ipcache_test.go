package ipcache

import (
	"net/netip"
	"testing"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/datapath/dptest"
	"github.com/weirnet/weir/core/model"
)

func nodes() []*model.Node {
	mk := func(name, ip, cidr, mode string) *model.Node {
		return &model.Node{Name: name, IP: netip.MustParseAddr(ip), PodCIDRs: []netip.Prefix{netip.MustParsePrefix(cidr)},
			Labels: map[string]string{"mode": mode}}
	}
	return []*model.Node{
		mk("n1", "192.168.100.11", "10.244.1.0/24", "vxlan"),
		mk("n2", "192.168.100.12", "10.244.2.0/24", "vxlan"),
		mk("n3", "192.168.100.13", "10.244.3.0/24", "native"),
		mk("n4", "192.168.100.14", "10.244.4.0/24", "geneve"),
	}
}

func keyOfMode(labels map[string]string) string {
	if labels["mode"] == "native" {
		return ""
	}
	return labels["mode"]
}

// A peer is encapsulated to only when it tunnels exactly as this node does.
func TestDesiredEntries(t *testing.T) {
	r := New(Options{Self: "n1", SelfKey: "vxlan", PeerKey: keyOfMode})
	d := r.Desired(nodes())
	want := map[string]datapath.IPCacheEntry{
		"10.244.1.0/24": {NodeIp: datapath.AddrToBE(netip.MustParseAddr("192.168.100.11")), Flags: datapath.IPCacheLocalPod},
		"10.244.2.0/24": {NodeIp: datapath.AddrToBE(netip.MustParseAddr("192.168.100.12")), Flags: datapath.IPCacheRemotePod | datapath.IPCacheEncap},
		"10.244.3.0/24": {NodeIp: datapath.AddrToBE(netip.MustParseAddr("192.168.100.13")), Flags: datapath.IPCacheRemotePod},
		"10.244.4.0/24": {NodeIp: datapath.AddrToBE(netip.MustParseAddr("192.168.100.14")), Flags: datapath.IPCacheRemotePod},
	}
	for p, e := range want {
		if got := d[key(netip.MustParsePrefix(p))]; got != e {
			t.Errorf("%s: %+v, want %+v", p, got, e)
		}
	}
	// A tunnel peer's own address is reached through the tunnel, as
	// its pods are.
	for _, n := range nodes() {
		want := uint16(datapath.IPCacheNode)
		if n.Name == "n2" {
			want |= datapath.IPCacheEncap
		}
		if got := d[key(netip.PrefixFrom(n.IP, 32))]; got.Flags != want {
			t.Errorf("node %s address: %+v, want flags %#x", n.Name, got, want)
		}
	}
	if len(d) != 8 {
		t.Fatalf("%d entries, want 8", len(d))
	}
	// A node that does not tunnel encapsulates to nobody.
	native := New(Options{Self: "n3", SelfKey: "", PeerKey: keyOfMode}).Desired(nodes())
	for k, e := range native {
		if e.Flags&datapath.IPCacheEncap != 0 {
			t.Errorf("native node encapsulates to %v", k)
		}
	}
}

// Apply writes the map and removes what is no longer there; a restarted
// reconciler reads what the map holds.
func TestApplyWritesAndPrunes(t *testing.T) {
	dp := dptest.Open(t)
	r := New(Options{Map: func() Map { return dp.IPCache() }, Self: "n1", SelfKey: "vxlan", PeerKey: keyOfMode})
	if err := r.Apply(nodes()); err != nil {
		t.Fatal(err)
	}
	count := func() int {
		n := 0
		var k datapath.IPCacheKey
		var v datapath.IPCacheEntry
		it := dp.IPCache().Iterate()
		for it.Next(&k, &v) {
			n++
		}
		return n
	}
	if n := count(); n != 8 {
		t.Fatalf("%d entries after apply, want 8", n)
	}
	// n4 leaves; a fresh reconciler (agent restart) prunes it.
	r2 := New(Options{Map: func() Map { return dp.IPCache() }, Self: "n1", SelfKey: "vxlan", PeerKey: keyOfMode})
	if err := r2.Apply(nodes()[:3]); err != nil {
		t.Fatal(err)
	}
	if n := count(); n != 6 {
		t.Fatalf("%d entries after n4 left, want 6", n)
	}
	// The longest prefix wins for lookups: a pod address finds its CIDR.
	var e datapath.IPCacheEntry
	k := datapath.IPCacheKey{Prefixlen: 32, Addr: datapath.AddrToBE(netip.MustParseAddr("10.244.2.77"))}
	if err := dp.IPCache().Lookup(k, &e); err != nil || e.Flags != datapath.IPCacheRemotePod|datapath.IPCacheEncap {
		t.Fatalf("lookup of a pod on n2: %+v %v", e, err)
	}
}
