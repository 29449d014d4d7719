package model_test

import (
	"strings"
	"testing"

	"github.com/weirnet/weir/core/model"
)

// names lists the snapshot's services in order.
func names(s *model.Snapshot) string {
	var out []string
	for _, svc := range s.Services {
		out = append(out, svc.Name.String())
	}
	return strings.Join(out, " ")
}

type state struct {
	snap *model.Snapshot
	ver  uint64
	auth bool
}

func current(s *model.Store) state {
	snap, ver, auth := s.Snapshot()
	return state{snap, ver, auth}
}

// unchanged fails unless the store still has the state before.
func unchanged(t *testing.T, s *model.Store, before state) {
	t.Helper()
	if now := current(s); now != before {
		t.Errorf("store changed: version %d -> %d, authoritative %v -> %v, services %q -> %q",
			before.ver, now.ver, before.auth, now.auth, names(before.snap), names(now.snap))
	}
}

func wantErr(t *testing.T, err error, want string) {
	t.Helper()
	if err == nil || err.Error() != want {
		t.Errorf("error:\n got %v\nwant %s", err, want)
	}
}

func TestStoreEmpty(t *testing.T) {
	s := model.NewStore()
	snap, ver, auth := s.Snapshot()
	if snap == nil || len(snap.Services) != 0 || ver != 0 || auth {
		t.Errorf("new store: snapshot %v, version %d, authoritative %v; want empty, 0, false", snap, ver, auth)
	}
	if !s.Ready() {
		t.Error("new store without expected sources is not Ready")
	}
}

func TestStoreReplace(t *testing.T) {
	s := model.NewStore()
	web := svc("default/web", fe("10.96.0.10:80", model.TCP, "10.244.1.11:8080"))
	dns := svc("kube-system/dns", fe("10.96.0.53:53", model.UDP), fe("10.96.0.53:53", model.TCP))
	api := svc("default/api", fe("10.96.0.11:443", model.TCP))
	if err := s.Replace("file", []*model.Service{web, dns}); err != nil {
		t.Fatal(err)
	}
	if err := s.Replace("k8s", []*model.Service{api}); err != nil {
		t.Fatal(err)
	}
	st := current(s)
	if got := names(st.snap); got != "default/api default/web kube-system/dns" || st.ver != 2 {
		t.Fatalf("services %q version %d; want sorted by name across sources, version 2", got, st.ver)
	}
	if st.snap.Services[1] != web {
		t.Error("snapshot does not hold the services as given")
	}

	// Refused updates leave everything as it was.
	t.Run("invalid service", func(t *testing.T) {
		bad := svc("default/web", fe("10.96.0.10:0", model.TCP))
		wantErr(t, s.Replace("file", []*model.Service{dns, bad}),
			"service default/web: frontend 0: 10.96.0.10:0: port 0 is not allowed (1-65535)")
		unchanged(t, s, st)
	})
	t.Run("service twice in one source", func(t *testing.T) {
		web2 := svc("default/web", fe("10.96.0.12:80", model.TCP))
		wantErr(t, s.Replace("file", []*model.Service{web, web2}), "service default/web is defined twice")
		unchanged(t, s, st)
	})
	t.Run("service in two sources", func(t *testing.T) {
		other := svc("default/api", fe("10.96.0.12:443", model.TCP))
		wantErr(t, s.Replace("file", []*model.Service{web, other}), "service default/api from source file is already defined by source k8s")
		unchanged(t, s, st)
	})
	t.Run("frontend of a service of another source", func(t *testing.T) {
		web2 := svc("default/web", fe("10.96.0.11:443", model.TCP))
		wantErr(t, s.Replace("file", []*model.Service{web2, dns}),
			"frontend 10.96.0.11:443/TCP of service default/web (source file) is already used by service default/api (source k8s)")
		unchanged(t, s, st)
	})
	t.Run("frontend of a service of another source, new one sorts first", func(t *testing.T) {
		// Whatever the names' order, the incoming service is the one
		// blamed.
		aaa := svc("default/aaa", fe("10.96.0.11:443", model.TCP))
		wantErr(t, s.Replace("file", []*model.Service{web, aaa}),
			"frontend 10.96.0.11:443/TCP of service default/aaa (source file) is already used by service default/api (source k8s)")
		unchanged(t, s, st)
	})
	t.Run("frontend of another service of the same source", func(t *testing.T) {
		dns2 := svc("kube-system/dns", fe("10.96.0.53:53", model.UDP), fe("10.96.0.10:80", model.TCP))
		wantErr(t, s.Replace("file", []*model.Service{web, dns2}),
			"frontend 10.96.0.10:80/TCP of service kube-system/dns (source file) is already used by service default/web (source file)")
		unchanged(t, s, st)
	})

	// Same address and port with another protocol is another frontend.
	udp := svc("default/web-udp", fe("10.96.0.10:80", model.UDP))
	if err := s.Replace("file", []*model.Service{web, udp}); err != nil {
		t.Fatalf("Replace: %v", err)
	}
	if st := current(s); names(st.snap) != "default/api default/web default/web-udp" || st.ver != 3 {
		t.Errorf("services %q version %d; want dns replaced by web-udp, version 3", names(st.snap), st.ver)
	}
	// The old snapshot is not modified by later updates.
	if got := names(st.snap); got != "default/api default/web kube-system/dns" {
		t.Errorf("earlier snapshot changed to %q", got)
	}
	// Replacing with nothing removes every service of the source only.
	if err := s.Replace("file", nil); err != nil {
		t.Fatal(err)
	}
	if st := current(s); names(st.snap) != "default/api" || st.ver != 4 {
		t.Errorf("services %q version %d; want default/api, version 4", names(st.snap), st.ver)
	}
}

func TestStoreUpsertDelete(t *testing.T) {
	s := model.NewStore()
	if err := s.Replace("file", []*model.Service{svc("default/web", fe("10.96.0.10:80", model.TCP))}); err != nil {
		t.Fatal(err)
	}
	api := svc("default/api", fe("10.96.0.11:443", model.TCP))
	if err := s.Upsert("k8s", api); err != nil {
		t.Fatal(err)
	}
	if st := current(s); names(st.snap) != "default/api default/web" || st.ver != 2 {
		t.Fatalf("after Upsert: %q version %d", names(st.snap), st.ver)
	}
	// Upsert replaces the service of the same name.
	api2 := svc("default/api", fe("10.96.0.11:443", model.TCP, "10.244.1.20:8443"))
	if err := s.Upsert("k8s", api2); err != nil {
		t.Fatal(err)
	}
	st := current(s)
	if names(st.snap) != "default/api default/web" || st.ver != 3 || st.snap.Services[0] != api2 {
		t.Fatalf("after second Upsert: %q version %d, replaced %v", names(st.snap), st.ver, st.snap.Services[0] == api2)
	}
	// And keeps the source's other services.
	db := svc("default/db", fe("10.96.0.12:5432", model.TCP))
	if err := s.Upsert("k8s", db); err != nil {
		t.Fatal(err)
	}
	st = current(s)
	if names(st.snap) != "default/api default/db default/web" || st.ver != 4 {
		t.Fatalf("after third Upsert: %q version %d", names(st.snap), st.ver)
	}

	wantErr(t, s.Upsert("k8s", svc("default/db", fe("[fd00::12]:5432", model.TCP))),
		"service default/db: frontend 0: address fd00::12 is not IPv4 (only IPv4 is supported)")
	unchanged(t, s, st)
	wantErr(t, s.Upsert("k8s", svc("default/web", fe("10.96.0.13:80", model.TCP))),
		"service default/web from source k8s is already defined by source file")
	unchanged(t, s, st)
	wantErr(t, s.Upsert("k8s", svc("default/db", fe("10.96.0.10:80", model.TCP))),
		"frontend 10.96.0.10:80/TCP of service default/db (source k8s) is already used by service default/web (source file)")
	unchanged(t, s, st)

	// Deleting an absent service, or another source's, changes nothing.
	s.Delete("k8s", name("default/absent"))
	s.Delete("k8s", name("default/web"))
	s.Delete("nobody", name("default/api"))
	unchanged(t, s, st)

	s.Delete("k8s", name("default/api"))
	if st := current(s); names(st.snap) != "default/db default/web" || st.ver != 5 {
		t.Errorf("after Delete: %q version %d", names(st.snap), st.ver)
	}
	// The frontend is free again.
	if err := s.Upsert("k8s", svc("default/api2", fe("10.96.0.11:443", model.TCP))); err != nil {
		t.Errorf("Upsert of the freed frontend: %v", err)
	}
}

func TestStoreAuthoritative(t *testing.T) {
	s := model.NewStore()
	auth := func() bool { _, _, a := s.Snapshot(); return a }
	web := svc("default/web", fe("10.96.0.10:80", model.TCP))

	// Without an expected source nothing is authoritative, synced or not.
	if err := s.Replace("file", []*model.Service{web}); err != nil {
		t.Fatal(err)
	}
	if auth() || !s.Ready() {
		t.Fatalf("no expected source: authoritative %v, Ready %v; want false, true", auth(), s.Ready())
	}

	s.Expect("file") // synced already by the Replace above
	s.Expect("k8s")
	s.Expect("file")
	if auth() || s.Ready() {
		t.Fatalf("k8s not synced: authoritative %v, Ready %v", auth(), s.Ready())
	}
	// A refused first state does not sync the source.
	wantErr(t, s.Replace("k8s", []*model.Service{svc("default/web", fe("10.96.0.11:80", model.TCP))}),
		"service default/web from source k8s is already defined by source file")
	if auth() {
		t.Fatal("authoritative after k8s's Replace was refused")
	}
	// Upserts build the state without syncing it.
	if err := s.Upsert("k8s", svc("default/api", fe("10.96.0.11:80", model.TCP))); err != nil {
		t.Fatal(err)
	}
	s.Delete("k8s", name("default/api"))
	if auth() {
		t.Fatal("authoritative after Upsert/Delete without MarkSynced")
	}
	s.MarkSynced("k8s")
	if !auth() || !s.Ready() {
		t.Fatalf("every expected source synced: authoritative %v, Ready %v", auth(), s.Ready())
	}
	// Once synced, a source stays synced.
	if err := s.Upsert("k8s", svc("default/api", fe("10.96.0.11:80", model.TCP))); err != nil {
		t.Fatal(err)
	}
	if !auth() {
		t.Fatal("not authoritative after an Upsert of a synced source")
	}

	// A newly expected source makes the state non-authoritative again,
	// until it syncs, even with an empty state.
	s.Expect("bgp")
	if auth() {
		t.Fatal("authoritative with bgp expected and not synced")
	}
	if err := s.Replace("bgp", nil); err != nil {
		t.Fatal(err)
	}
	if !auth() {
		t.Fatal("not authoritative after bgp's empty Replace")
	}
}

func TestStoreMarkSyncedOnly(t *testing.T) {
	s := model.NewStore()
	s.Expect("k8s")
	s.MarkSynced("k8s")
	snap, ver, auth := s.Snapshot()
	if len(snap.Services) != 0 || ver != 0 || !auth {
		t.Errorf("after MarkSynced alone: %d services, version %d, authoritative %v; want 0, 0, true", len(snap.Services), ver, auth)
	}
}

func pending(c <-chan struct{}) int {
	n := 0
	for {
		select {
		case <-c:
			n++
		default:
			return n
		}
	}
}

func TestStoreSubscribe(t *testing.T) {
	s := model.NewStore()
	c := s.Subscribe()
	if n := pending(c); n != 1 {
		t.Fatalf("new subscription has %d notifications; want 1 for the current state", n)
	}

	// Several changes: one notification.
	if err := s.Replace("file", []*model.Service{svc("default/web", fe("10.96.0.10:80", model.TCP))}); err != nil {
		t.Fatal(err)
	}
	if err := s.Upsert("k8s", svc("default/api", fe("10.96.0.11:80", model.TCP))); err != nil {
		t.Fatal(err)
	}
	s.Delete("k8s", name("default/api"))
	s.MarkSynced("k8s")
	if n := pending(c); n != 1 {
		t.Errorf("after four changes: %d notifications; want 1 (coalesced)", n)
	}

	d := s.Subscribe()
	if n := pending(d); n != 1 {
		t.Errorf("second subscription has %d notifications; want 1", n)
	}

	// What changes nothing notifies nobody.
	wantErr(t, s.Replace("file", []*model.Service{svc("default/web", fe("10.96.0.10:0", model.TCP))}),
		"service default/web: frontend 0: 10.96.0.10:0: port 0 is not allowed (1-65535)")
	s.Delete("file", name("default/absent"))
	s.MarkSynced("k8s") // already synced
	if n, m := pending(c), pending(d); n != 0 || m != 0 {
		t.Errorf("refused or empty updates notified: %d and %d; want 0", n, m)
	}

	// Every subscriber hears of a change.
	s.MarkSynced("bgp")
	if n, m := pending(c), pending(d); n != 1 || m != 1 {
		t.Errorf("after MarkSynced of a new source: %d and %d notifications; want 1 each", n, m)
	}
	s.Delete("file", name("default/web"))
	if n, m := pending(c), pending(d); n != 1 || m != 1 {
		t.Errorf("after Delete: %d and %d notifications; want 1 each", n, m)
	}
}
