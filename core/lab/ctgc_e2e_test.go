package lab

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/weirnet/weir/core/datapath"
)

// resets opens n connections to addr from the pod and resets each (close
// with linger 0): flows that end in reset, whose conntrack entries expire
// 10 s later.
func resets(t *testing.T, p *Pod, addr string, n int) {
	t.Helper()
	for i := range n {
		c, err := Dial(context.Background(), p.NetnsPath(), "tcp4", addr)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		_ = c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}
}

// ctCount counts the node's conntrack entries, expired ones included:
// what takes room in the map.
func ctCount(t *testing.T, n *Node) int {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(n.PinDir, datapath.MapCT), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	count, err := datapath.CountEntries(m)
	if err != nil {
		t.Fatal(err)
	}
	return count
}

// With the conntrack map nearly full of flows that ended, the collector
// frees it before the next wave: an idle established connection is never
// evicted, keeps its backend, and the agent reports the pressure. Its
// first pass after a restart leaves every live flow alone.
func TestConntrackNearlyFullKeepsEstablishedFlows(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(cfg, []byte("modules: [endpoints, lb]\ndatapath: {ctMaxEntries: 4096, ctGCInterval: 1s, ctGCMinInterval: 1s, ctGCMaxInterval: 2s}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	spec := oneNode()
	spec.AgentConfig = cfg
	l := up(t, spec)
	apply(t, l, webServices, 3)
	n := l.Nodes[0]
	client := l.Pod("client")
	conn := echoConn(t, client, "10.96.0.10")
	defer conn.close()
	conn.say("before")

	for wave := range 3 {
		// 1,650 reset flows: 3,300 entries, about 80% of the map; three
		// waves would not fit without collection.
		resets(t, client, "10.96.0.10:9000", 1650)
		if wave == 0 {
			waitFor(t, 10*time.Second, "the agent to report conntrack pressure", func() bool {
				st, err := n.Client().Status(context.Background())
				return err == nil && st.Conntrack != nil && st.Conntrack.Pressure
			})
		}
		waitFor(t, 30*time.Second, fmt.Sprintf("wave %d to be collected", wave), func() bool { return ctCount(t, n) < 100 })
	}
	conn.say("after three waves") // the same backend, by say's check

	// A restarted agent collects at once and keeps the live flow.
	before := ctCount(t, n)
	if err := l.StopAgent("n1"); err != nil {
		t.Fatal(err)
	}
	if err := l.StartAgent(context.Background(), "n1"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the first collection after the restart", func() bool {
		st, err := n.Client().Status(context.Background())
		return err == nil && st.Conntrack != nil && st.Conntrack.Passes >= 1
	})
	if after := ctCount(t, n); after < 2 || after > before {
		t.Fatalf("conntrack held %d entries before the restart and %d after its first collection; the live flow needs 2", before, after)
	}
	conn.say("after the restart")
}
