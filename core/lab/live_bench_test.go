package lab

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// BenchmarkModuleSetChange times a change of a node's module set from the
// moment its configuration file changes to the new set serving: the
// agent's status shows it ready and a new connection through a ClusterIP
// succeeds. Applied live (socket LB on or off) beside the restart path
// (the same change with the datapath section changed too, which only a
// restart applies), alternating, five of each, with 1 and with 10,000
// services (a restarted agent writes them all again before it serves).
func BenchmarkModuleSetChange(b *testing.B) {
	for _, count := range []int{1, 10000} {
		b.Run(fmt.Sprintf("services=%d", count), func(b *testing.B) { moduleSetChange(b, count) })
	}
}

func moduleSetChange(b *testing.B, count int) {
	cfg := filepath.Join(b.TempDir(), "agent.yaml")
	config := func(socketlb bool, gc string) string {
		mods := []string{"endpoints", "lb"}
		if socketlb {
			mods = append(mods, "socketlb")
		}
		return fmt.Sprintf("modules: [%s]\ndatapath: {ctMaxEntries: 65536, ctGCInterval: %s}\n", strings.Join(mods, ", "), gc)
	}
	if err := os.WriteFile(cfg, []byte(config(false, "5m")), 0o600); err != nil {
		b.Fatal(err)
	}
	spec := oneNode()
	spec.AgentConfig = cfg
	l := up(b, spec)
	var sb strings.Builder
	sb.WriteString("services:\n  - name: web\n    clusterIP: 10.96.0.10\n    ports: [{name: http, port: 80, targetPort: 8080}]\n    backends: [{ip: 10.244.1.11}]\n")
	for i := 1; i < count; i++ {
		fmt.Fprintf(&sb, "  - name: s%d\n    clusterIP: 10.%d.%d.%d\n    ports: [{port: 80, targetPort: 8080}]\n    backends: [{ip: 10.%d.%d.%d}]\n",
			i, 97+i/62500, i/250%250, 1+i%250, 128+i/62500, i/250%250, 1+i%250)
	}
	if err := l.Apply("n1", []byte(sb.String())); err != nil {
		b.Fatal(err)
	}
	n := l.Nodes[0]
	ns := l.Pod("client").NetnsPath()
	ctx := context.Background()
	serving := func(want []string) bool {
		st, err := n.Client().Status(ctx)
		if err != nil || !st.Ready {
			return false
		}
		got := slices.Clone(st.Modules)
		slices.Sort(got)
		if !slices.Equal(got, want) {
			return false
		}
		dctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		c, err := Dial(dctx, ns, "tcp4", "10.96.0.10:80")
		if err != nil {
			return false
		}
		c.Close()
		return true
	}
	waitFor(b, time.Minute, "the service", func() bool { return serving([]string{"endpoints", "lb"}) })
	var live, restart []time.Duration
	socketlb, gc := false, 5
	for i := range 10 {
		socketlb = !socketlb
		viaRestart := i%2 == 1
		if viaRestart {
			gc++ // another collector interval: the datapath section changed
		}
		want := []string{"endpoints", "lb"}
		if socketlb {
			want = append(want, "socketlb")
		}
		slices.Sort(want)
		start := time.Now()
		if err := os.WriteFile(n.Config, []byte(config(socketlb, fmt.Sprintf("%dm", gc))), 0o600); err != nil {
			b.Fatal(err)
		}
		for !serving(want) {
			if time.Since(start) > time.Minute {
				b.Fatalf("change %d did not serve within a minute", i)
			}
			time.Sleep(5 * time.Millisecond)
		}
		took := time.Since(start)
		if viaRestart {
			restart = append(restart, took)
		} else {
			live = append(live, took)
		}
	}
	log, err := os.ReadFile(n.Log)
	if err != nil {
		b.Fatal(err)
	}
	if got := strings.Count(string(log), "module set applied live"); got != len(live) {
		b.Fatalf("%d changes applied live, want %d", got, len(live))
	}
	med := func(d []time.Duration) time.Duration {
		d = slices.Clone(d)
		slices.Sort(d)
		return d[len(d)/2]
	}
	b.Logf("%d services: config change to serving: live median %v (%v), restart path median %v (%v): live/restart %.2f×",
		count, med(live).Round(time.Millisecond), live, med(restart).Round(time.Millisecond), restart, float64(med(live))/float64(med(restart)))
	b.ReportMetric(float64(med(live).Milliseconds()), "ms-live")
	b.ReportMetric(float64(med(restart).Milliseconds()), "ms-restart")
}
