package lbmap

import (
	"fmt"
	"slices"
	"testing"

	"github.com/weirnet/weir/core/model"
)

// Departures are the backends that left a frontend: removed from it or
// its service deleted; a backend that turns terminating has not left, nor
// has one that stays in another scope of the frontend. A restarted
// reconciler tells what left while it was away.
func TestDeparturesAreTheBackendsThatLeft(t *testing.T) {
	m := newMaps(t)
	r := m.reconciler()
	var got []string
	r.OnDepartures(func(ds []Departure) {
		for _, d := range ds {
			got = append(got, fmt.Sprintf("%d %s/%s", d.RevNAT, d.Backend, d.Proto))
		}
	})
	step := func(name string, s *model.Snapshot, want ...string) {
		t.Helper()
		got = nil
		apply(t, r, s)
		slices.Sort(got)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Errorf("%s: departures %q, want %q", name, got, want)
		}
	}
	web := func(bes ...string) *model.Service { return svc("web", "10.96.0.10:80", model.TCP, bes...) }
	dns := func(bes ...string) *model.Service { return svc("dns", "10.96.0.53:53", model.UDP, bes...) }
	step("first write", snap(web("10.244.1.11:8080", "10.244.1.12:8080"), dns("10.244.1.11:53")))
	webID := m.frontendMaster("10.96.0.10:80", model.TCP).RevNat
	dnsID := m.frontendMaster("10.96.0.53:53", model.UDP).RevNat
	step("terminating stays", snap(web("10.244.1.11:8080", "~10.244.1.12:8080"), dns("10.244.1.11:53")))
	step("removed", snap(web("10.244.1.11:8080"), dns("10.244.1.11:53")),
		fmt.Sprintf("%d 10.244.1.12:8080/TCP", webID))
	step("unchanged", snap(web("10.244.1.11:8080"), dns("10.244.1.11:53")))
	step("service deleted", snap(web("10.244.1.11:8080")),
		fmt.Sprintf("%d 10.244.1.11:53/UDP", dnsID))

	// A new reconciler over the same maps (an agent restart) compares
	// what the maps hold with what is wanted.
	r2 := m.reconciler()
	got = nil
	r2.OnDepartures(func(ds []Departure) {
		for _, d := range ds {
			got = append(got, fmt.Sprintf("%d %s/%s", d.RevNAT, d.Backend, d.Proto))
		}
	})
	apply(t, r2, snap(web("10.244.1.13:8080")))
	if want := []string{fmt.Sprintf("%d 10.244.1.11:8080/TCP", webID)}; !slices.Equal(got, want) {
		t.Errorf("after a restart: departures %q, want %q", got, want)
	}
}
