package lab

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/weirnet/weir/core/datapath"
)

// pluginConfig enables the ratelimit plugin (declared with its checksum)
// for the nodes of one pool only.
func pluginConfig(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf(`modules: [endpoints, lb, tunnel]
plugins:
  - {name: ratelimit, path: %s, sha256: %x}
settings:
  tunnel: {protocol: vxlan}
  ratelimit:
    limits: [{frontend: "10.96.0.10:80", rate: 1, burst: 3}]
nodePools:
  - name: limited
    nodeSelector: {matchLabels: {weir.dev/ratelimit: "on"}}
    modules: {enable: [ratelimit]}
`, path, sha256.Sum256(data))
}

// The ratelimit plugin, built from source and started by the agent over
// go-plugin (mutual TLS, checksum checked), limits new connections to a
// frontend on the nodes of its pool: a burst of ten from a pod on n1 gets
// three through (burst 3, then one a second), the same burst from a pod on
// n2 (another pool) gets all ten. Drops are counted under core's plugin
// reason and in the plugin's own counters, which its pinned map keeps.
func TestRateLimitPluginLimitsItsPool(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(cfg, []byte(pluginConfig(t, bin.ratelimit)), 0o600); err != nil {
		t.Fatal(err)
	}
	spec := &Spec{
		Name: newLabName(),
		Nodes: []NodeSpec{
			{Name: "n1", PodCIDR: "10.244.1.0/24", Labels: map[string]string{"weir.dev/ratelimit": "on"}, Pods: []PodSpec{
				{Name: "client-1", IP: "10.244.1.10"},
				{Name: "web-1", IP: "10.244.1.11", Serve: serverWork}}},
			{Name: "n2", PodCIDR: "10.244.2.0/24", Pods: []PodSpec{
				{Name: "client-2", IP: "10.244.2.10"},
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
`
	for _, n := range l.Nodes {
		if err := l.Apply(n.Name, []byte(services)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, time.Minute, "the service on both nodes", func() bool {
		return len(serviceRows(t, l.Node("n1"))) == 1 && len(serviceRows(t, l.Node("n2"))) == 1
	})

	burst := func(client string) (ok int) {
		for range 10 {
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			c, err := Dial(ctx, l.Pod(client).NetnsPath(), "tcp", "10.96.0.10:80")
			cancel()
			if err == nil {
				ok++
				c.Close()
			}
		}
		return ok
	}
	if got := burst("client-2"); got != 10 {
		t.Fatalf("from n2 (no ratelimit there): %d of 10 connections, want all", got)
	}
	// A second or so of dialling can refill one token.
	if got := burst("client-1"); got < 3 || got > 5 {
		t.Fatalf("from n1 (ratelimit at 1/s, burst 3): %d of 10 connections, want 3 (up to 5 with refills)", got)
	}

	allowed, limited := pluginCounters(t, l.Node("n1").PinDir)
	if allowed < 3 || limited < 5 {
		t.Fatalf("ratelimit counters on n1: %d allowed, %d limited", allowed, limited)
	}
	if got := metric(t, l.Node("n1"), "pod-egress", datapath.DropPlugin); got < limited {
		t.Fatalf("core counts %d plugin drops on n1, the plugin %d", got, limited)
	}
	// weir status says where the plugin runs.
	for node, enabled := range map[string]bool{"n1": true, "n2": false} {
		st, err := l.Node(node).Client().Status(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Plugins) != 1 || st.Plugins[0].Name != "ratelimit" || st.Plugins[0].Version != "0.1.0" || st.Plugins[0].Enabled != enabled ||
			st.Plugins[0].PID == 0 || st.Plugins[0].FailurePolicy != "open" || st.Plugins[0].Restarts != 0 {
			t.Fatalf("status of %s: plugins %+v", node, st.Plugins)
		}
		if got := fmt.Sprint(st.Slots["ratelimit"]); enabled && got != "[pod-egress/plugin-early]" {
			t.Fatalf("status of %s: ratelimit fills %s", node, got)
		}
	}
	if _, err := os.Stat(filepath.Join(l.Node("n2").PinDir, "plugins", "ratelimit")); !os.IsNotExist(err) {
		t.Fatalf("n2 (not in the pool) has the plugin's pins: %v", err)
	}
}

// pluginCounters reads ratelimit_counters as an operator does: weir bpf
// plugin list.
func pluginCounters(t *testing.T, pinDir string) (allowed, limited uint64) {
	t.Helper()
	out, err := exec.Command(bin.weir, "bpf", "plugin", "list", "--pin-dir", pinDir, "-o", "json").CombinedOutput()
	if err != nil {
		t.Fatalf("weir bpf plugin list: %v\n%s", err, out)
	}
	var rows []datapath.PluginMapRow
	if err := json.Unmarshal(out, &rows); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	for _, r := range rows {
		if r.Plugin == "ratelimit" && r.Map == "ratelimit_counters" && len(r.Counters) == 2 {
			return r.Counters[0], r.Counters[1]
		}
	}
	t.Fatalf("no ratelimit counters in %s", out)
	return 0, 0
}
