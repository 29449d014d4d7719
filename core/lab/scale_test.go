package lab

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/weirnet/weir/core/api"
	"github.com/weirnet/weir/core/datapath"
)

// The scale scenario: thousands of selectorless Services, each with one
// EndpointSlice, created straight through the API (the controller
// manager's client rate would dominate otherwise). Endpoint 0 of every
// slice is a real backend pod, so any service answers; the others are
// addresses nobody serves.

const scaleNS = "scale"

// scaleConfig is the agent configuration of the scale runs: map sizes as
// the defaults, the conntrack map small (the runs open few connections).
const scaleConfig = `modules: [endpoints, lb]
datapath: {ctMaxEntries: 65536}
`

// scaleVIP is the cluster IP of scale service i, in the upper half of the
// lab's 10.96.0.0/16.
func scaleVIP(i int) string { return fmt.Sprintf("10.96.%d.%d", 128+i/250, 1+i%250) }

func scaleName(i int) string { return "s" + strconv.Itoa(i) }

// scaleSlice is the slice of service i: the backend first, then fake
// endpoints; gen varies the fake ones (an endpoint change).
func scaleSlice(i, endpoints, gen int, backend string) *discoveryv1.EndpointSlice {
	return scaleSliceWith(i, endpoints, gen, backend, discoveryv1.EndpointConditions{})
}

// scaleSliceWith is scaleSlice with the fake endpoints' conditions.
func scaleSliceWith(i, endpoints, gen int, backend string, fake discoveryv1.EndpointConditions) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: scaleName(i), Namespace: scaleNS, Labels: map[string]string{discoveryv1.LabelServiceName: scaleName(i)}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](8080), Protocol: ptr.To(corev1.ProtocolTCP)}},
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{backend}, NodeName: ptr.To("n1")}},
	}
	for j := 1; j < endpoints; j++ {
		k := i*endpoints + j + gen
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{
			Addresses: []string{fmt.Sprintf("10.%d.%d.%d", 128+k/62500, k/250%250, 1+k%250)}, NodeName: ptr.To("n2"), Conditions: fake})
	}
	return s
}

func scaleService(i int) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: scaleName(i), Namespace: scaleNS},
		Spec: corev1.ServiceSpec{ClusterIP: scaleVIP(i),
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}}},
	}
}

// upScale brings up the scale lab: a real control plane, one node with a
// client pod, and a backend pod made through the API. It returns a client
// without rate limits.
func upScale(tb testing.TB) (*Lab, kubernetes.Interface, *Pod) {
	tb.Helper()
	l, _ := upKubeWith(tb, scaleConfig, []NodeSpec{{Name: "n1", PodCIDR: "10.244.1.0/24", Pods: []PodSpec{{Name: "client"}}}})
	c := fastClient(tb, l)
	ctx := context.Background()
	if _, err := c.CoreV1().Pods("default").Create(ctx, backendPod("scale-web"), metav1.CreateOptions{}); err != nil {
		tb.Fatal(err)
	}
	web := &Pod{Name: "scale-web", Namespace: "default"}
	if err := l.WaitPodRunning(ctx, c, web); err != nil {
		tb.Fatal(err)
	}
	return l, c, web
}

// fastClient is a client of the lab's API server without client-side
// rate limits, for creating objects by the thousand.
func fastClient(tb testing.TB, l *Lab) kubernetes.Interface {
	tb.Helper()
	cfg := l.ControlPlane.RestConfig()
	cfg.QPS, cfg.Burst = -1, 0
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// createScale creates services [from, to) with their slices, 32 at a
// time, and returns how long it took.
func createScale(tb testing.TB, c kubernetes.Interface, from, to, endpoints int, backend string) time.Duration {
	return createScaleWith(tb, c, from, to, endpoints, backend, discoveryv1.EndpointConditions{})
}

// createScaleWith is createScale with the fake endpoints' conditions.
func createScaleWith(tb testing.TB, c kubernetes.Interface, from, to, endpoints int, backend string, fake discoveryv1.EndpointConditions) time.Duration {
	tb.Helper()
	ctx := context.Background()
	if err := ensureNamespace(ctx, c, scaleNS); err != nil {
		tb.Fatal(err)
	}
	start := time.Now()
	var next atomic.Int64
	next.Store(int64(from))
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failed error
	for range 32 {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= to {
					return
				}
				_, err := c.CoreV1().Services(scaleNS).Create(ctx, scaleService(i), metav1.CreateOptions{})
				if err == nil || apierrors.IsAlreadyExists(err) {
					_, err = c.DiscoveryV1().EndpointSlices(scaleNS).Create(ctx, scaleSliceWith(i, endpoints, 0, backend, fake), metav1.CreateOptions{})
				}
				if err != nil && !apierrors.IsAlreadyExists(err) {
					mu.Lock()
					failed = fmt.Errorf("service %d: %w", i, err)
					mu.Unlock()
					return
				}
			}
		})
	}
	wg.Wait()
	if failed != nil {
		tb.Fatal(failed)
	}
	return time.Since(start)
}

// status asks a node's agent for its status.
func status(tb testing.TB, n *Node) *api.Status {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := n.Client().Status(ctx)
	if err != nil {
		tb.Fatal(err)
	}
	return st
}

// waitServices waits until the agent's Kubernetes source holds at least
// want services and every change it handed on is in the datapath.
func waitServices(tb testing.TB, n *Node, want int, timeout time.Duration) *api.Status {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		st, err := n.Client().Status(ctx)
		cancel()
		if err == nil && st.Kubernetes != nil && st.Kubernetes.Synced && st.Kubernetes.Services >= want && st.Services != nil && st.Ready && st.Services.Passes > 0 &&
			st.Services.Maps[0].Entries >= want {
			// Settled: nothing more arrives between two looks.
			time.Sleep(50 * time.Millisecond)
			again := status(tb, n)
			if again.Services.Passes == st.Services.Passes && again.Kubernetes.Rounds == st.Kubernetes.Rounds {
				return again
			}
			continue
		}
		if time.Now().After(deadline) {
			tb.Fatalf("agent of %s did not hold %d services within %s: %+v %v", n.Name, want, timeout, st, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// restartAgent stops and starts a node's agent, and returns how long the
// new one took from its start to its first full pass over the services
// (caches synced, every service compared with the maps), as the test sees
// it, and the agent's own account of its sync.
func restartAgent(tb testing.TB, l *Lab, n *Node, during func()) (time.Duration, *api.Status) {
	tb.Helper()
	if err := l.StopAgent(n.Name); err != nil {
		tb.Fatal(err)
	}
	if during != nil {
		during()
	}
	start := time.Now()
	if err := l.StartAgent(context.Background(), n.Name); err != nil {
		tb.Fatal(err)
	}
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		st, err := n.Client().Status(ctx)
		cancel()
		if err == nil && st.Services != nil && st.Services.Full > 0 {
			return time.Since(start), st
		}
		if time.Since(start) > 2*time.Minute {
			tb.Fatalf("restarted agent never wrote its services: %+v %v", st, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// changeProbe is the service changeCost changes: the same one whatever
// the number of others, so the figures compare.
const changeProbe = 31500

// changeCost changes the slice of the probe service count times (an
// endpoint replaced, after ten changes not counted), waiting for each
// change to reach the datapath, and
// returns the agent's work per change (of its source and of its
// reconciler, as it reports them) and the median time from the API's answer to the datapath
// written.
func changeCost(tb testing.TB, c kubernetes.Interface, n *Node, endpoints, count int, backend string) (source, reconcile, latency time.Duration) {
	tb.Helper()
	ctx := context.Background()
	if _, err := c.CoreV1().Services(scaleNS).Get(ctx, scaleName(changeProbe), metav1.GetOptions{}); apierrors.IsNotFound(err) {
		if _, err := c.CoreV1().Services(scaleNS).Create(ctx, scaleService(changeProbe), metav1.CreateOptions{}); err != nil {
			tb.Fatal(err)
		}
		if _, err := c.DiscoveryV1().EndpointSlices(scaleNS).Create(ctx, scaleSlice(changeProbe, endpoints, 0, backend), metav1.CreateOptions{}); err != nil {
			tb.Fatal(err)
		}
	}
	waitStatus(tb, n, func(st *api.Status) bool { return st.Kubernetes != nil && st.Kubernetes.Rounds > 0 })
	// The first changes after a restart pay once for memory the agent
	// handed back to the system when it settled: ten changes go first,
	// untimed, and the figures are the steady state's.
	const warm = 10
	var before *api.Status
	var lat []time.Duration
	for k := range warm + count {
		if k == warm {
			before, lat = status(tb, n), nil
		}
		s := scaleSlice(changeProbe, endpoints, 1+k, backend)
		old, err := c.DiscoveryV1().EndpointSlices(scaleNS).Get(ctx, s.Name, metav1.GetOptions{})
		if err != nil {
			tb.Fatal(err)
		}
		s.ResourceVersion = old.ResourceVersion
		passes := status(tb, n).Services.Passes
		start := time.Now()
		if _, err := c.DiscoveryV1().EndpointSlices(scaleNS).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
			tb.Fatal(err)
		}
		for {
			st := status(tb, n)
			if st.Services.Passes > passes {
				lat = append(lat, time.Since(start))
				break
			}
			if time.Since(start) > 30*time.Second {
				tb.Fatalf("change %d never reached the datapath", k)
			}
			time.Sleep(200 * time.Microsecond) // poll gently: the agent shares two cores with the API server
		}
	}
	after := status(tb, n)
	per := func(us uint64) time.Duration { return time.Duration(us) * time.Microsecond / time.Duration(count) }
	return per(after.Kubernetes.WorkMicros - before.Kubernetes.WorkMicros), per(after.Services.WorkMicros - before.Services.WorkMicros), median(lat)
}

// waitStatus polls the agent's status until ok says so.
func waitStatus(tb testing.TB, n *Node, ok func(*api.Status) bool) {
	tb.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		if st := status(tb, n); ok(st) {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("agent of %s never reached the expected state", n.Name)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// createToConnection creates count services with a slice whose endpoint
// is the backend, and returns the median times from the create call to
// the first connection from the client pod that succeeds (toConn), to the
// API server's answer to both creates (api), to a watch in this process
// seeing the slice (seen: the control plane's own share), and from there
// to the node's services map holding the service with its backend
// (programmed: the agent's share, polled every 50 µs).
func createToConnection(tb testing.TB, c kubernetes.Interface, n *Node, client *Pod, first, count int, backend string) (toConn, api, seen, programmed time.Duration) {
	tb.Helper()
	ctx := context.Background()
	svcMap, err := ebpf.LoadPinnedMap(filepath.Join(n.PinDir, datapath.MapServices), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		tb.Fatal(err)
	}
	defer svcMap.Close()
	var mu sync.Mutex
	seenAt := map[string]time.Time{}
	list, err := c.DiscoveryV1().EndpointSlices(scaleNS).List(ctx, metav1.ListOptions{Limit: 1})
	if err != nil {
		tb.Fatal(err)
	}
	w, err := c.DiscoveryV1().EndpointSlices(scaleNS).Watch(ctx, metav1.ListOptions{ResourceVersion: list.ResourceVersion})
	if err != nil {
		tb.Fatal(err)
	}
	defer w.Stop()
	go func() {
		for ev := range w.ResultChan() {
			if es, ok := ev.Object.(*discoveryv1.EndpointSlice); ok {
				mu.Lock()
				if _, dup := seenAt[es.Name]; !dup {
					seenAt[es.Name] = time.Now()
				}
				mu.Unlock()
			}
		}
	}()
	var conns, apis, seens, progs []time.Duration
	for i := first; i < first+count; i++ {
		vip := netip.MustParseAddr(scaleVIP(i))
		key := datapath.ServiceKey{Addr: datapath.AddrToBE(vip), Port: datapath.PortToBE(80), Proto: 6}
		var programmedAt time.Time
		done := make(chan struct{})
		go func() {
			defer close(done)
			var v datapath.ServiceValue
			for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
				if svcMap.Lookup(&key, &v) == nil && v.Count == 1 {
					programmedAt = time.Now()
					return
				}
				time.Sleep(50 * time.Microsecond)
			}
		}()
		start := time.Now()
		createProbe(tb, c, i, backend)
		apis = append(apis, time.Since(start))
		for !connects(ctx, client, scaleVIP(i)+":80") {
			if time.Since(start) > 30*time.Second {
				tb.Fatalf("service %d never answered", i)
			}
			time.Sleep(time.Millisecond)
		}
		conns = append(conns, time.Since(start))
		<-done
		for {
			mu.Lock()
			at, ok := seenAt[scaleName(i)]
			mu.Unlock()
			if ok {
				seens = append(seens, at.Sub(start))
				progs = append(progs, programmedAt.Sub(at))
				break
			}
			if time.Since(start) > 30*time.Second {
				tb.Fatalf("the watch never saw the slice of service %d", i)
			}
			time.Sleep(time.Millisecond)
		}
	}
	return median(conns), median(apis), median(seens), median(progs)
}

// createProbe creates scale service i with one endpoint, the backend.
func createProbe(tb testing.TB, c kubernetes.Interface, i int, backend string) {
	tb.Helper()
	ctx := context.Background()
	if _, err := c.CoreV1().Services(scaleNS).Create(ctx, scaleService(i), metav1.CreateOptions{}); err != nil {
		tb.Fatal(err)
	}
	if _, err := c.DiscoveryV1().EndpointSlices(scaleNS).Create(ctx, scaleSlice(i, 1, 0, backend), metav1.CreateOptions{}); err != nil {
		tb.Fatal(err)
	}
}

// apiCreateLatency is the median time the API server takes to create a
// Service and its slice while the node's agent is frozen (SIGSTOP), so
// that whatever the agent costs the machine is not in the figure: the
// API server's own share of create -> first connection.
func apiCreateLatency(tb testing.TB, c kubernetes.Interface, n *Node, first, count int, backend string) time.Duration {
	tb.Helper()
	if err := syscall.Kill(n.AgentPID, syscall.SIGSTOP); err != nil {
		tb.Fatal(err)
	}
	defer syscall.Kill(n.AgentPID, syscall.SIGCONT) //nolint:errcheck // the process exists: it was just stopped
	var took []time.Duration
	for i := first; i < first+count; i++ {
		start := time.Now()
		createProbe(tb, c, i, backend)
		took = append(took, time.Since(start))
	}
	return median(took)
}

// connects reports whether a TCP connection from the pod to addr opens
// within 5 ms (before a service exists the node answers with rate-limited
// ICMP errors, so a failed probe may only end at its timeout).
func connects(ctx context.Context, p *Pod, addr string) bool {
	cx, cancel := context.WithTimeout(ctx, 5*time.Millisecond)
	defer cancel()
	conn, err := Dial(cx, p.NetnsPath(), "tcp4", addr)
	if err != nil {
		return false
	}
	conn.Close()
	return true
}

// answers checks that an HTTP GET through addr from the pod gets the
// backend pod's answer (its name).
func answers(p *Pod, addr, backend string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	body, err := Get(ctx, HTTPClient(p.NetnsPath(), 3*time.Second), "http://"+addr+"/")
	if err != nil {
		return err
	}
	if body != backend {
		return fmt.Errorf("answered by %q, want %q", body, backend)
	}
	return nil
}

// bpfMapBytes sums the kernel memory of the BPF maps a process holds (as
// fdinfo's memlock reports it: buckets and the entries in use).
func bpfMapBytes(tb testing.TB, pid int) uint64 {
	tb.Helper()
	dir := fmt.Sprintf("/proc/%d/fdinfo", pid)
	entries, err := os.ReadDir(dir)
	if err != nil {
		tb.Fatal(err)
	}
	seen := map[string]bool{}
	var total uint64
	for _, e := range entries {
		data, err := os.ReadFile(dir + "/" + e.Name())
		if err != nil {
			continue
		}
		var id string
		var mem uint64
		isMap := false
		for _, line := range strings.Split(string(data), "\n") {
			k, v, _ := strings.Cut(line, ":")
			v = strings.TrimSpace(v)
			switch k {
			case "map_id":
				id, isMap = v, true
			case "memlock":
				mem, _ = strconv.ParseUint(v, 10, 64)
			}
		}
		if isMap && !seen[id] {
			seen[id] = true
			total += mem
		}
	}
	return total
}

// TestKubeRestartAt10kServices: 10,000 services of 10 endpoints each on
// the real API server; the agent restarts while services change. After
// it, a sample of 100 services answers through their cluster IPs, the
// changes made while the agent was down are in the datapath, and a
// connection opened before the restart still works. Nine endpoints of each
// service are serving but terminating (on no live pod): they fill the
// backend map as live ones would, while new connections all go to the one
// real backend, so every service must answer.
func TestKubeRestartAt10kServices(t *testing.T) {
	const total, endpoints = 10000, 10
	l, c, web := upScale(t)
	n, client := l.Nodes[0], l.Pod("client")
	ctx := context.Background()
	terminating := discoveryv1.EndpointConditions{Ready: ptr.To(false), Serving: ptr.To(true), Terminating: ptr.To(true)}
	took := createScaleWith(t, c, 0, total, endpoints, web.IP, terminating)
	st := waitServices(t, n, total, 5*time.Minute)
	t.Logf("%d services of %d endpoints created in %s; the agent holds %d, backends map %d entries",
		total, endpoints, took.Round(time.Millisecond), st.Kubernetes.Services, st.Maps[1].Entries)

	// A connection held across the restart.
	echo := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: "default"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"},
			Ports: []corev1.ServicePort{{Name: "echo", Port: 9000, TargetPort: intstr.FromInt32(9000), Protocol: corev1.ProtocolTCP}}}}
	echo, err := c.CoreV1().Services("default").Create(ctx, echo, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var conn net.Conn
	deadline := time.Now().Add(30 * time.Second)
	for {
		cx, cancel := context.WithTimeout(ctx, time.Second)
		conn, err = Dial(cx, client.NetnsPath(), "tcp4", echo.Spec.ClusterIP+":9000")
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("echo service never answered: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	defer conn.Close()
	rd := bufio.NewReader(conn)
	say := func(line string) {
		t.Helper()
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := fmt.Fprintln(conn, line); err != nil {
			t.Fatalf("writing on the held connection: %v", err)
		}
		got, err := rd.ReadString('\n')
		if err != nil || !strings.Contains(got, line) {
			t.Fatalf("held connection answered %q, %v; want an echo of %q", got, err, line)
		}
	}
	say("before")

	// While the agent is down: a service goes, one comes, one changes its
	// endpoints (its real backend replaced by a fake one).
	const gone, added, changed = 17, total, 42
	restart, st := restartAgent(t, l, n, func() {
		if err := c.CoreV1().Services(scaleNS).Delete(ctx, scaleName(gone), metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		createScaleWith(t, c, added, added+1, endpoints, web.IP, terminating)
		s := scaleSliceWith(changed, 1, 0, "10.127.0.1", terminating)
		old, err := c.DiscoveryV1().EndpointSlices(scaleNS).Get(ctx, s.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		s.ResourceVersion = old.ResourceVersion
		if _, err := c.DiscoveryV1().EndpointSlices(scaleNS).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	})
	t.Logf("restarted agent: services written %s after its start (caches synced in %d ms, first pass %s)",
		restart.Round(time.Millisecond), st.Kubernetes.SyncMillis, st.Services.LastTook.Round(time.Millisecond))
	say("after")

	p, err := datapath.OpenPinned(n.PinDir)
	if err != nil {
		t.Fatal(err)
	}
	rows, err := p.Services()
	p.Close()
	if err != nil {
		t.Fatal(err)
	}
	byVIP := map[string]datapath.ServiceRow{}
	for _, r := range rows {
		byVIP[r.Frontend.String()] = r
	}
	if _, ok := byVIP[scaleVIP(gone)+":80"]; ok {
		t.Errorf("service %d, deleted while the agent was down, is still in the datapath", gone)
	}
	if r, ok := byVIP[scaleVIP(added)+":80"]; !ok || len(r.Backends) != 1 || r.Backends[0].Addr.String() != web.IP+":8080" {
		t.Errorf("service %d, created while the agent was down: %+v (in the datapath: %v)", added, r, ok)
	}
	if r := byVIP[scaleVIP(changed)+":80"]; len(r.Backends) != 1 || r.Backends[0].Addr.String() != "10.127.0.1:8080" {
		t.Errorf("service %d, changed while the agent was down: %+v", changed, r)
	}
	// The scale services, less one and plus one, kubernetes and echo.
	if len(byVIP) != total+2 {
		t.Errorf("the datapath has %d frontends, want %d", len(byVIP), total+2)
	}

	// A sample of 100 services answers.
	rng := rand.New(rand.NewPCG(1, 1))
	for range 100 {
		i := rng.IntN(total)
		if i == gone || i == changed {
			continue
		}
		if err := answers(client, scaleVIP(i)+":80", web.Name); err != nil {
			t.Errorf("service %d (%s): %v", i, scaleVIP(i), err)
		}
	}
}
