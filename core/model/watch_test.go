package model_test

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/weirnet/weir/core/model"
)

// changed lists a delta's services as "name" or "name(gone)", sorted.
func changed(d model.Delta) string {
	var out []string
	for n, s := range d.Services {
		if s == nil {
			out = append(out, n.String()+"(gone)")
		} else {
			out = append(out, n.String())
		}
	}
	slices.Sort(out)
	return strings.Join(out, " ")
}

func next(t *testing.T, w *model.Watcher) model.Delta {
	t.Helper()
	d, ok := w.Next()
	if !ok {
		t.Fatal("watcher not ready")
	}
	return d
}

func TestWatcherReportsOnlyWhatChanged(t *testing.T) {
	s := model.NewStore()
	s.Expect("file")
	w := s.Watch()
	if pending(w.C()) != 1 {
		t.Fatal("a new watcher is not woken for the current state")
	}
	if err := s.Replace("file", []*model.Service{svc("web", fe("10.96.0.10:80", model.TCP, "10.244.1.1:80")), svc("db", fe("10.96.0.11:5432", model.TCP))}); err != nil {
		t.Fatal(err)
	}
	d := next(t, w)
	if !d.Full || changed(d) != "default/db default/web" || d.Version != s.ServicesVersion() {
		t.Fatalf("first delta: full %v, %q, version %d (store %d); want full with both", d.Full, changed(d), d.Version, s.ServicesVersion())
	}

	// Replacing the file with one service changed touches only it, and a
	// service left out is reported gone.
	if err := s.Replace("file", []*model.Service{svc("web", fe("10.96.0.10:80", model.TCP, "10.244.1.2:80"))}); err != nil {
		t.Fatal(err)
	}
	if pending(w.C()) != 1 {
		t.Fatal("change did not wake the watcher")
	}
	if d := next(t, w); d.Full || changed(d) != "default/db(gone) default/web" {
		t.Fatalf("delta %q (full %v); want web changed and db gone", changed(d), d.Full)
	}
	// The same content again is no change at all.
	v := s.ServicesVersion()
	if err := s.Replace("file", []*model.Service{svc("web", fe("10.96.0.10:80", model.TCP, "10.244.1.2:80"))}); err != nil {
		t.Fatal(err)
	}
	if d := next(t, w); len(d.Services) != 0 || s.ServicesVersion() != v {
		t.Fatalf("an identical Replace reported %q and moved the version %d -> %d", changed(d), v, s.ServicesVersion())
	}
	// Nodes are not services: a node change does not wake the watcher.
	pending(w.C())
	if err := s.ReplaceNodes("file", nil); err != nil {
		t.Fatal(err)
	}
	if err := s.ReplaceNodes("file", []*model.Node{{Name: "n1", IP: addr("192.168.1.1")}}); err != nil {
		t.Fatal(err)
	}
	if n := pending(w.C()); n != 0 {
		t.Fatalf("a node change woke the services watcher %d times", n)
	}
	// Deleted and added back before the reader looks: reported as it is.
	s.Delete("file", name("web"))
	if err := s.Upsert("file", svc("web", fe("10.96.0.10:80", model.TCP))); err != nil {
		t.Fatal(err)
	}
	if d := next(t, w); changed(d) != "default/web" || len(d.Services[name("web")].Frontends[0].Backends) != 0 {
		t.Fatalf("delete then add: %q", changed(d))
	}
	// Resync asks for everything again.
	w.Resync()
	if d := next(t, w); !d.Full || changed(d) != "default/web" {
		t.Fatalf("after Resync: full %v %q", d.Full, changed(d))
	}
}

func TestWatcherWaitsForExpectedSources(t *testing.T) {
	s := model.NewStore()
	s.Expect("k8s")
	w := s.Watch()
	if err := s.Upsert("k8s", svc("web", fe("10.96.0.10:80", model.TCP))); err != nil {
		t.Fatal(err)
	}
	if _, ok := w.Next(); ok {
		t.Fatal("watcher ready before the expected source synced")
	}
	pending(w.C())
	s.MarkSynced("k8s")
	if pending(w.C()) != 1 {
		t.Fatal("syncing did not wake the watcher")
	}
	// The first delta is the whole state, whatever happened before.
	if d := next(t, w); !d.Full || changed(d) != "default/web" {
		t.Fatalf("first delta after sync: full %v %q", d.Full, changed(d))
	}
}

// admitter refuses updates that would hold more than max frontends, and
// records what it committed.
type admitter struct {
	max, held int
	seen      [][]model.Change
}

func (a *admitter) Admit(cs []model.Change) (func(), error) {
	a.seen = append(a.seen, cs)
	n := a.held
	for _, c := range cs {
		if c.Old != nil {
			n -= len(c.Old.Frontends)
		}
		if c.New != nil {
			n += len(c.New.Frontends)
		}
	}
	if n > a.max {
		return nil, errors.New("full")
	}
	return func() { a.held = n }, nil
}

func TestStoreAdmission(t *testing.T) {
	s := model.NewStore()
	if err := s.Replace("file", []*model.Service{svc("a", fe("10.96.0.1:80", model.TCP))}); err != nil {
		t.Fatal(err)
	}
	a := &admitter{max: 3}
	s.SetAdmitter(a)
	if a.held != 1 {
		t.Fatalf("SetAdmitter did not hand over what the store held: %d", a.held)
	}
	st := current(s)
	// Three more frontends do not fit: nothing changes, the error is the
	// admitter's.
	err := s.Replace("file", []*model.Service{svc("a", fe("10.96.0.1:80", model.TCP)),
		svc("b", fe("10.96.0.2:80", model.TCP), fe("10.96.0.2:81", model.TCP), fe("10.96.0.2:82", model.TCP))})
	wantErr(t, err, "full")
	unchanged(t, s, st)
	if a.held != 1 {
		t.Fatalf("a refused update was committed: %d", a.held)
	}
	// Only what changes is shown: an unchanged service is not a change.
	a.seen = nil
	if err := s.Replace("file", []*model.Service{svc("a", fe("10.96.0.1:80", model.TCP)), svc("b", fe("10.96.0.2:80", model.TCP))}); err != nil {
		t.Fatal(err)
	}
	if len(a.seen) != 1 || len(a.seen[0]) != 1 || a.seen[0][0].Old != nil || a.seen[0][0].New.Name != name("b") || a.held != 2 {
		t.Fatalf("admitter saw %+v, holds %d; want b added only, 2 held", a.seen, a.held)
	}
	// Removing never needs room, and is committed.
	s.Delete("file", name("b"))
	if a.held != 1 {
		t.Fatalf("after delete the admitter holds %d, want 1", a.held)
	}
	// Checks the store makes first (conflicts) never reach the admitter.
	a.seen = nil
	wantErr(t, s.Upsert("k8s", svc("c", fe("10.96.0.1:80", model.TCP))),
		"frontend 10.96.0.1:80/TCP of service default/c (source k8s) is already used by service default/a (source file)")
	if len(a.seen) != 0 {
		t.Fatal("a conflicting update reached the admitter")
	}
}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

// The node's zone decides which backends topology hints choose: a new
// zone wakes every watcher with a full delta in that zone; the same zone
// again is no change.
func TestZoneChangeMakesEveryDeltaFull(t *testing.T) {
	s := model.NewStore()
	s.Expect("file")
	s.SetZone("zone-a")
	w1, w2 := s.Watch(), s.Watch()
	if err := s.Replace("file", []*model.Service{svc("web", fe("10.96.0.10:80", model.TCP, "10.244.1.1:80")), svc("db", fe("10.96.0.11:5432", model.TCP))}); err != nil {
		t.Fatal(err)
	}
	for _, w := range []*model.Watcher{w1, w2} {
		if d := next(t, w); !d.Full || d.Zone != "zone-a" {
			t.Fatalf("first delta: full %v zone %q", d.Full, d.Zone)
		}
	}
	pending(w1.C())
	pending(w2.C())
	s.SetZone("zone-a")
	if pending(w1.C()) != 0 {
		t.Fatal("setting the same zone woke the watcher")
	}
	s.SetZone("zone-b")
	for _, w := range []*model.Watcher{w1, w2} {
		if pending(w.C()) != 1 {
			t.Fatal("a new zone did not wake the watcher")
		}
		if d := next(t, w); !d.Full || d.Zone != "zone-b" || changed(d) != "default/db default/web" {
			t.Fatalf("after the zone changed: full %v zone %q services %q; want every service in zone-b", d.Full, d.Zone, changed(d))
		}
	}
	if s.Zone() != "zone-b" {
		t.Fatalf("Zone() = %q", s.Zone())
	}
}
