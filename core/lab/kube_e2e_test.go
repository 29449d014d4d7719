package lab

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/weirnet/weir/core/api"
	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/lab/controlplane"
	"github.com/weirnet/weir/core/netns"
)

// kubeAgentConfig has a pool that changes a setting, to see a node move.
const kubeAgentConfig = `modules: [endpoints, lb]
datapath: {ctMaxEntries: 65536}
settings:
  endpoints: {staleAfter: 1s}
nodePools:
  - name: jumbo
    nodeSelector: {matchLabels: {weir.dev/mtu: jumbo}}
    settings:
      endpoints: {mtu: 9000}
`

// upKube brings up a lab with a real control plane and one node running a
// client pod.
func upKube(t testing.TB) (*Lab, kubernetes.Interface) {
	return upKubeWith(t, kubeAgentConfig, []NodeSpec{{Name: "n1", PodCIDR: "10.244.1.0/24", Pods: []PodSpec{{Name: "client"}}}})
}

func upKubeWith(t testing.TB, config string, nodes []NodeSpec) (*Lab, kubernetes.Interface) {
	t.Helper()
	if _, err := controlplane.FindBinaries(); err != nil {
		t.Fatalf("%v (make test builds them)", err)
	}
	cfg := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(cfg, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	spec := &Spec{Name: newLabName(), Kubernetes: true, AgentConfig: cfg, Nodes: nodes}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	l, err := Up(ctx, spec, Options{AgentBinary: bin.agent, ServeBinary: bin.weir, CNIBinDir: filepath.Dir(bin.weir),
		StateRoot: testStateRoot, PinRoot: testPinRoot})
	if err != nil {
		t.Fatalf("lab up: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range l.Nodes {
				t.Logf("agent log of %s:\n%s", n.Name, tailFile(n.Log, 40))
				t.Logf("kubelet log of %s:\n%s", n.Name, tailFile(filepath.Join(filepath.Dir(n.StateDir), "kubelet.log"), 20))
			}
		}
		if err := l.Down(); err != nil {
			t.Errorf("lab down: %v", err)
		}
		assertGone(t, l)
	})
	c, err := l.Kube()
	if err != nil {
		t.Fatal(err)
	}
	return l, c
}

func tailFile(p string, n int) string {
	data, _ := os.ReadFile(p)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// backendPod is a Deployment-like replica: labelled, bound to the node,
// serving HTTP and a line echo.
func backendPod(name string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", Labels: map[string]string{"app": "web"}},
		Spec: corev1.PodSpec{NodeName: "n1", Containers: []corev1.Container{{
			Name: "web", Image: "weir.dev/lab-workload", Args: []string{"--http=8080", "--echo=9000"},
		}}},
	}
}

func webService() *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "default"},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "web"},
			Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP},
				{Name: "echo", Port: 9000, TargetPort: intstr.FromInt32(9000), Protocol: corev1.ProtocolTCP},
			},
		},
	}
}

func createService(t *testing.T, c kubernetes.Interface) string {
	t.Helper()
	svc, err := c.CoreV1().Services("default").Create(context.Background(), webService(), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return svc.Spec.ClusterIP
}

// reach waits until the ClusterIP answers, then sends n requests and
// counts the answering pods.
func reach(t *testing.T, client *Pod, url string, n int) map[string]int {
	t.Helper()
	c := HTTPClient(client.NetnsPath(), 2*time.Second)
	waitFor(t, 30*time.Second, url+" to answer", func() bool {
		_, err := Get(context.Background(), c, url)
		return err == nil
	})
	return get(t, client, url, n)
}

func TestKubernetesEndToEnd(t *testing.T) {
	l, c := upKube(t)
	ctx := context.Background()
	client := l.Pod("client")
	for _, n := range []string{"web-1", "web-2", "web-3"} {
		if _, err := c.CoreV1().Pods("default").Create(ctx, backendPod(n), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	vip := createService(t, c)
	url := "http://" + vip + "/"

	t.Run("every ready backend is reached", func(t *testing.T) {
		waitFor(t, 60*time.Second, "three ready backends", func() bool {
			got := reach(t, client, url, 30)
			return len(got) == 3
		})
	})

	t.Run("scale down and unready get no new flows", func(t *testing.T) {
		grace := int64(0)
		if err := c.CoreV1().Pods("default").Delete(ctx, "web-3", metav1.DeleteOptions{GracePeriodSeconds: &grace}); err != nil {
			t.Fatal(err)
		}
		pod, err := c.CoreV1().Pods("default").Get(ctx, "web-2", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for i, cond := range pod.Status.Conditions {
			if cond.Type == corev1.PodReady || cond.Type == corev1.ContainersReady {
				pod.Status.Conditions[i].Status = corev1.ConditionFalse
			}
		}
		if _, err := c.CoreV1().Pods("default").UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		// Until the slices reach the agent, a new flow may still pick the
		// pod that was killed at once (grace 0): tolerate failures while
		// converging, then require every request to succeed.
		waitFor(t, 30*time.Second, "only web-1 to answer", func() bool {
			got, failed := tryGet(client, url, 20)
			return failed == 0 && got["web-1"] == 20
		})
		if got := get(t, client, url, 100); got["web-1"] != 100 {
			t.Fatalf("after scale-down and unready: %v", got)
		}
	})

	t.Run("a deleted service is unreachable", func(t *testing.T) {
		if err := c.CoreV1().Services("default").Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		hc := HTTPClient(client.NetnsPath(), time.Second)
		waitFor(t, 30*time.Second, "the service to stop answering", func() bool {
			_, err := Get(ctx, hc, url)
			return err != nil
		})
	})

	t.Run("an endpoint whose pod is gone is collected", func(t *testing.T) {
		// A pod wired by a runtime that then lost it (no CNI DEL came).
		nsName := l.Spec.Name + "-ghost"
		path, err := netns.Create(nsName)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = netns.Delete(nsName) })
		agent := l.Nodes[0].Client()
		if _, err := agent.CreateEndpoint(ctx, api.EndpointRequest{ID: "ghost", Netns: path, Address: "10.244.1.200",
			PodNamespace: "default", PodName: "ghost"}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 15*time.Second, "the ghost endpoint to be collected", func() bool {
			_, err := agent.Endpoint(ctx, "ghost")
			return err != nil
		})
		// The endpoints of pods that exist stay.
		eps, err := agent.Endpoints(ctx)
		if err != nil {
			t.Fatal(err)
		}
		live := map[string]bool{}
		for _, e := range eps {
			live[e.PodName] = true
		}
		if !live["client"] || !live["web-1"] || !live["web-2"] {
			t.Fatalf("endpoints of live pods were collected: %v", live)
		}
	})

	// Back to a service with a live connection for the restarts.
	vip = createService(t, c)
	conn := echoConn(t, client, vip)

	t.Run("agent restart keeps an established connection", func(t *testing.T) {
		conn.say("before restart")
		if err := l.StopAgent("n1"); err != nil {
			t.Fatal(err)
		}
		conn.say("agent down")
		if err := l.StartAgent(ctx, "n1"); err != nil {
			t.Fatal(err)
		}
		conn.say("agent back")
	})

	t.Run("a node label change moves the node to another pool", func(t *testing.T) {
		node, err := c.CoreV1().Nodes().Get(ctx, "n1", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		node.Labels["weir.dev/mtu"] = "jumbo"
		if _, err := c.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 60*time.Second, "the agent to run pool jumbo", func() bool {
			st, err := l.Nodes[0].Client().Status(ctx)
			return err == nil && st.Pool == "jumbo" && st.Ready
		})
		conn.say("after the pool change")
		// The new setting applies to new pods.
		if _, err := c.CoreV1().Pods("default").Create(ctx, backendPod("web-4"), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		p := &Pod{Name: "web-4", Namespace: "default"}
		if err := l.WaitPodRunning(ctx, c, p); err != nil {
			t.Fatal(err)
		}
		if mtu := linkMTU(t, p.NetnsPath(), "eth0"); mtu != 9000 {
			t.Fatalf("pod created in pool jumbo has MTU %d, want 9000", mtu)
		}
		if log := tailFile(l.Nodes[0].Log, 400); !strings.Contains(log, "changed; applying the new module set live") || !strings.Contains(log, "module set applied live") || !strings.Contains(log, "pool=jumbo") {
			t.Fatalf("the agent did not log the new set:\n%s", log)
		}
	})
	conn.close()
}

func linkMTU(t *testing.T, nsPath, name string) int {
	t.Helper()
	h, err := netns.Handle(nsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	return l.Attrs().MTU
}

// echo is a long-lived connection to the service's echo port that must
// keep its backend.
type echo struct {
	t       *testing.T
	c       net.Conn
	rd      *bufio.Reader
	backend string
}

func echoConn(t *testing.T, client *Pod, vip string) *echo {
	t.Helper()
	var c net.Conn
	waitFor(t, 30*time.Second, "the echo port to accept", func() bool {
		var err error
		c, err = Dial(context.Background(), client.NetnsPath(), "tcp4", net.JoinHostPort(vip, "9000"))
		return err == nil
	})
	return &echo{t: t, c: c, rd: bufio.NewReader(c)}
}

func (e *echo) say(line string) {
	e.t.Helper()
	_ = e.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintln(e.c, line); err != nil {
		e.t.Fatalf("writing %q: %v", line, err)
	}
	ans, err := e.rd.ReadString('\n')
	if err != nil {
		e.t.Fatalf("reading the answer to %q: %v", line, err)
	}
	who, echoed, _ := strings.Cut(strings.TrimSpace(ans), ": ")
	if echoed != line {
		e.t.Fatalf("answer %q to %q", ans, line)
	}
	if e.backend == "" {
		e.backend = who
	} else if who != e.backend {
		e.t.Fatalf("the connection moved from %s to %s", e.backend, who)
	}
}

func (e *echo) close() { e.c.Close() }

// Two nodes on a real control plane: the agents learn the nodes (and so
// the ipcache) from Node objects, pods on n2 serve a client on n1 through
// the tunnel, and relabelling n2 into the native pool changes how n1
// reaches it, with traffic flowing on.
func TestKubernetesMultiNode(t *testing.T) {
	const config = `modules: [endpoints, lb, masquerade, tunnel]
settings: {tunnel: {protocol: geneve}}
nodePools:
  - name: native
    nodeSelector: {matchLabels: {weir.dev/forwarding: native}}
    modules: {disable: [tunnel], enable: [nativerouting]}
`
	l, c := upKubeWith(t, config, []NodeSpec{
		{Name: "n1", PodCIDR: "10.244.1.0/24", Pods: []PodSpec{{Name: "client"}}},
		{Name: "n2", PodCIDR: "10.244.2.0/24"},
	})
	ctx := context.Background()
	for _, n := range []string{"web-1", "web-2"} {
		p := backendPod(n)
		p.Spec.NodeName = "n2"
		if _, err := c.CoreV1().Pods("default").Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	vip := createService(t, c)
	client := l.Pod("client")
	waitFor(t, 60*time.Second, "both pods on n2 to answer", func() bool {
		return len(reach(t, client, "http://"+vip+"/", 20)) == 2
	})
	via := func() string {
		p, err := datapath.OpenPinned(l.Node("n1").PinDir)
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		rows, err := p.IPCache()
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rows {
			if r.Prefix.String() == "10.244.2.0/24" {
				return r.Via + " via " + r.NodeIP.String()
			}
		}
		return "absent"
	}
	if got := via(); got != "tunnel via "+l.Node("n2").IP {
		t.Fatalf("n1 reaches n2's pods %s", got)
	}
	conn := echoConn(t, client, vip)
	defer conn.close()
	conn.say("over geneve")
	// The kubernetes service is backed by the control plane on the
	// underlay, off the pod network: pods reach it through masquerade.
	apiFromPod(t, client)

	node, err := c.CoreV1().Nodes().Get(ctx, "n2", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	node.Labels["weir.dev/forwarding"] = "native"
	if _, err := c.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 60*time.Second, "n2 to run the native pool and n1 to reach it natively", func() bool {
		st, err := l.Node("n2").Client().Status(ctx)
		return err == nil && st.Pool == "native" && st.Ready && via() == "native via "+l.Node("n2").IP
	})
	// The relabel moved n2 between tunnel and native routing in its
	// running agent.
	if log := tailFile(l.Node("n2").Log, 400); !strings.Contains(log, "module set applied live") || !strings.Contains(log, "pool=native") {
		t.Fatalf("n2 did not apply the native pool live:\n%s", log)
	}
	conn.say("natively now")
	if got := get(t, client, "http://"+vip+"/", 20); len(got) != 2 {
		t.Fatalf("after the move: %v", got)
	}
	apiFromPod(t, client)
}

// apiFromPod asks the API server for its version through the kubernetes
// service's ClusterIP (10.96.0.1:443) from a pod.
func apiFromPod(t *testing.T, p *Pod) {
	t.Helper()
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return Dial(ctx, p.NetnsPath(), network, addr)
		},
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true}, // the lab's self-signed serving certificate
		DisableKeepAlives: true,
	}
	c := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	resp, err := c.Get("https://10.96.0.1:443/version")
	if err != nil {
		t.Fatalf("%s -> the kubernetes service: %v", p.Name, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"gitVersion"`) {
		t.Fatalf("%s -> the kubernetes service: HTTP %d %s", p.Name, resp.StatusCode, body)
	}
}

// tryGet is get without failing the test: it counts failed requests.
func tryGet(p *Pod, url string, n int) (map[string]int, int) {
	c := HTTPClient(p.NetnsPath(), 2*time.Second)
	out, failed := map[string]int{}, 0
	for range n {
		who, err := Get(context.Background(), c, url)
		if err != nil {
			failed++
			continue
		}
		out[who]++
	}
	return out, failed
}
