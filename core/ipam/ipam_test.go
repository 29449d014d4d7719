package ipam

import (
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
)

func pfx(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, x := range s {
		out = append(out, netip.MustParsePrefix(x))
	}
	return out
}

func open(t *testing.T, dir string, r ...string) *Allocator {
	t.Helper()
	a, err := Open(dir, pfx(r...))
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestAllocateIsIdempotentAndSkipsReservedAddresses(t *testing.T) {
	a := open(t, t.TempDir(), "10.244.1.0/29")
	seen := map[netip.Addr]bool{}
	for i := range 6 {
		ip, err := a.Allocate(Owner{ID: fmt.Sprint("c", i), IfName: "eth0"})
		if err != nil {
			t.Fatal(err)
		}
		if ip.String() == "10.244.1.0" || ip.String() == "10.244.1.7" || seen[ip] {
			t.Fatalf("allocation %d got %s (seen %v)", i, ip, seen)
		}
		seen[ip] = true
	}
	again, err := a.Allocate(Owner{ID: "c3", IfName: "eth0"})
	if err != nil || !seen[again] {
		t.Fatalf("repeated allocation: %s %v", again, err)
	}
	_, err = a.Allocate(Owner{ID: "c9", IfName: "eth0"})
	if err == nil || !strings.Contains(err.Error(), "no free address left in 10.244.1.0/29 (6 allocated)") {
		t.Fatalf("exhausted range: %v", err)
	}
}

func TestReleasedAddressIsNotReusedAtOnce(t *testing.T) {
	dir := t.TempDir()
	a := open(t, dir, "10.244.1.0/24")
	first, _ := a.Allocate(Owner{ID: "a", IfName: "eth0"})
	if err := a.Release(Owner{ID: "a", IfName: "eth0"}); err != nil {
		t.Fatal(err)
	}
	if err := a.Release(Owner{ID: "a", IfName: "eth0"}); err != nil {
		t.Fatalf("second release: %v", err)
	}
	// A new allocator (a restart) continues after the last address given.
	b := open(t, dir, "10.244.1.0/24")
	next, err := b.Allocate(Owner{ID: "b", IfName: "eth0"})
	if err != nil || next == first || next != first.Next() {
		t.Fatalf("after releasing %s got %s (%v), want %s", first, next, err, first.Next())
	}
	if ip, ok, _ := b.Get(Owner{ID: "b", IfName: "eth0"}); !ok || ip != next {
		t.Fatalf("Get = %s %v", ip, ok)
	}
}

func TestConcurrentAllocationsAreDistinct(t *testing.T) {
	dir := t.TempDir()
	var mu sync.Mutex
	got := map[netip.Addr]string{}
	var wg sync.WaitGroup
	for i := range 40 {
		wg.Go(func() {
			// Each its own allocator, as separate CNI processes would be.
			a, err := Open(dir, pfx("10.244.1.0/24"))
			if err != nil {
				t.Error(err)
				return
			}
			id := fmt.Sprint("c", i)
			ip, err := a.Allocate(Owner{ID: id, IfName: "eth0"})
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if other, dup := got[ip]; dup {
				t.Errorf("%s given to %s and %s", ip, other, id)
			}
			got[ip] = id
		})
	}
	wg.Wait()
	if len(got) != 40 {
		t.Fatalf("%d distinct addresses, want 40", len(got))
	}
}

func TestSeveralRanges(t *testing.T) {
	a := open(t, t.TempDir(), "10.244.1.0/30", "10.244.2.0/30")
	var ips []string
	for i := range 4 {
		ip, err := a.Allocate(Owner{ID: fmt.Sprint(i), IfName: "eth0"})
		if err != nil {
			t.Fatal(err)
		}
		ips = append(ips, ip.String())
	}
	if strings.Join(ips, " ") != "10.244.1.1 10.244.1.2 10.244.2.1 10.244.2.2" {
		t.Fatalf("allocations %v", ips)
	}
}

func TestWithoutRangesOnlyReleases(t *testing.T) {
	dir := t.TempDir()
	ip, _ := open(t, dir, "10.244.1.0/24").Allocate(Owner{ID: "a", IfName: "eth0"})
	a, err := Open(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, ok, _ := a.Get(Owner{ID: "a", IfName: "eth0"}); !ok || got != ip {
		t.Fatalf("Get = %s %v", got, ok)
	}
	if _, err := a.Allocate(Owner{ID: "b", IfName: "eth0"}); err == nil {
		t.Fatal("allocated without ranges")
	}
	if err := a.Release(Owner{ID: "a", IfName: "eth0"}); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := a.Get(Owner{ID: "a", IfName: "eth0"}); ok {
		t.Fatal("released address still allocated")
	}
}

func TestOpenRejectsBadRanges(t *testing.T) {
	for _, r := range [][]netip.Prefix{pfx("fd00::/64"), pfx("10.244.1.1/24"), pfx("10.244.1.0/31")} {
		if _, err := Open(t.TempDir(), r); err == nil {
			t.Errorf("Open(%v) accepted", r)
		}
	}
}
