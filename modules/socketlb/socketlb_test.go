package socketlb

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/datapath/dptest"
	"github.com/weirnet/weir/core/lbmap"
	"github.com/weirnet/weir/core/model"
	"github.com/weirnet/weir/core/mounts"
	"github.com/weirnet/weir/core/netns"
)

var (
	vip     = netip.MustParseAddr("10.96.0.10")
	dnsVIP  = netip.MustParseAddr("10.96.0.53")
	emptyIP = netip.MustParseAddr("10.96.0.99")
	be1     = netip.MustParseAddr("10.244.1.11")
	be2     = netip.MustParseAddr("10.244.1.12")
)

// lab is a network namespace holding two backends (TCP :8080 and UDP :5353
// on each, answering with their own address), a cgroup for clients, and a
// datapath whose socket hooks are on that cgroup.
type lab struct {
	ns     string
	cgroup string
	dp     *datapath.Datapath
	rec    *lbmap.Reconciler
	inst   *datapath.Installation
}

// newLab builds the lab; nodeIsLab makes the lab's namespace the node's
// own (its cookie is the one hostNamespaceOnly lets through), else the
// test's namespace is.
func newLab(t *testing.T, s *Settings, nodeIsLab bool) *lab {
	t.Helper()
	name := dptest.UniqueName(t)
	nsName := "sl-" + name[len(name)-8:]
	path, err := netns.Create(nsName)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = netns.Delete(nsName) })
	h, err := netns.Handle(path)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		t.Fatal(err)
	}
	for _, a := range []netip.Addr{be1, be2} {
		if err := h.AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(32, 32)}}); err != nil {
			t.Fatal(err)
		}
	}
	for _, a := range []netip.Addr{be1, be2} {
		serve(t, path, a)
	}
	root, err := mounts.Cgroup2Root()
	if err != nil {
		t.Fatal(err)
	}
	cg := filepath.Join(root, "weir-test-"+name)
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.Remove(cg); err != nil {
			t.Errorf("removing cgroup: %v", err)
		}
	})
	dp := dptest.OpenWith(t, datapath.Options{CTMaxEntries: 4096, Cgroup: cg})
	obj := datapath.Object{Module: Name, Cgroup: claims()}
	spec := func() error {
		var err error
		obj.Spec, err = ObjectSpec(s)
		return err
	}
	if nodeIsLab {
		err = netns.Do(path, spec)
	} else {
		err = spec()
	}
	if err != nil {
		t.Fatal(err)
	}
	inst := dptest.Install(t, dp, obj)
	l := &lab{ns: path, cgroup: cg, dp: dp, rec: lbmap.NewFromDatapath(dp, nil), inst: inst}
	l.services(
		service("web", netip.AddrPortFrom(vip, 80), model.TCP, 8080, be1, be2),
		service("dns", netip.AddrPortFrom(dnsVIP, 53), model.UDP, 5353, be1, be2),
		service("empty", netip.AddrPortFrom(emptyIP, 80), model.TCP, 8080),
		service("emptydns", netip.AddrPortFrom(emptyIP, 53), model.UDP, 5353),
	)
	return l
}

func claims() map[string]string {
	out := map[string]string{}
	for _, c := range Factory.Cgroup {
		out[c.Hook] = c.Program
	}
	return out
}

func (l *lab) services(svcs ...*model.Service) {
	if err := l.rec.ApplySnapshot(&model.Snapshot{Services: svcs}); err != nil {
		panic(err)
	}
}

func service(name string, front netip.AddrPort, proto model.Proto, targetPort uint16, bes ...netip.Addr) *model.Service {
	fe := model.Frontend{Addr: front, Proto: proto, Type: model.ClusterIP}
	for _, b := range bes {
		fe.Backends = append(fe.Backends, model.Backend{Addr: netip.AddrPortFrom(b, targetPort)})
	}
	return &model.Service{Name: model.ServiceName{Namespace: "default", Name: name}, Frontends: []model.Frontend{fe}}
}

// serve answers TCP on addr:8080 and UDP on addr:5353 with addr; on
// addr:8081 it answers and keeps the connection open.
func serve(t *testing.T, nsPath string, addr netip.Addr) {
	t.Helper()
	var ln net.Listener
	var pc net.PacketConn
	err := netns.Do(nsPath, func() error {
		var err error
		if ln, err = net.Listen("tcp4", netip.AddrPortFrom(addr, 8080).String()); err != nil {
			return err
		}
		pc, err = net.ListenPacket("udp4", netip.AddrPortFrom(addr, 5353).String())
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	var hold net.Listener
	if err := netns.Do(nsPath, func() error {
		var err error
		hold, err = net.Listen("tcp4", netip.AddrPortFrom(addr, 8081).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var held []net.Conn
	t.Cleanup(func() {
		ln.Close()
		pc.Close()
		hold.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range held {
			c.Close()
		}
		held = nil
	})
	go func() {
		for {
			c, err := hold.Accept()
			if err != nil {
				return
			}
			_, _ = c.Write([]byte(addr.String()))
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = c.Write([]byte(addr.String()))
			c.Close()
		}
	}()
	go func() {
		buf := make([]byte, 512)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo([]byte(addr.String()), from)
		}
	}()
}

func isBackend(reply string) bool { return reply == be1.String() || reply == be2.String() }

func TestTCPConnectGoesToABackend(t *testing.T) {
	l := newLab(t, &Settings{}, false)
	seen := map[string]int{}
	for range 16 {
		r := client(t, l.ns, l.cgroup, "tcp", netip.AddrPortFrom(vip, 80))
		if r.Errno != 0 || !isBackend(r.Reply) {
			t.Fatalf("connect to %s:80: %+v", vip, r)
		}
		if r.Peer != "10.96.0.10:80" {
			t.Fatalf("getpeername returned %s, want the service 10.96.0.10:80", r.Peer)
		}
		seen[r.Reply]++
	}
	if len(seen) != 2 {
		t.Errorf("16 connections went to %v; want both backends (random choice)", seen)
	}
}

func TestUnconnectedUDPRepliesComeFromTheService(t *testing.T) {
	l := newLab(t, &Settings{}, false)
	r := client(t, l.ns, l.cgroup, "udp", netip.AddrPortFrom(dnsVIP, 53))
	if r.Errno != 0 || !isBackend(r.Reply) {
		t.Fatalf("sendto/recvfrom %s:53: %+v", dnsVIP, r)
	}
	if r.From != "10.96.0.53:53" {
		t.Fatalf("recvfrom said the reply came from %s, want the service 10.96.0.53:53", r.From)
	}
}

func TestConnectedUDPSeesTheService(t *testing.T) {
	l := newLab(t, &Settings{}, false)
	r := client(t, l.ns, l.cgroup, "udp-connected", netip.AddrPortFrom(dnsVIP, 53))
	if r.Errno != 0 || !isBackend(r.Reply) {
		t.Fatalf("connected UDP to %s:53: %+v", dnsVIP, r)
	}
	if r.Peer != "10.96.0.53:53" || r.From != "10.96.0.53:53" {
		t.Fatalf("getpeername %s, recvfrom %s; want the service 10.96.0.53:53 for both", r.Peer, r.From)
	}
}

func TestServiceWithoutBackendsRefusesAtOnce(t *testing.T) {
	l := newLab(t, &Settings{}, false)
	r := client(t, l.ns, l.cgroup, "tcp", netip.AddrPortFrom(emptyIP, 80))
	if r.Step != "connect" || syscall.Errno(r.Errno) != NoBackendErrno {
		t.Fatalf("connect to a service without backends: %+v; want connect to fail with %v", r, NoBackendErrno)
	}
	r = client(t, l.ns, l.cgroup, "udp", netip.AddrPortFrom(emptyIP, 53))
	if r.Step != "sendto" || syscall.Errno(r.Errno) != NoBackendErrno {
		t.Fatalf("sendto a UDP service without backends: %+v; want %v", r, NoBackendErrno)
	}
	// UDP to the TCP-only frontend is no service: left untranslated
	// (and unroutable here).
	r = client(t, l.ns, l.cgroup, "udp", netip.AddrPortFrom(emptyIP, 80))
	if r.Step != "sendto" || syscall.Errno(r.Errno) != unix.ENETUNREACH {
		t.Fatalf("sendto the TCP-only frontend over UDP: %+v; want it untranslated (unreachable)", r)
	}
}

func TestBindToAServiceIsRefused(t *testing.T) {
	l := newLab(t, &Settings{}, false)
	r := client(t, l.ns, l.cgroup, "bind", netip.AddrPortFrom(vip, 80))
	if r.Step != "bind" || syscall.Errno(r.Errno) != BindErrno {
		t.Fatalf("bind to %s:80: %+v; want %v", vip, r, BindErrno)
	}
	if r := client(t, l.ns, l.cgroup, "bind", netip.AddrPortFrom(vip, 81)); r.Errno != 0 {
		t.Fatalf("bind to %s:81 (no service there): %+v; want it to succeed", vip, r)
	}
}

// Sockets outside the node's cgroup are not the node's: their connect
// goes to the service address untouched (nothing routes it here).
func TestSocketsOutsideTheCgroupAreLeftAlone(t *testing.T) {
	l := newLab(t, &Settings{}, false)
	r := client(t, l.ns, "", "tcp", netip.AddrPortFrom(vip, 80))
	if r.Step != "connect" || syscall.Errno(r.Errno) != unix.ENETUNREACH {
		t.Fatalf("connect from outside the cgroup: %+v; want the untranslated address to be unreachable", r)
	}
}

func TestHostNamespaceOnly(t *testing.T) {
	t.Run("the node's namespace is translated", func(t *testing.T) {
		l := newLab(t, &Settings{HostNamespaceOnly: true}, true)
		r := client(t, l.ns, l.cgroup, "tcp", netip.AddrPortFrom(vip, 80))
		if r.Errno != 0 || !isBackend(r.Reply) || r.Peer != "10.96.0.10:80" {
			t.Fatalf("connect from the node's namespace under hostNamespaceOnly: %+v; want a backend, the service as peer", r)
		}
	})
	t.Run("other namespaces are not", func(t *testing.T) {
		l := newLab(t, &Settings{HostNamespaceOnly: true}, false)
		r := client(t, l.ns, l.cgroup, "tcp", netip.AddrPortFrom(vip, 80))
		if r.Step != "connect" || syscall.Errno(r.Errno) != unix.ENETUNREACH {
			t.Fatalf("connect from a pod namespace under hostNamespaceOnly: %+v; want it left to per-packet lb (unreachable here)", r)
		}
	})
}

func TestCgroupThatIsNotCgroup2IsRefused(t *testing.T) {
	dp := dptest.OpenWith(t, datapath.Options{CTMaxEntries: 4096, Cgroup: t.TempDir()})
	spec, err := ObjectSpec(&Settings{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = dp.Install([]datapath.Object{{Module: Name, Spec: spec, Cgroup: claims()}})
	if err == nil || !strings.Contains(err.Error(), "is not on a cgroup v2 file system") {
		t.Fatalf("install on a plain directory: %v; want it refused as not cgroup v2", err)
	}
	for _, h := range Factory.Cgroup {
		if prog, err := dp.CgroupAttached(h.Hook); err != nil || prog != "" {
			t.Errorf("%s holds %q (%v) after a refused install", h.Hook, prog, err)
		}
	}
}

// terminator runs socket termination for the lab, as the module does.
func (l *lab) terminator(t *testing.T) {
	t.Helper()
	term := newTerminator(l.cgroup, slog.Default())
	if err := term.load(l.inst.Collections[Name]); err != nil {
		t.Fatal(err)
	}
	l.rec.OnDepartures(term.add)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); term.run(ctx) }()
	t.Cleanup(func() { cancel(); <-done; term.close() })
}

// When a backend leaves its service, connected sockets socket LB sent to
// it end at once (ECONNABORTED), and the client's next connect reaches the
// backend that is left. Unconnected UDP sockets are never destroyed: they
// may talk to anyone.
func TestBackendDepartureEndsItsSockets(t *testing.T) {
	hold := netip.MustParseAddr("10.96.0.20")
	l := newLab(t, &Settings{}, false)
	l.terminator(t)
	both := []*model.Service{
		service("hold", netip.AddrPortFrom(hold, 80), model.TCP, 8081, be1, be2),
		service("dns", netip.AddrPortFrom(dnsVIP, 53), model.UDP, 5353, be1, be2),
	}
	l.services(both...)
	tcpFirst, tcpRest := holdClient(t, l.ns, l.cgroup, "tcp", netip.AddrPortFrom(hold, 80))
	if !isBackend(tcpFirst.Reply) {
		t.Fatalf("held TCP connection: %+v", tcpFirst)
	}
	// A connected UDP socket on the same backend as the TCP one: its
	// per-socket choice may differ, so start clients until one matches.
	var udpConnRest, udpRest func() clientResult
	for i := 0; udpConnRest == nil || udpRest == nil; i++ {
		if i == 40 {
			t.Fatal("40 UDP clients never reached the TCP client's backend")
		}
		mode := "udp-connected"
		if udpConnRest != nil {
			mode = "udp"
		}
		first, rest := holdClient(t, l.ns, l.cgroup, mode, netip.AddrPortFrom(dnsVIP, 53))
		if first.Reply == tcpFirst.Reply {
			if mode == "udp" {
				udpRest = rest
			} else {
				udpConnRest = rest
			}
		}
	}
	left, stays := be1, be2
	if tcpFirst.Reply == be2.String() {
		left, stays = be2, be1
	}
	l.services(
		service("hold", netip.AddrPortFrom(hold, 80), model.TCP, 8081, stays),
		service("dns", netip.AddrPortFrom(dnsVIP, 53), model.UDP, 5353, stays),
	)
	if r := tcpRest(); syscall.Errno(r.Errno) != unix.ECONNABORTED {
		t.Errorf("TCP connection to the departed backend %s: %+v; want it ended with ECONNABORTED", left, r)
	}
	if r := udpConnRest(); syscall.Errno(r.Errno) != unix.ECONNABORTED {
		t.Errorf("connected UDP socket to the departed backend: %+v; want it ended with ECONNABORTED", r)
	}
	if r := udpRest(); syscall.Errno(r.Errno) != unix.EAGAIN {
		t.Errorf("unconnected UDP socket that used the departed backend: %+v; want it left alone (its wait times out)", r)
	}
	if r := client(t, l.ns, l.cgroup, "tcp", netip.AddrPortFrom(hold, 80)); r.Reply != stays.String() {
		t.Errorf("the next connect: %+v; want the backend that stays, %s", r, stays)
	}
}

// answers counts which backends count connects to the frontend reach.
func (l *lab) answers(t *testing.T, front netip.AddrPort, count int) map[string]int {
	t.Helper()
	got := map[string]int{}
	for range count {
		r := client(t, l.ns, l.cgroup, "tcp", front)
		if r.Errno != 0 {
			t.Fatalf("connect to %s: %+v", front, r)
		}
		got[r.Reply]++
	}
	return got
}

// Session affinity, traffic policies and terminating backends choose as
// they do for the per-packet lb: the same maps, the same rules.
func TestPoliciesAsInLB(t *testing.T) {
	front := netip.AddrPortFrom(vip, 80)
	t.Run("session affinity keeps a client on its backend", func(t *testing.T) {
		l := newLab(t, &Settings{}, false)
		s := service("web", front, model.TCP, 8080, be1, be2)
		s.AffinityTimeout = 60
		l.services(s)
		if got := l.answers(t, front, 12); len(got) != 1 {
			t.Fatalf("12 connections with sessionAffinity ClientIP went to %v; want one backend", got)
		}
	})
	t.Run("internal traffic policy Local", func(t *testing.T) {
		l := newLab(t, &Settings{}, false)
		l.rec.SetNode("n1")
		s := service("web", front, model.TCP, 8080, be1, be2)
		s.Frontends[0].InternalLocal = true
		s.Frontends[0].Backends[0].NodeName = "n1"
		s.Frontends[0].Backends[1].NodeName = "n2"
		l.services(s)
		if got := l.answers(t, front, 8); got[be1.String()] != 8 {
			t.Fatalf("internalTrafficPolicy Local: %v; want only the local backend %s", got, be1)
		}
	})
	t.Run("terminating backends take no new connections unless none other serves", func(t *testing.T) {
		l := newLab(t, &Settings{}, false)
		s := service("web", front, model.TCP, 8080, be1, be2)
		s.Frontends[0].Backends[1].State = model.Terminating
		l.services(s)
		if got := l.answers(t, front, 8); got[be1.String()] != 8 {
			t.Fatalf("with %s terminating: %v; want only %s", be2, got, be1)
		}
		s = service("web", front, model.TCP, 8080, be2)
		s.Frontends[0].Backends[0].State = model.Terminating
		l.services(s)
		if got := l.answers(t, front, 4); got[be2.String()] != 4 {
			t.Fatalf("with only %s, terminating: %v; want it to serve", be2, got)
		}
	})
}

// This machine's kernel (6.18) has everything; the probe says so rather
// than the verifier failing on a missing helper later.
func TestProbeFindsWhatSocketLBNeeds(t *testing.T) {
	if err := Probe(); err != nil {
		t.Fatalf("probe on this kernel: %v", err)
	}
}
