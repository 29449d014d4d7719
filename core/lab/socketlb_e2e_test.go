package lab

import (
	"bufio"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/vishvananda/netlink"

	"github.com/weirnet/weir/core/netns"
)

// n1 runs socketlb (its pool), n2 only the per-packet lb; both tunnel,
// or both route natively.
const socketLBConfig = `modules: [endpoints, lb, %s]
datapath: {ctMaxEntries: 65536}
nodePools:
  - name: sockets
    nodeSelector: {matchLabels: {weir.dev/socketlb: "on"}}
    modules: {enable: [socketlb]}
`

const socketLBServices = `services:
  - name: web
    clusterIP: 10.96.0.10
    ports: [{name: http, port: 80, targetPort: 8080}]
    backends: [{ip: 10.244.1.11}, {ip: 10.244.2.11}]
  - name: dns
    clusterIP: 10.96.0.53
    ports: [{name: dns, port: 53, targetPort: 5353, protocol: UDP}]
    backends: [{ip: 10.244.1.11}, {ip: 10.244.2.11}]
  - name: echo
    clusterIP: 10.96.0.90
    ports: [{name: echo, port: 9000, targetPort: 9000}]
    backends: [{ip: 10.244.1.11}, {ip: 10.244.2.11}]
`

func upSocketLB(t *testing.T, forwarding string) *Lab {
	t.Helper()
	for _, tool := range []string{"curl", "dig", "nsenter"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is missing (make deps-test installs it): %v", tool, err)
		}
	}
	cfg := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(socketLBConfig, forwarding)), 0o600); err != nil {
		t.Fatal(err)
	}
	work := Workload{HTTP: 8080, DNS: 5353, Echo: 9000}
	l := up(t, &Spec{
		Name:        newLabName(),
		AgentConfig: cfg,
		Nodes: []NodeSpec{
			{Name: "n1", PodCIDR: "10.244.1.0/24", Labels: map[string]string{"weir.dev/socketlb": "on"}, Pods: []PodSpec{
				{Name: "client", IP: "10.244.1.10"},
				{Name: "web-1", IP: "10.244.1.11", Serve: work}}},
			{Name: "n2", PodCIDR: "10.244.2.0/24", Pods: []PodSpec{
				{Name: "client-2", IP: "10.244.2.10"},
				{Name: "web-2", IP: "10.244.2.11", Serve: work}}},
		},
	})
	apply(t, l, socketLBServices, 3)
	waitFor(t, 10*time.Second, "services on n2", func() bool { return len(serviceRows(t, l.Nodes[1])) == 3 })
	return l
}

// podCgroup is where a node's pod processes live (the lab's kubelet and
// workloads put them there).
func podCgroup(n *Node) string { return filepath.Join(n.Cgroup, "pods") }

// curlAll runs curl count times from the namespace and cgroup and counts
// the backends that answered.
func curlAll(t *testing.T, nsPath, cgroup, url string, count int) map[string]int {
	t.Helper()
	got := map[string]int{}
	for range count {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		out, err := Exec(ctx, nsPath, cgroup, "curl", "-sS", "--max-time", "3", url)
		cancel()
		if err != nil {
			t.Fatalf("curl %s: %v", url, err)
		}
		got[strings.TrimSpace(out)]++
	}
	return got
}

// digTXT asks the service's name server with dig and returns its answer.
// dig itself checks that the reply came from the address it asked: a
// reply from the backend's address is "reply from unexpected source".
func digTXT(t *testing.T, nsPath, cgroup, server string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := Exec(ctx, nsPath, cgroup, "dig", "+tries=1", "+time=3", "@"+server, "-p", "53", "who.lab.test", "TXT")
	if err != nil {
		t.Fatalf("dig @%s: %v\n%s", server, err, out)
	}
	if strings.Contains(out, "unexpected source") {
		t.Fatalf("dig saw the reply come from another address than the service's:\n%s", out)
	}
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) == 5 && f[3] == "TXT" && strings.HasPrefix(line, "who.lab.test.") {
			if !strings.Contains(out, "SERVER: "+server+"#53") {
				t.Fatalf("dig's answer does not say it came from %s#53:\n%s", server, out)
			}
			return strings.Trim(f[4], `"`)
		}
	}
	t.Fatalf("dig @%s got no TXT answer:\n%s", server, out)
	return ""
}

func TestSocketLB(t *testing.T) {
	for _, fwd := range []string{"tunnel", "nativerouting"} {
		t.Run(fwd, func(t *testing.T) { testSocketLB(t, fwd) })
	}
}

func testSocketLB(t *testing.T, forwarding string) {
	l := upSocketLB(t, forwarding)
	n1, n2 := l.Node("n1"), l.Node("n2")
	client, client2 := l.Pod("client"), l.Pod("client-2")
	backends := map[string]bool{"web-1": true, "web-2": true}

	t.Run("TCP from a pod reaches local and remote backends", func(t *testing.T) {
		got := curlAll(t, client.NetnsPath(), podCgroup(n1), "http://10.96.0.10/", 16)
		if got["web-1"] == 0 || got["web-2"] == 0 || got["web-1"]+got["web-2"] != 16 {
			t.Fatalf("answers %v; want both backends and nothing else", got)
		}
	})
	t.Run("TCP from the node's own namespace, to local and remote backends", func(t *testing.T) {
		got := curlAll(t, n1.NetnsPath(), n1.Cgroup, "http://10.96.0.10/", 16)
		if got["web-1"] == 0 || got["web-2"] == 0 || got["web-1"]+got["web-2"] != 16 {
			t.Fatalf("answers %v; want both backends and nothing else", got)
		}
	})
	t.Run("dig through a ClusterIP from a pod and from the node", func(t *testing.T) {
		seen := map[string]bool{}
		for range 8 {
			seen[digTXT(t, client.NetnsPath(), podCgroup(n1), "10.96.0.53")] = true
			seen[digTXT(t, n1.NetnsPath(), n1.Cgroup, "10.96.0.53")] = true
		}
		for who := range seen {
			if !backends[who] {
				t.Fatalf("dig answered by %q", who)
			}
		}
	})
	t.Run("a node with only per-packet lb serves the same services", func(t *testing.T) {
		got := curlAll(t, client2.NetnsPath(), podCgroup(n2), "http://10.96.0.10/", 8)
		if got["web-1"]+got["web-2"] != 8 {
			t.Fatalf("answers %v", got)
		}
		if who := digTXT(t, client2.NetnsPath(), podCgroup(n2), "10.96.0.53"); !backends[who] {
			t.Fatalf("dig answered by %q", who)
		}
		// As before socketlb: the node's own traffic is not translated
		// there (nothing routes the ClusterIP).
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if out, err := Exec(ctx, n2.NetnsPath(), n2.Cgroup, "curl", "-sS", "--max-time", "2", "http://10.96.0.10/"); err == nil {
			t.Fatalf("curl from n2's own namespace reached %q without socketlb", out)
		}
	})
	t.Run("weir status names the socket hooks", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		st, err := n1.Client().Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.Cgroup != n1.Cgroup || st.CgroupHooks["cgroup/connect4"] != "sock4_connect" || st.CgroupHooks["cgroup/getpeername4"] != "sock4_getpeername" || len(st.CgroupHooks) != 5 {
			t.Fatalf("n1 status: cgroup %q, hooks %v", st.Cgroup, st.CgroupHooks)
		}
		st2, err := n2.Client().Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(st2.CgroupHooks) != 0 {
			t.Fatalf("n2 runs no socketlb, yet its status says %v", st2.CgroupHooks)
		}
	})
	t.Run("socket LB runs on while the agent is down and across its restart", func(t *testing.T) {
		if err := l.StopAgent("n1"); err != nil {
			t.Fatal(err)
		}
		got := curlAll(t, client.NetnsPath(), podCgroup(n1), "http://10.96.0.10/", 6)
		if got["web-1"]+got["web-2"] != 6 {
			t.Fatalf("with the agent down: %v", got)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := l.StartAgent(ctx, "n1"); err != nil {
			t.Fatal(err)
		}
		got = curlAll(t, n1.NetnsPath(), n1.Cgroup, "http://10.96.0.10/", 6)
		if got["web-1"]+got["web-2"] != 6 {
			t.Fatalf("after the restart: %v", got)
		}
	})
	t.Run("socket-translated flows never carry the ClusterIP on the wire", func(t *testing.T) {
		vips := []netip.Addr{netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("10.96.0.53")}
		onWire := func(n *Node, p *Pod) (carrying, total int) {
			frames := captureOn(t, n.NetnsPath(), hostVeth(t, n, p), func() {
				curlAll(t, p.NetnsPath(), podCgroup(n), "http://10.96.0.10/", 4)
				digTXT(t, p.NetnsPath(), podCgroup(n), "10.96.0.53")
			})
			for _, f := range frames {
				ip, _ := gopacket.NewPacket(f, layers.LayerTypeEthernet, gopacket.Default).Layer(layers.LayerTypeIPv4).(*layers.IPv4)
				if ip == nil {
					continue
				}
				total++
				src, _ := netip.AddrFromSlice(ip.SrcIP)
				dst, _ := netip.AddrFromSlice(ip.DstIP)
				for _, v := range vips {
					if src == v || dst == v {
						carrying++
						break
					}
				}
			}
			return carrying, total
		}
		if c, n := onWire(n1, client); n == 0 || c != 0 {
			t.Errorf("socketlb node: %d of %d packets on the pod's veth carry a ClusterIP; want none (and some packets)", c, n)
		}
		// The control: per-packet lb translates after the veth.
		if c, n := onWire(n2, client2); c == 0 {
			t.Errorf("lb-only node: none of %d packets on the pod's veth carry a ClusterIP; the capture cannot tell", n)
		}
	})
}

// A backend that leaves the service ends the connections socket LB sent
// to it (through the agent: reconciler, module, socket iterators), and
// the client's next connect reaches the backend that is left.
func TestSocketLBBackendDepartureEndsConnections(t *testing.T) {
	l := upSocketLB(t, "tunnel")
	n1, client := l.Node("n1"), l.Pod("client")
	dir, err := os.Open(podCgroup(n1))
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	// bash connects with connect(): one line through the echo service,
	// then it waits for the next line, which never comes, or for the end.
	script := `exec 3<>/dev/tcp/10.96.0.90/9000 || exit 2; echo hello >&3; read -r line <&3; echo "$line"; read -r line <&3; echo "end $?"`
	cmd := exec.Command("nsenter", "--net="+client.NetnsPath(), "--", "bash", "-c", script)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	lines := make(chan string, 2)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	var first string
	select {
	case first = <-lines:
	case <-time.After(10 * time.Second):
		t.Fatal("no answer through the echo service")
	}
	who, _, _ := strings.Cut(first, ":")
	stays := map[string]string{"web-1": "10.244.2.11", "web-2": "10.244.1.11"}[who]
	if stays == "" {
		t.Fatalf("the echo service answered %q", first)
	}
	services := socketLBServices[:strings.Index(socketLBServices, "  - name: echo")] +
		"  - name: echo\n    clusterIP: 10.96.0.90\n    ports: [{name: echo, port: 9000, targetPort: 9000}]\n    backends: [{ip: " + stays + "}]\n"
	start := time.Now()
	for _, n := range l.Nodes {
		if err := l.Apply(n.Name, []byte(services)); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case end := <-lines:
		if end != "end 1" {
			t.Fatalf("after %s left: %q; want the read to fail", who, end)
		}
		t.Logf("the connection to %s ended %s after the services file changed", who, time.Since(start).Round(time.Millisecond))
	case <-time.After(10 * time.Second):
		t.Fatalf("the connection to %s, which left the service, still stands after 10 s", who)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	next, err := Exec(ctx, client.NetnsPath(), podCgroup(n1), "bash", "-c", `exec 3<>/dev/tcp/10.96.0.90/9000 && echo again >&3 && read -r line <&3 && echo "$line"`)
	if err != nil || strings.HasPrefix(next, who+":") || !strings.Contains(next, ": again") {
		t.Fatalf("the next connection: %q %v; want the backend that stayed", next, err)
	}
}

// hostVeth is the name of the node side of a pod's veth.
func hostVeth(t *testing.T, n *Node, p *Pod) string {
	t.Helper()
	var peer int
	if err := netns.Do(p.NetnsPath(), func() error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		peer = l.Attrs().ParentIndex
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	var name string
	if err := netns.Do(n.NetnsPath(), func() error {
		l, err := netlink.LinkByIndex(peer)
		if err != nil {
			return err
		}
		name = l.Attrs().Name
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return name
}
