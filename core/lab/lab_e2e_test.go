package lab

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/weirnet/weir/core/api"
	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/mounts"
	"github.com/weirnet/weir/core/netns"
	"github.com/weirnet/weir/core/proc"
)

// Binaries built once for the package's tests.
var bin struct {
	agent, weir string
	// ratelimit is the example plugin (plugins/ratelimit).
	ratelimit string
}

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "weir-lab-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin.agent = filepath.Join(dir, "weir-agent")
	bin.weir = filepath.Join(dir, "weir")
	bin.ratelimit = filepath.Join(dir, "ratelimit")
	for out, pkg := range map[string]string{bin.agent: "../../cmd/agent", bin.weir: "../../cmd/weir", filepath.Join(dir, "weir-cni"): "../../cmd/weir-cni",
		bin.ratelimit: "../../plugins/ratelimit"} {
		cmd := exec.Command("go", "build", "-o", out, pkg)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "building", pkg, err)
			os.RemoveAll(dir)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

const (
	testStateRoot = "/run/weir/lab-test"
	testPinRoot   = mounts.DefaultBPFFS + "/weir-lab-test"
)

func newLabName() string {
	var b [3]byte
	_, _ = rand.Read(b[:])
	return "t" + hex.EncodeToString(b[:])
}

var backendWork = Workload{HTTP: 8080, UDP: 5353, Echo: 9000}

// oneNode is the demo topology: a client and three backends on one node.
func oneNode() *Spec {
	return &Spec{
		Name: newLabName(),
		Nodes: []NodeSpec{{
			Name: "n1", PodCIDR: "10.244.1.0/24",
			Pods: []PodSpec{
				{Name: "client", IP: "10.244.1.10"},
				{Name: "backend-1", IP: "10.244.1.11", Serve: backendWork},
				{Name: "backend-2", IP: "10.244.1.12", Serve: backendWork},
				{Name: "backend-3", IP: "10.244.1.13", Serve: backendWork},
			},
		}},
	}
}

const webServices = `services:
  - name: web
    clusterIP: 10.96.0.10
    ports:
      - {name: http, port: 80, targetPort: 8080}
      - {name: echo, port: 9000}
    backends: [{ip: 10.244.1.11}, {ip: 10.244.1.12}, {ip: 10.244.1.13}]
  - name: dns
    clusterIP: 10.96.0.53
    ports:
      - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
    backends: [{ip: 10.244.1.11}, {ip: 10.244.1.12}, {ip: 10.244.1.13}]
`

// up brings a lab up with in-process workloads and removes it when the test
// ends, checking that nothing it made is left behind.
func up(t testing.TB, spec *Spec) *Lab {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l, err := Up(ctx, spec, Options{AgentBinary: bin.agent, StateRoot: testStateRoot, PinRoot: testPinRoot})
	if err != nil {
		t.Fatalf("lab up: %v", err)
	}
	var servers []*Servers
	t.Cleanup(func() {
		for _, s := range servers {
			s.Close()
		}
		if t.Failed() {
			for _, n := range l.Nodes {
				t.Logf("agent log of %s:\n%s", n.Name, proc.Tail(n.Log, 40))
			}
		}
		if err := l.Down(); err != nil {
			t.Errorf("lab down: %v", err)
		}
		assertGone(t, l)
	})
	for _, n := range l.Nodes {
		for _, p := range n.Pods {
			if p.Serve.Empty() {
				continue
			}
			s, err := Serve(p.Name, p.NetnsPath(), p.Serve)
			if err != nil {
				t.Fatal(err)
			}
			servers = append(servers, s)
		}
	}
	for _, e := range l.Externals {
		if e.Serve.Empty() {
			continue
		}
		s, err := Serve(e.Name, e.NetnsPath(), e.Serve)
		if err != nil {
			t.Fatal(err)
		}
		servers = append(servers, s)
	}
	return l
}

// assertGone checks that a lab left no namespace, pin, cgroup, state or
// process behind.
func assertGone(t testing.TB, l *Lab) {
	t.Helper()
	entries, _ := os.ReadDir(netns.Dir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), l.Spec.Name+"-") {
			t.Errorf("namespace %s left behind", e.Name())
		}
	}
	for _, p := range []string{l.Dir, l.Cgroup, filepath.Join(testPinRoot, l.Spec.Name)} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s left behind (%v)", p, err)
		}
	}
	for _, n := range l.Nodes {
		if proc.Alive(n.AgentPID) {
			t.Errorf("agent of %s (pid %d) still running", n.Name, n.AgentPID)
		}
	}
}

// apply writes services to every node and waits until the first node's
// maps show want frontends.
func apply(t *testing.T, l *Lab, services string, want int) {
	t.Helper()
	for _, n := range l.Nodes {
		if err := l.Apply(n.Name, []byte(services)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 10*time.Second, fmt.Sprintf("%d frontends in the maps", want), func() bool {
		return len(serviceRows(t, l.Nodes[0])) == want
	})
}

func serviceRows(t testing.TB, n *Node) []datapath.ServiceRow {
	t.Helper()
	p, err := datapath.OpenPinned(n.PinDir)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	rows, err := p.Services()
	if err != nil {
		t.Fatal(err)
	}
	return rows
}

func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// get sends n HTTP requests, each on a new connection, and counts the
// answering backends.
func get(t *testing.T, p *Pod, url string, n int) map[string]int {
	t.Helper()
	c := HTTPClient(p.NetnsPath(), 5*time.Second)
	out := map[string]int{}
	for i := range n {
		who, err := Get(context.Background(), c, url)
		if err != nil {
			t.Fatalf("request %d to %s: %v", i+1, url, err)
		}
		out[who]++
	}
	return out
}

func TestClusterIPServesEveryBackend(t *testing.T) {
	l := up(t, oneNode())
	apply(t, l, webServices, 3)
	client := l.Pod("client")

	got := get(t, client, "http://10.96.0.10/", 500)
	if len(got) != 3 {
		t.Fatalf("500 requests reached %v, want all three backends", got)
	}
	for who, n := range got {
		// Expected ~167 each; below 100 means the choice is not uniform.
		if n < 100 {
			t.Errorf("backend %s answered %d of 500: %v", who, n, got)
		}
	}

	seen := map[string]bool{}
	for i := range 30 {
		ans, err := UDPAsk(context.Background(), client.NetnsPath(), "10.96.0.53:53", fmt.Sprintf("q%d", i), 2*time.Second)
		if err != nil {
			t.Fatalf("UDP request %d: %v", i, err)
		}
		who, msg, _ := strings.Cut(ans, ": ")
		if msg != fmt.Sprintf("q%d", i) || !strings.HasPrefix(who, "backend-") {
			t.Fatalf("UDP answer %q", ans)
		}
		seen[who] = true
	}
	if len(seen) < 2 {
		t.Errorf("30 UDP flows all went to %v", seen)
	}
}

func TestBackendAndServiceRemoval(t *testing.T) {
	l := up(t, oneNode())
	apply(t, l, webServices, 3)
	client := l.Pod("client")
	get(t, client, "http://10.96.0.10/", 20)

	withoutTwo := strings.Replace(webServices, "[{ip: 10.244.1.11}, {ip: 10.244.1.12}, {ip: 10.244.1.13}]\n  - name: dns", "[{ip: 10.244.1.11}, {ip: 10.244.1.13}]\n  - name: dns", 1)
	apply(t, l, withoutTwo, 3)
	waitFor(t, 5*time.Second, "web to have two backends", func() bool { return len(serviceRows(t, l.Nodes[0])[0].Backends) == 2 })
	got := get(t, client, "http://10.96.0.10/", 200)
	if got["backend-2"] != 0 || got["backend-1"] == 0 || got["backend-3"] == 0 {
		t.Fatalf("after removing backend-2: %v", got)
	}

	onlyDNS := webServices[strings.Index(webServices, "  - name: dns"):]
	apply(t, l, "services:\n"+onlyDNS, 1)
	c := HTTPClient(client.NetnsPath(), 2*time.Second)
	if who, err := Get(context.Background(), c, "http://10.96.0.10/"); err == nil {
		t.Fatalf("deleted service still answered (by %s)", who)
	}
	if _, err := UDPAsk(context.Background(), client.NetnsPath(), "10.96.0.53:53", "still", 2*time.Second); err != nil {
		t.Fatalf("the remaining service stopped answering: %v", err)
	}
}

// The datapath forwards while the agent is down, and a restarted agent
// takes over the same maps: an established connection keeps its backend.
func TestAgentRestartKeepsEstablishedConnection(t *testing.T) {
	l := up(t, oneNode())
	apply(t, l, webServices, 3)
	client := l.Pod("client")
	before := serviceRows(t, l.Nodes[0])

	conn, err := Dial(context.Background(), client.NetnsPath(), "tcp4", "10.96.0.10:9000")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rd := bufio.NewReader(conn)
	var backend string
	say := func(line string) {
		t.Helper()
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := fmt.Fprintln(conn, line); err != nil {
			t.Fatalf("writing %q: %v", line, err)
		}
		ans, err := rd.ReadString('\n')
		if err != nil {
			t.Fatalf("reading answer to %q: %v", line, err)
		}
		who, echoed, _ := strings.Cut(strings.TrimSpace(ans), ": ")
		if echoed != line {
			t.Fatalf("answer %q to %q", ans, line)
		}
		if backend == "" {
			backend = who
		} else if who != backend {
			t.Fatalf("connection moved from %s to %s", backend, who)
		}
	}
	say("before")
	if err := l.StopAgent("n1"); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		say(fmt.Sprintf("agent down %d", i))
	}
	// New connections work without the agent too.
	get(t, client, "http://10.96.0.10/", 10)
	if err := l.StartAgent(context.Background(), "n1"); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		say(fmt.Sprintf("agent back %d", i))
	}
	get(t, client, "http://10.96.0.10/", 30)

	after := serviceRows(t, l.Nodes[0])
	if fmt.Sprint(before) != fmt.Sprint(after) {
		t.Fatalf("services changed across the restart:\nbefore %v\nafter  %v", before, after)
	}
}

// A services file with any error is rejected whole: the services already
// in the datapath keep serving, and the agent logs what is wrong, where.
func TestBadServicesFileKeepsServing(t *testing.T) {
	l := up(t, oneNode())
	apply(t, l, webServices, 3)
	client := l.Pod("client")
	cases := []struct {
		name, file, logged string
	}{
		{"malformed YAML", "services: [\n  - name: web\n", "not valid YAML"},
		{"port 0", strings.Replace(webServices, "port: 80,", "port: 0,", 1), "services[0].ports[0].port: 0 is not a valid port (1 to 65535)"},
		{"port beyond 65535", strings.Replace(webServices, "port: 80,", "port: 70000,", 1), "services[0].ports[0].port: 70000 is not a valid port (1 to 65535)"},
		{"bad address", strings.Replace(webServices, "10.96.0.53", "10.96.0.300", 1), `services[1].clusterIP: "10.96.0.300" is not an IPv4 address`},
		{"duplicate frontend", webServices + "  - name: web2\n    clusterIP: 10.96.0.10\n    ports: [{port: 80}]\n    backends: [{ip: 10.244.1.11}]\n", "frontend 10.96.0.10:80/TCP is already used by services[0].ports[0] (default/web)"},
		// A valid new service next to a broken one: neither is applied.
		{"half valid", webServices + "  - name: extra\n    clusterIP: 10.96.0.77\n    ports: [{port: 80}]\n    backends: [{ip: 10.244.1.11}]\n  - name: broken\n    clusterIP: 10.96.0.78\n    ports: [{port: 80}]\n    backends: [{ip: 10.244.1.300}]\n", `services[3].backends[0].ip: "10.244.1.300" is not an IPv4 address`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if err := l.Apply("n1", []byte(c.file)); err != nil {
				t.Fatal(err)
			}
			waitFor(t, 10*time.Second, "the agent to log the rejection", func() bool {
				data, _ := os.ReadFile(l.Nodes[0].Log)
				// slog quotes the error value, escaping its quotes.
				return strings.Contains(strings.ReplaceAll(string(data), `\"`, `"`), c.logged)
			})
			rows := serviceRows(t, l.Nodes[0])
			if len(rows) != 3 {
				t.Fatalf("maps hold %d frontends after a rejected file, want the previous 3: %v", len(rows), rows)
			}
			if got := get(t, client, "http://10.96.0.10/", 10); len(got) == 0 {
				t.Fatal("service stopped answering")
			}
		})
	}
	// Once fixed, the file applies.
	apply(t, l, webServices+"  - name: extra\n    clusterIP: 10.96.0.77\n    ports: [{port: 80, targetPort: 8080}]\n    backends: [{ip: 10.244.1.11}]\n", 4)
	if got := get(t, client, "http://10.96.0.77/", 3); got["backend-1"] != 3 {
		t.Fatalf("fixed file's new service answered %v", got)
	}
}

// Frames the kernel's test runner would refuse, sent for real from a pod:
// the entry program drops them with their reason counted.
func TestTruncatedFramesFromAPodAreCounted(t *testing.T) {
	l := up(t, oneNode())
	client := l.Pod("client")
	node := l.Nodes[0]
	counted := func(reason datapath.Reason) uint64 { return metric(t, node, "pod-egress", reason) }
	frame := func(payload []byte) []byte {
		f := make([]byte, 14, 14+len(payload))
		copy(f[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
		binary.BigEndian.PutUint16(f[12:], unix.ETH_P_IP)
		return append(f, payload...)
	}
	cases := []struct {
		name   string
		frame  []byte
		reason datapath.Reason
	}{
		{"Ethernet header only", frame(nil), datapath.DropIPTruncated},
		{"12 bytes of IPv4 header", frame([]byte{0x45, 0, 0, 12, 0, 0, 0, 0, 64, 6, 0, 0}), datapath.DropIPTruncated},
	}
	for _, c := range cases {
		before := counted(c.reason)
		if err := sendRaw(client.NetnsPath(), "eth0", c.frame); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 5*time.Second, c.name+" counted as "+c.reason.String(), func() bool { return counted(c.reason) == before+1 })
	}
}

func sendRaw(nsPath, ifname string, frame []byte) error {
	return netns.Do(nsPath, func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Sendto(fd, frame, 0, &unix.SockaddrLinklayer{Ifindex: ifi.Index, Halen: 6, Addr: [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}})
	})
}

// The CLI reads a node's pinned maps, with the agent running or not.
func TestCLIReadsPinnedMaps(t *testing.T) {
	l := up(t, oneNode())
	apply(t, l, webServices, 3)
	get(t, l.Pod("client"), "http://10.96.0.10/", 5)
	if err := l.StopAgent("n1"); err != nil {
		t.Fatal(err)
	}
	pin := l.Nodes[0].PinDir
	run := func(args ...string) []byte {
		t.Helper()
		out, err := exec.Command(bin.weir, append(args, "--pin-dir", pin, "-o", "json")...).CombinedOutput()
		if err != nil {
			t.Fatalf("weir %v: %v\n%s", args, err, out)
		}
		return out
	}
	var svcs []datapath.ServiceRow
	if err := json.Unmarshal(run("service", "list"), &svcs); err != nil {
		t.Fatal(err)
	}
	if len(svcs) != 3 || svcs[0].Frontend.String() != "10.96.0.10:80" || len(svcs[0].Backends) != 3 {
		t.Fatalf("service list: %+v", svcs)
	}
	var ct []datapath.CTRow
	if err := json.Unmarshal(run("bpf", "ct", "list"), &ct); err != nil {
		t.Fatal(err)
	}
	kinds := map[string]int{}
	for _, r := range ct {
		if r.Dst.Addr().String() == "10.96.0.10" && r.NatDst.Port() == 8080 || r.Src.Port() == 8080 && r.NatSrc.String() == "10.96.0.10:80" {
			kinds[r.Dir]++
		}
	}
	if kinds["orig"] < 5 || kinds["reply"] < 5 {
		t.Fatalf("conntrack of 5 connections: %v in %+v", kinds, ct)
	}
	var lb []datapath.LBEntry
	if err := json.Unmarshal(run("bpf", "lb", "list"), &lb); err != nil {
		t.Fatal(err)
	}
	if len(lb) != 3+9 {
		t.Fatalf("bpf lb list has %d entries, want 3 masters + 9 slots", len(lb))
	}
	if out, err := exec.Command(bin.weir, "service", "list", "--pin-dir", "/nonexistent").CombinedOutput(); err == nil || !strings.Contains(string(out), "holds no Weir datapath") {
		t.Fatalf("reading a missing pin dir: %v %s", err, out)
	}
}

// The endpoint API the CNI plugin uses: bad requests get a clear 400,
// conflicts a 409, repeats are idempotent, and a pod wired through it is
// served and then cleanly unwired.
func TestEndpointAPI(t *testing.T) {
	l := up(t, oneNode())
	apply(t, l, webServices, 3)
	n := l.Nodes[0]
	c := n.Client()
	ctx := context.Background()
	nsName := l.Spec.Name + "-extra"
	path, err := netns.Create(nsName)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = netns.Delete(nsName) })

	bad := []struct {
		req  api.EndpointRequest
		code int
		msg  string
	}{
		{api.EndpointRequest{ID: "bad id!", Netns: path, Address: "10.244.1.50"}, 400, `id "bad id!" is invalid`},
		{api.EndpointRequest{ID: "x1", Netns: "/nonexistent/ns", Address: "10.244.1.50"}, 400, `netns "/nonexistent/ns"`},
		{api.EndpointRequest{ID: "x1", Netns: "/tmp", Address: "10.244.1.50"}, 400, `netns "/tmp" is not a network namespace`},
		{api.EndpointRequest{ID: "x1", Netns: path, Address: "fd00::1"}, 400, `address "fd00::1" is not an IPv4 address`},
		{api.EndpointRequest{ID: "x1", Netns: path, Address: "169.254.1.1"}, 400, "cannot be a pod address"},
		{api.EndpointRequest{ID: "x1", Netns: path, Address: "10.244.1.50", IfName: "a/b"}, 400, `ifName "a/b" is not a valid interface name`},
		{api.EndpointRequest{ID: "x1", Netns: path, Address: "10.244.1.10"}, 409, "address 10.244.1.10 is already used by endpoint " + l.Pod("client").ID},
	}
	for _, b := range bad {
		_, err := c.CreateEndpoint(ctx, b.req)
		var se *api.StatusError
		if !errors.As(err, &se) || se.Code != b.code || !strings.Contains(se.Msg, b.msg) {
			t.Errorf("request %+v: got %v, want HTTP %d with %q", b.req, err, b.code, b.msg)
		}
	}

	req := api.EndpointRequest{ID: "extra-pod", Netns: path, Address: "10.244.1.50", PodNamespace: "default", PodName: "extra"}
	ep, err := c.CreateEndpoint(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	again, err := c.CreateEndpoint(ctx, req)
	if err != nil || *again != *ep {
		t.Fatalf("repeated request: %v %+v, want %+v", err, again, ep)
	}
	other := req
	other.Address = "10.244.1.51"
	if _, err := c.CreateEndpoint(ctx, other); err == nil || !strings.Contains(err.Error(), "exists with address 10.244.1.50") {
		t.Fatalf("same ID, other address: %v", err)
	}
	extra := &Pod{Name: "extra", Netns: nsName}
	if got := get(t, extra, "http://10.96.0.10/", 20); len(got) < 2 {
		t.Fatalf("pod wired through the API reached %v", got)
	}

	h, err := netns.Handle(n.NetnsPath())
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if _, err := h.LinkByName(ep.HostIfName); err != nil {
		t.Fatalf("host interface %s of the new endpoint: %v", ep.HostIfName, err)
	}
	if err := c.DeleteEndpoint(ctx, "extra-pod"); err != nil {
		t.Fatal(err)
	}
	if err := c.DeleteEndpoint(ctx, "extra-pod"); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	if _, err := h.LinkByName(ep.HostIfName); err == nil {
		t.Fatalf("host interface %s survived the delete", ep.HostIfName)
	}
	p, err := datapath.OpenPinned(n.PinDir)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	eps, err := p.Endpoints()
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range eps {
		if e.Addr.String() == "10.244.1.50" {
			t.Fatal("endpoint map entry survived the delete")
		}
	}
	if len(eps) != 4 {
		t.Fatalf("endpoint map has %d entries, want the lab's 4", len(eps))
	}
}

// Editing the agent's configuration file applies it: a file with errors is
// rejected and the agent keeps running; a valid change that alters this
// node's settings is applied in the running agent, and established
// connections survive.
func TestConfigFileChangeAppliesLive(t *testing.T) {
	spec := oneNode()
	spec.Nodes[0].Labels = map[string]string{"rack": "r1"}
	l := up(t, spec)
	apply(t, l, webServices, 3)
	n := l.Nodes[0]
	ctx := context.Background()
	conn := echoConn(t, l.Pod("client"), "10.96.0.10")
	defer conn.close()
	conn.say("before")

	if err := os.WriteFile(n.Config, []byte("modules: [endpoints, lb]\nsettings: {endpoints: {mtu: 70000}}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the agent to reject the file", func() bool {
		return strings.Contains(proc.Tail(n.Log, 20), "settings.endpoints.mtu: 70000 is out of range (576 to 65535, or 0 for the uplink's MTU minus tunnel overhead)")
	})
	if st, err := n.Client().Status(ctx); err != nil || !st.Ready || st.Pool != "" {
		t.Fatalf("agent after a rejected file: %+v %v", st, err)
	}

	cfg := "modules: [endpoints, lb]\ndatapath: {ctMaxEntries: 65536}\nnodePools:\n  - name: rack1\n    nodeSelector: {matchLabels: {rack: r1}}\n    settings: {endpoints: {mtu: 1400}}\n"
	if err := os.WriteFile(n.Config, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the agent to run pool rack1", func() bool {
		st, err := n.Client().Status(ctx)
		return err == nil && st.Ready && st.Pool == "rack1"
	})
	conn.say("after")
	// Another pool, same datapath section: applied in the running agent.
	if log := proc.Tail(n.Log, 60); !strings.Contains(log, "changed; applying the new module set live") || !strings.Contains(log, "module set applied live") {
		t.Fatalf("the change was not applied live:\n%s", proc.Tail(n.Log, 30))
	}
	// New pods get the pool's MTU.
	nsName := l.Spec.Name + "-extra"
	path, err := netns.Create(nsName)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = netns.Delete(nsName) })
	ep, err := n.Client().CreateEndpoint(ctx, api.EndpointRequest{ID: "extra", Netns: path, Address: "10.244.1.60"})
	if err != nil || ep.MTU != 1400 || linkMTU(t, path, "eth0") != 1400 {
		t.Fatalf("endpoint in pool rack1: %+v %v", ep, err)
	}
}

// Changing datapath.ctMaxEntries under live connections: the agent
// restarts into a conntrack map of the new size, carrying the entries
// over, and the connection keeps its backend (and replies their
// frontend) throughout.
func TestCTMaxEntriesChangeUnderALiveConnection(t *testing.T) {
	l := up(t, oneNode())
	apply(t, l, webServices, 3)
	n := l.Nodes[0]
	conn := echoConn(t, l.Pod("client"), "10.96.0.10")
	defer conn.close()
	conn.say("before")
	ctMax := func() uint32 {
		m, err := ebpf.LoadPinnedMap(filepath.Join(n.PinDir, datapath.MapCT), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			return 0
		}
		defer m.Close()
		info, err := m.Info()
		if err != nil {
			return 0
		}
		return info.MaxEntries
	}
	if got := ctMax(); got != 65536 {
		t.Fatalf("conntrack holds %d entries before the change, want 65536", got)
	}
	for _, size := range []uint32{131072, 16384} {
		cfg := fmt.Sprintf("modules: [endpoints, lb]\ndatapath: {ctMaxEntries: %d}\n", size)
		if err := os.WriteFile(n.Config, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 30*time.Second, fmt.Sprintf("conntrack to hold %d entries", size), func() bool {
			st, err := n.Client().Status(context.Background())
			return ctMax() == size && err == nil && st.Ready
		})
		for i := range 5 {
			conn.say(fmt.Sprintf("after %d, line %d", size, i))
		}
		if !strings.Contains(proc.Tail(n.Log, 80), "map carried over") {
			t.Fatalf("no carry-over logged:\n%s", proc.Tail(n.Log, 30))
		}
		// New connections too.
		get(t, l.Pod("client"), "http://10.96.0.10/", 20)
	}
}

// Agents the lab starts are standalone by flag: a lab run inside a pod
// (where the environment names a Kubernetes API) does not turn them to it.
func TestLabAgentsIgnoreAnInClusterEnvironment(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
	t.Setenv("KUBERNETES_SERVICE_PORT", "443")
	l := up(t, oneNode())
	apply(t, l, webServices, 3)
	get(t, l.Pod("client"), "http://10.96.0.10/", 10)
}
