package lab

import (
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// liveConfigs are the module sets the live test moves between: socket LB
// on and off, tunnel and native routing, the ratelimit plugin on and off
// (its limit high enough to let the test's clients through).
func liveConfigs() [][]string {
	return [][]string{
		{"endpoints", "lb", "tunnel"},
		{"endpoints", "lb", "socketlb", "tunnel"},
		{"endpoints", "lb", "nativerouting"},
		{"endpoints", "lb", "nativerouting", "ratelimit"},
		{"endpoints", "lb", "ratelimit", "socketlb", "tunnel"},
	}
}

func writeLiveConfig(t *testing.T, path string, modules []string) {
	t.Helper()
	data, err := os.ReadFile(bin.ratelimit)
	if err != nil {
		t.Fatal(err)
	}
	doc := fmt.Sprintf(`modules: [%s]
plugins:
  - {name: ratelimit, path: %s, sha256: %x}
settings:
  tunnel: {protocol: vxlan}
  ratelimit:
    limits: [{frontend: "10.96.0.10:80", rate: 100000, burst: 100000}]
`, strings.Join(modules, ", "), bin.ratelimit, sha256.Sum256(data))
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// Module sets change in the running agents, ten times, while a client
// opens connections through a ClusterIP as fast as it can and a
// long-lived stream talks through another: every connection succeeds,
// the stream is never reset, each change is applied live (no agent
// restarts), and each node's status shows the new set.
func TestModuleSetChangesApplyLive(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "agent.yaml")
	sets := liveConfigs()
	writeLiveConfig(t, cfg, sets[0])
	spec := &Spec{
		Name: newLabName(),
		Nodes: []NodeSpec{
			{Name: "n1", PodCIDR: "10.244.1.0/24", Pods: []PodSpec{
				{Name: "client", IP: "10.244.1.10"},
				{Name: "web-1", IP: "10.244.1.11", Serve: serverWork}}},
			{Name: "n2", PodCIDR: "10.244.2.0/24", Pods: []PodSpec{
				{Name: "web-2", IP: "10.244.2.11", Serve: serverWork}}},
		},
		AgentConfig: cfg,
	}
	l := up(t, spec)
	const services = `services:
  - name: web
    clusterIP: 10.96.0.10
    ports: [{name: http, port: 80, targetPort: 8080}]
    backends: [{ip: 10.244.1.11}, {ip: 10.244.2.11}]
  - name: echo
    clusterIP: 10.96.0.20
    ports: [{name: echo, port: 9000}]
    backends: [{ip: 10.244.2.11}]
`
	for _, n := range l.Nodes {
		if err := l.Apply(n.Name, []byte(services)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, time.Minute, "the services on both nodes", func() bool {
		return len(serviceRows(t, l.Node("n1"))) == 2 && len(serviceRows(t, l.Node("n2"))) == 2
	})
	ctx := context.Background()
	ns := l.Pod("client").NetnsPath()
	tk := talk(t, ctx, []echoTarget{{ns: ns, addr: "10.96.0.20:9000", name: "web-2"}})
	waitFor(t, 10*time.Second, "the stream to talk", tk.atLeast(5))

	// A client opening a thousand connections a second and closing
	// each first keeps its ports in TIME_WAIT for a minute: it needs the
	// whole port range, and TIME_WAIT reuse, as such clients are set up.
	if out, err := exec.Command("nsenter", "--net="+ns, "sysctl", "-w", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65535").CombinedOutput(); err != nil {
		t.Fatalf("client sysctls: %v: %s", err, out)
	}
	// New connections, two at a time, from start to end.
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				c, err := Dial(dctx, ns, "tcp4", "10.96.0.10:80")
				cancel()
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				c.Close()
				ok.Add(1)
			}
		})
	}

	start := time.Now()
	for i := 1; i <= 10; i++ {
		want := sets[i%len(sets)]
		// Each node's agent reads its own copy, as on separate machines.
		for _, n := range l.Nodes {
			writeLiveConfig(t, n.Config, want)
		}
		for _, n := range []string{"n1", "n2"} {
			waitFor(t, 30*time.Second, fmt.Sprintf("change %d: %s to run %v", i, n, want), func() bool {
				st, err := l.Node(n).Client().Status(ctx)
				if err != nil {
					return false
				}
				got := slices.Clone(st.Modules)
				slices.Sort(got)
				return st.Ready && slices.Equal(got, want)
			})
		}
		before := ok.Load()
		waitFor(t, 10*time.Second, fmt.Sprintf("change %d: new connections", i), func() bool { return ok.Load() > before+50 })
		waitFor(t, 10*time.Second, fmt.Sprintf("change %d: the stream", i), tk.atLeast(5*(i+1)))
	}
	changes := time.Since(start)

	// With the plugin on: its process killed (restarted by the agent),
	// the agent restarted, the agent killed (and its plugin, which exits
	// with it, started again with the next agent).
	with := sets[4]
	for _, n := range l.Nodes {
		writeLiveConfig(t, n.Config, with)
	}
	waitFor(t, 30*time.Second, "n1 to run the plugin", func() bool {
		st, err := l.Node("n1").Client().Status(ctx)
		return err == nil && st.Ready && len(st.Modules) == len(with)
	})
	plugin := pluginPIDs(t, l.Node("n1").AgentPID)
	if len(plugin) != 1 {
		t.Fatalf("ratelimit processes of n1's agent: %v", plugin)
	}
	if err := syscall.Kill(plugin[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the agent to start the plugin again", func() bool {
		now := pluginPIDs(t, l.Node("n1").AgentPID)
		return len(now) == 1 && now[0] != plugin[0]
	})
	old := l.Node("n1").AgentPID
	restartAndKill(t, l, "n1", tk)
	waitFor(t, 10*time.Second, "the plugins of dead agents to exit", func() bool {
		return len(pluginPIDs(t, old)) == 0 && len(orphanPlugins(t)) == 0
	})
	// At least a minute of new connections in all.
	for time.Since(start) < time.Minute {
		before := ok.Load()
		if !waitUntil(10*time.Second, func() bool { return ok.Load() > before+100 }) {
			t.Fatalf("new connections stalled: %d opened, %d failed, the first failure: %v", ok.Load(), failed.Load(), firstErr.Load())
		}
	}
	close(stop)
	wg.Wait()
	took := time.Since(start)
	errs := tk.end()
	t.Logf("10 changes in %s, then the plugin killed, the agent restarted and killed; in %s: %d connections opened (%.0f/s), %d failed; the stream exchanged %d lines",
		changes.Round(time.Millisecond), took.Round(time.Millisecond), ok.Load(), float64(ok.Load())/took.Seconds(), failed.Load(), tk.counts[0])
	if failed.Load() > 0 {
		t.Errorf("%d new connections failed, the first: %v", failed.Load(), firstErr.Load())
	}
	if len(errs) > 0 {
		t.Errorf("the long-lived stream broke: %v", errs)
	}
	for _, n := range l.Nodes {
		log, err := os.ReadFile(n.Log)
		if err != nil {
			t.Fatal(err)
		}
		// The eleventh turned the plugin on.
		if live := strings.Count(string(log), "module set applied live"); live != 11 {
			t.Errorf("%s applied %d changes live, want 11", n.Name, live)
		}
		var took []string
		for _, line := range strings.Split(string(log), "\n") {
			if strings.Contains(line, "module set applied live") {
				if _, v, ok := strings.Cut(line, "took="); ok {
					took = append(took, v)
				}
			}
		}
		t.Logf("%s: each change took %s; %d kept loaded objects of unchanged modules", n.Name, strings.Join(took, ", "),
			strings.Count(string(log), "loaded objects kept from the running module set"))
		if n.Name == "n2" && strings.Contains(string(log), "restarting") {
			t.Errorf("%s restarted its agent", n.Name)
		}
	}
}

// pluginPIDs are the ratelimit processes whose parent is pid.
func pluginPIDs(t *testing.T, parent int) []int {
	t.Helper()
	var out []int
	for pid, ppid := range ratelimitProcesses() {
		if ppid == parent {
			out = append(out, pid)
		}
	}
	return out
}

// orphanPlugins are ratelimit processes whose agent is gone (reparented).
func orphanPlugins(t *testing.T) []int {
	t.Helper()
	var out []int
	for pid, ppid := range ratelimitProcesses() {
		if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", ppid)); !strings.HasSuffix(exe, "weir-agent") {
			out = append(out, pid)
		}
	}
	return out
}

// ratelimitProcesses maps the live processes of the test's ratelimit
// binary to their parents.
func ratelimitProcesses() map[int]int {
	out := map[int]int{}
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		if exe, err := os.Readlink(filepath.Join(d, "exe")); err != nil || exe != bin.ratelimit {
			continue
		}
		st, err := os.ReadFile(filepath.Join(d, "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...
		_, rest, _ := strings.Cut(string(st), ") ")
		var state string
		var pid, ppid int
		fmt.Sscanf(filepath.Base(d), "%d", &pid)
		if _, err := fmt.Sscanf(rest, "%s %d", &state, &ppid); err != nil || state == "Z" {
			continue
		}
		out[pid] = ppid
	}
	return out
}

// waitUntil polls cond until it holds or d passed.
func waitUntil(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}
