package lab

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"

	"github.com/weirnet/weir/core/api"
	"github.com/weirnet/weir/core/datapath"
)

// These benchmarks measure whole scenarios once (run them with
// -benchtime=1x, as make bench does) and report their own metrics, each
// beside a baseline measured in the same run.

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

func pct(d []time.Duration, p float64) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

// BenchmarkKubeServiceToFirstConnection: from creating a Service (with a
// ready backend pod already running) to the first successful connection
// from a client pod, over 20 services. Baseline: from the same create to a
// watch in this process seeing the EndpointSlice the controller makes, i.e.
// the control plane's own propagation. Weir's share is the difference.
func BenchmarkKubeServiceToFirstConnection(b *testing.B) {
	l, c := upKube(b)
	ctx := context.Background()
	pod := backendPod("bench-1")
	pod.Labels = map[string]string{"app": "bench"}
	if _, err := c.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	p := &Pod{Name: "bench-1", Namespace: "default"}
	if err := l.WaitPodRunning(ctx, c, p); err != nil {
		b.Fatal(err)
	}
	client := l.Pod("client")
	// Probes connect with a short timeout: before the service exists the
	// node answers with rate-limited ICMP errors, so a failed probe may
	// only end at its timeout, which is then the clock's resolution.
	connects := func(addr string) bool {
		cx, cancel := context.WithTimeout(ctx, 5*time.Millisecond)
		defer cancel()
		conn, err := Dial(cx, client.NetnsPath(), "tcp4", addr)
		if err != nil {
			return false
		}
		conn.Close()
		return true
	}

	// The baseline clock: when an informer in this process sees a slice
	// with an endpoint for each service.
	var mu sync.Mutex
	seen := map[string]time.Time{}
	f := informers.NewSharedInformerFactoryWithOptions(c, 0, informers.WithNamespace("default"))
	_, _ = f.Discovery().V1().EndpointSlices().Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { sliceSeen(o, &mu, seen) },
		UpdateFunc: func(_, o any) { sliceSeen(o, &mu, seen) },
	})
	stop := make(chan struct{})
	defer close(stop)
	f.Start(stop)
	f.WaitForCacheSync(stop)

	var toConn, toSlice []time.Duration
	for i := range 20 {
		name := fmt.Sprintf("svc-%d", i)
		vip := fmt.Sprintf("10.96.50.%d", i+1)
		svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
			Spec: corev1.ServiceSpec{ClusterIP: vip, Selector: map[string]string{"app": "bench"},
				Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}}}}
		start := time.Now()
		if _, err := c.CoreV1().Services("default").Create(ctx, svc, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		for {
			if connects(vip + ":80") {
				break
			}
			if time.Since(start) > 30*time.Second {
				b.Fatalf("service %s never answered", name)
			}
			time.Sleep(time.Millisecond)
		}
		toConn = append(toConn, time.Since(start))
		deadline := time.Now().Add(10 * time.Second)
		for {
			mu.Lock()
			at, ok := seen[name]
			mu.Unlock()
			if ok {
				toSlice = append(toSlice, at.Sub(start))
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("no EndpointSlice seen for %s", name)
			}
			time.Sleep(time.Millisecond)
		}
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(ms(median(toConn)), "ms-to-first-conn-p50")
	b.ReportMetric(ms(pct(toConn, 0.9)), "ms-to-first-conn-p90")
	b.ReportMetric(ms(median(toSlice)), "ms-to-slice-p50(baseline)")
	b.ReportMetric(float64(median(toConn))/float64(median(toSlice)), "ratio-p50")
	b.Logf("service create -> first connection: p50 %v p90 %v; create -> EndpointSlice seen by a watch: p50 %v (20 services)",
		median(toConn), pct(toConn, 0.9), median(toSlice))
}

// BenchmarkAgentMemory1000Services: the agent's resident memory and Go heap
// with 1,000 services of 10 endpoints each, beside the same agent with no
// services, measured in the same run.
func BenchmarkAgentMemory1000Services(b *testing.B) {
	l, c := upKube(b)
	ctx := context.Background()
	n := l.Nodes[0]
	time.Sleep(2 * time.Second) // let the idle agent settle
	rss0, heap0 := agentMemory(b, n)
	start := time.Now()
	for i := range 1000 {
		name := fmt.Sprintf("mem-%d", i)
		svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
			Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}}}}
		if _, err := c.CoreV1().Services("default").Create(ctx, svc, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		s := &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: name, Namespace: "default", Labels: map[string]string{discoveryv1.LabelServiceName: name}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](8080)}},
		}
		for j := range 10 {
			s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{fmt.Sprintf("10.%d.%d.%d", 200+i/250, i%250, j+1)}})
		}
		if _, err := c.DiscoveryV1().EndpointSlices("default").Create(ctx, s, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	created := time.Since(start)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		p, err := datapath.OpenPinned(n.PinDir)
		if err != nil {
			b.Fatal(err)
		}
		rows, err := p.Services()
		p.Close()
		if err != nil {
			b.Fatal(err)
		}
		full := 0
		for _, r := range rows {
			if len(r.Backends) == 10 {
				full++
			}
		}
		if full >= 1000 {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("only %d of 1000 services programmed", full)
		}
		time.Sleep(100 * time.Millisecond)
	}
	programmed := time.Since(start)
	time.Sleep(2 * time.Second)
	rss1, heap1 := agentMemory(b, n)
	mib := func(v uint64) float64 { return float64(v) / (1 << 20) }
	b.ReportMetric(mib(rss0), "MiB-rss-idle(baseline)")
	b.ReportMetric(mib(rss1), "MiB-rss-1000x10")
	b.ReportMetric(float64(rss1)/float64(rss0), "ratio-rss")
	b.ReportMetric(mib(heap1), "MiB-heap-1000x10")
	b.ReportMetric(float64(rss1-rss0)/1000/1024, "KiB-rss-per-service")
	b.Logf("agent RSS %.1f MiB idle -> %.1f MiB with 1000 services x 10 endpoints (heap %.1f -> %.1f MiB); objects created in %v, all programmed after %v",
		mib(rss0), mib(rss1), mib(heap0), mib(heap1), created.Round(time.Millisecond), programmed.Round(time.Millisecond))
}

func sliceSeen(o any, mu *sync.Mutex, seen map[string]time.Time) {
	s, ok := o.(*discoveryv1.EndpointSlice)
	if !ok || len(s.Endpoints) == 0 {
		return
	}
	name := s.Labels[discoveryv1.LabelServiceName]
	mu.Lock()
	defer mu.Unlock()
	if _, dup := seen[name]; !dup {
		seen[name] = time.Now()
	}
}

func agentMemory(b *testing.B, n *Node) (rss, heap uint64) {
	b.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", n.AgentPID))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			rss = kb * 1024
		}
	}
	st, err := n.Client().Status(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	return rss, st.HeapBytes
}

// BenchmarkCrossNode: TCP bulk throughput (200 MiB, best of 3) and
// request/response rate (2,000 one-line round trips on one connection)
// from a pod on n1 to a pod on n2, for each forwarding mode, beside the
// same traffic between the two nodes' own namespaces over the underlay
// (no translation, no encapsulation; in the tunnel modes the uplink's
// egress entry still parses these packets to see that they are not for a
// remote pod), measured in the same lab.
func BenchmarkCrossNode(b *testing.B) {
	for _, m := range modes[:3] {
		b.Run(m.name, func(b *testing.B) {
			cfg := filepath.Join(b.TempDir(), "agent.yaml")
			if err := os.WriteFile(cfg, []byte(m.config), 0o600); err != nil {
				b.Fatal(err)
			}
			spec := threeNodes(cfg)
			spec.Nodes = spec.Nodes[:2]
			l := up(b, spec)
			// The underlay baseline: servers in n2's own namespace.
			srv, err := Serve("n2", l.Node("n2").NetnsPath(), Workload{Echo: 9000, Sink: 7000})
			if err != nil {
				b.Fatal(err)
			}
			defer srv.Close()
			pod := l.Pod("client").NetnsPath()
			podBulk := bulk(b, pod, l.Pod("web-2").IP+":7000")
			podRR := requestResponse(b, pod, l.Pod("web-2").IP+":9000")
			ulBulk := bulk(b, l.Node("n1").NetnsPath(), l.Node("n2").IP+":7000")
			ulRR := requestResponse(b, l.Node("n1").NetnsPath(), l.Node("n2").IP+":9000")
			b.ReportMetric(podBulk, "Mbit/s")
			b.ReportMetric(ulBulk, "Mbit/s-underlay(baseline)")
			b.ReportMetric(podBulk/ulBulk, "ratio-bulk")
			b.ReportMetric(podRR, "rr/s")
			b.ReportMetric(ulRR, "rr/s-underlay(baseline)")
			b.ReportMetric(podRR/ulRR, "ratio-rr")
			b.Logf("%s: pod to pod %.0f Mbit/s, %.0f req/s; bare underlay %.0f Mbit/s, %.0f req/s", m.name, podBulk, podRR, ulBulk, ulRR)
		})
	}
}

func bulk(b *testing.B, nsPath, addr string) float64 {
	const size = 200 << 20
	best := 0.0
	for range 3 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		start := time.Now()
		got, err := Send(ctx, nsPath, addr, size)
		cancel()
		if err != nil || got != size {
			b.Fatalf("bulk to %s: %d bytes, %v", addr, got, err)
		}
		best = max(best, float64(size*8)/time.Since(start).Seconds()/1e6)
	}
	return best
}

func requestResponse(b *testing.B, nsPath, addr string) float64 {
	const n = 2000
	c, err := Dial(context.Background(), nsPath, "tcp4", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Minute))
	rd := bufio.NewReader(c)
	start := time.Now()
	for i := range n {
		if _, err := fmt.Fprintf(c, "%d\n", i); err != nil {
			b.Fatal(err)
		}
		if _, err := rd.ReadString('\n'); err != nil {
			b.Fatal(err)
		}
	}
	return n / time.Since(start).Seconds()
}

// BenchmarkKubeScale grows one cluster to 1k, 10k and 30k services of 10
// endpoints each (created straight through the API) and at each size
// measures, beside the same figures with no services from the same run:
// an agent restart until its caches synced and every service was
// compared with the maps; the agent's work per changed service (its own
// account: source and reconciler); the time from a Service and slice
// created to the first connection through it; the agent's memory (RSS,
// Go heap) and the BPF maps' memory.
func BenchmarkKubeScale(b *testing.B) {
	l, c, web := upScale(b)
	n, client := l.Nodes[0], l.Pod("client")
	const endpoints = 10
	sizes := []int{0, 1000, 10000, 30000}
	if s := os.Getenv("WEIR_SCALE_MAX"); s != "" {
		limit, _ := strconv.Atoi(s)
		sizes = slices.DeleteFunc(sizes, func(n int) bool { return n > limit })
	}
	// WEIR_SCALE_SIZES=0,30000 grows the cluster straight to the sizes
	// listed (0 first: the baseline).
	if s := os.Getenv("WEIR_SCALE_SIZES"); s != "" {
		sizes = nil
		for _, f := range strings.Split(s, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n < 0 || (len(sizes) > 0 && n <= sizes[len(sizes)-1]) {
				b.Fatalf("WEIR_SCALE_SIZES=%q: want increasing service counts, such as 0,30000", s)
			}
			sizes = append(sizes, n)
		}
	}
	type figures struct {
		restart, sync, source, reconcile, changeLat, toConn, api, apiAlone, seen, programmed time.Duration
		rss, heap, bpf                                                                       uint64
	}
	var base figures
	created, probes := 0, 0
	for _, size := range sizes {
		b.Run(fmt.Sprintf("services=%d", size), func(b *testing.B) {
			took := createScale(b, c, created, size, endpoints, web.IP)
			created = size
			b.Logf("created %d services with their slices in %s", size, took.Round(time.Millisecond))
			waitServices(b, n, size, 5*time.Minute)
			var f figures
			var st *api.Status
			f.restart, st = restartAgent(b, l, n, nil)
			f.sync = time.Duration(st.Kubernetes.SyncMillis) * time.Millisecond
			waitServices(b, n, size, time.Minute)
			f.source, f.reconcile, f.changeLat = changeCost(b, c, n, endpoints, 30, web.IP)
			f.toConn, f.api, f.seen, f.programmed = createToConnection(b, c, n, client, 31000+probes, 10, web.IP)
			f.apiAlone = apiCreateLatency(b, c, n, 31000+probes+10, 10, web.IP)
			probes += 20
			time.Sleep(2 * time.Second) // let the agent settle before reading its memory
			f.rss, f.heap = agentMemory(b, n)
			f.bpf = bpfMapBytes(b, n.AgentPID)
			if size == 0 {
				base = f
			}
			ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
			mib := func(v uint64) float64 { return float64(v) / (1 << 20) }
			b.ReportMetric(ms(f.restart), "ms-restart-to-written")
			b.ReportMetric(ms(f.sync), "ms-caches-synced")
			b.ReportMetric(float64((f.source + f.reconcile).Microseconds()), "us-agent-work-per-change")
			b.ReportMetric(float64(f.reconcile.Microseconds()), "us-reconciler-per-change")
			b.ReportMetric(ms(f.changeLat), "ms-change-to-datapath-p50")
			b.ReportMetric(ms(f.toConn), "ms-create-to-first-conn-p50")
			b.ReportMetric(ms(f.api), "ms-api-creates-p50")
			b.ReportMetric(ms(f.apiAlone), "ms-api-creates-agent-frozen-p50")
			b.ReportMetric(ms(f.seen), "ms-create-to-watch-seen-p50(control-plane)")
			b.ReportMetric(ms(f.programmed), "ms-watch-seen-to-datapath-p50")
			b.ReportMetric(mib(f.rss), "MiB-rss")
			b.ReportMetric(mib(f.heap), "MiB-heap")
			b.ReportMetric(mib(f.bpf), "MiB-bpf-maps")
			if size > 0 && base.toConn > 0 {
				b.ReportMetric(float64(f.toConn)/float64(base.toConn), "ratio-create-to-conn-vs-0")
				b.ReportMetric(float64(f.apiAlone)/float64(base.apiAlone), "ratio-api-creates-agent-frozen-vs-0")
				b.ReportMetric(float64(f.toConn-f.api)/float64(max(base.toConn-base.api, time.Microsecond)), "ratio-api-answered-to-conn-vs-0")
				b.ReportMetric(float64(f.programmed)/float64(max(base.programmed, time.Microsecond)), "ratio-watch-seen-to-datapath-vs-0")
				b.ReportMetric(float64(f.source+f.reconcile)/float64(max(base.source+base.reconcile, time.Microsecond)), "ratio-work-per-change-vs-0")
			}
			b.Logf("%d services x %d endpoints: restart to written %s (caches synced in %s); agent work per change %s (source %s, reconciler %s), change to datapath p50 %s; create to first connection p50 %s (API answered both creates after %s, %s with the agent frozen; a watch saw the slice after %s, the datapath had it %s later); RSS %.1f MiB, heap %.1f MiB, BPF maps %.1f MiB",
				size, endpoints, f.restart.Round(time.Millisecond), f.sync, f.source+f.reconcile, f.source, f.reconcile, f.changeLat.Round(time.Microsecond), f.toConn.Round(time.Microsecond), f.api.Round(time.Microsecond), f.apiAlone.Round(time.Microsecond), f.seen.Round(time.Microsecond), f.programmed.Round(time.Microsecond),
				mib(f.rss), mib(f.heap), mib(f.bpf))
		})
	}
}

// BenchmarkFileScale: a standalone node applies services files of 10,000
// services (3 and 10 endpoints each) and of 100,000 services of 10
// endpoints, each replacing the previous one (so every service changes).
// The clock runs from the file's rename to the agent reporting it applied
// and written to the datapath; the figures beside are the agent's memory
// after it, and an empty file's apply as the baseline.
func BenchmarkFileScale(b *testing.B) {
	spec := &Spec{Name: newLabName(), AgentConfig: "", Nodes: []NodeSpec{{Name: "n1", PodCIDR: "10.244.1.0/24"}}}
	cfg := filepath.Join(b.TempDir(), "agent.yaml")
	if err := os.WriteFile(cfg, []byte(scaleConfig), 0o600); err != nil {
		b.Fatal(err)
	}
	spec.AgentConfig = cfg
	l := up(b, spec)
	n := l.Nodes[0]
	nodes := fmt.Sprintf("nodes:\n  - name: n1\n    ip: %s\n    podCIDRs: [%s]\n", n.IP, n.PodCIDR)
	apply := func(services, endpoints int) time.Duration {
		var sb strings.Builder
		sb.WriteString("services:\n")
		if services == 0 {
			sb.Reset()
			sb.WriteString("services: []\n")
		}
		for i := range services {
			fmt.Fprintf(&sb, "  - name: s%d\n    clusterIP: 10.%d.%d.%d\n    ports:\n      - port: 80\n        targetPort: 8080\n    backends:\n",
				i, 96+i/62500, i/250%250, 1+i%250)
			for j := range endpoints {
				k := i*endpoints + j + endpoints // +endpoints: each file's backends differ from the last's
				fmt.Fprintf(&sb, "      - ip: 10.%d.%d.%d\n", 128+k/62500, k/250%250, 1+k%250)
			}
		}
		sb.WriteString(nodes)
		data := []byte(sb.String())
		sum := sha256.Sum256(data)
		want := hex.EncodeToString(sum[:])
		tmp := n.ServicesFile + ".tmp"
		if err := os.WriteFile(tmp, data, 0o600); err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		if err := os.Rename(tmp, n.ServicesFile); err != nil {
			b.Fatal(err)
		}
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			st, err := n.Client().Status(ctx)
			cancel()
			if err == nil && st.File != nil && st.File.Applied == want && st.Services != nil && st.Services.AppliedVersion >= st.File.Version {
				return time.Since(start)
			}
			if err == nil && st.File != nil && st.File.Rejected == want {
				b.Fatalf("file of %d services refused: %s", services, st.File.Error)
			}
			if time.Since(start) > 10*time.Minute {
				b.Fatalf("file of %d services not applied: %+v %v", services, st, err)
			}
			time.Sleep(2 * time.Millisecond)
		}
	}
	base := apply(0, 0)
	for _, c := range []struct{ services, endpoints int }{{10000, 3}, {10000, 10}, {100000, 10}} {
		b.Run(fmt.Sprintf("services=%d/endpoints=%d", c.services, c.endpoints), func(b *testing.B) {
			took := apply(c.services, c.endpoints)
			time.Sleep(2 * time.Second) // let the agent settle before reading its memory
			rss, heap := agentMemory(b, n)
			bpf := bpfMapBytes(b, n.AgentPID)
			mib := func(v uint64) float64 { return float64(v) / (1 << 20) }
			b.ReportMetric(float64(took.Milliseconds()), "ms-file-to-datapath")
			b.ReportMetric(float64(base.Milliseconds()), "ms-empty-file(baseline)")
			b.ReportMetric(mib(rss), "MiB-rss")
			b.ReportMetric(mib(heap), "MiB-heap")
			b.ReportMetric(mib(bpf), "MiB-bpf-maps")
			b.Logf("%d services x %d endpoints: file to datapath %s (an empty file: %s); RSS %.1f MiB, heap %.1f MiB, BPF maps %.1f MiB",
				c.services, c.endpoints, took.Round(time.Millisecond), base.Round(time.Millisecond), mib(rss), mib(heap), mib(bpf))
		})
	}
}
