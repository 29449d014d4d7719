package k8ssource_test

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"

	"github.com/weirnet/weir/core/k8ssource"
	"github.com/weirnet/weir/core/kube"
	"github.com/weirnet/weir/core/lab/controlplane"
	"github.com/weirnet/weir/core/lab/controlplane/cptest"
	"github.com/weirnet/weir/core/lbmap"
	"github.com/weirnet/weir/core/model"
)

// selectorless creates a service without selector, so the test owns its
// EndpointSlices (the EndpointSlice controller leaves those alone).
func selectorless(t *testing.T, c kubernetes.Interface, ns, name, clusterIP string, mutate ...func(*corev1.Service)) {
	t.Helper()
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.ServiceSpec{
			ClusterIP: clusterIP,
			Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP},
			},
		},
	}
	for _, m := range mutate {
		m(svc)
	}
	if _, err := c.CoreV1().Services(ns).Create(context.Background(), svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

type ep struct {
	ip                          string
	ready, serving, terminating *bool
	node                        string
}

func slice(t *testing.T, c kubernetes.Interface, ns, svc, name string, eps ...ep) {
	t.Helper()
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](8080), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}
	for _, e := range eps {
		d := discoveryv1.Endpoint{Addresses: []string{e.ip}, Conditions: discoveryv1.EndpointConditions{Ready: e.ready, Serving: e.serving, Terminating: e.terminating}}
		if e.node != "" {
			d.NodeName = ptr.To(e.node)
		}
		s.Endpoints = append(s.Endpoints, d)
	}
	ctx := context.Background()
	if old, err := c.DiscoveryV1().EndpointSlices(ns).Get(ctx, name, metav1.GetOptions{}); err == nil {
		s.ResourceVersion = old.ResourceVersion
		if _, err := c.DiscoveryV1().EndpointSlices(ns).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		return
	}
	if _, err := c.DiscoveryV1().EndpointSlices(ns).Create(ctx, s, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func namespace(t *testing.T, c kubernetes.Interface, name string) {
	t.Helper()
	if _, err := c.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// describe renders the store's services of one namespace in one
// comparable string (the tests share a cluster).
func describe(snap *model.Snapshot, ns string) string {
	var b strings.Builder
	for _, s := range snap.Services {
		if s.Name.Namespace != ns {
			continue
		}
		for _, f := range s.Frontends {
			fmt.Fprintf(&b, "%s %s/%s:", s.Name, f.Addr, f.Proto)
			for _, be := range f.Backends {
				fmt.Fprintf(&b, " %s/%s", be.Addr, be.State)
			}
			b.WriteString("\n")
		}
	}
	return b.String()
}

func waitSnapshot(t *testing.T, store *model.Store, ns, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	var got string
	for time.Now().Before(deadline) {
		snap, _, auth := store.Snapshot()
		got = describe(snap, ns)
		if auth && got == want {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("store never showed\n%s\nlast:\n%s", want, got)
}

// reader is the agent's client of a control plane (tests write with a
// clientset).
func reader(t *testing.T, cp *controlplane.ControlPlane) *kube.Client {
	t.Helper()
	rc, err := kube.New(cp.RestConfig())
	if err != nil {
		t.Fatal(err)
	}
	return rc
}

func run(t *testing.T, c *kube.Client, node string) (*k8ssource.Source, *model.Store) {
	t.Helper()
	store := model.NewStore()
	src := k8ssource.New(c, node, store, slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { src.Run(ctx) })
	t.Cleanup(func() { cancel(); wg.Wait() })
	return src, store
}

// One control plane for the package's API tests; each test works in its
// own namespaces and address range.
func TestSourceAgainstAPIServer(t *testing.T) {
	cp := cptest.Start(t)
	c := cptest.Client(t, cp)
	r := reader(t, cp)

	t.Run("follows services and endpoint conditions", func(t *testing.T) {
		namespace(t, c, "follow")
		// Created before the source starts: part of the first sync.
		selectorless(t, c, "follow", "web", "10.96.1.10")
		slice(t, c, "follow", "web", "web-1", ep{ip: "10.244.1.11"}, ep{ip: "10.244.1.12", ready: ptr.To(true)})
		_, store := run(t, r, "n1")
		waitSnapshot(t, store, "follow", "follow/web 10.96.1.10:80/TCP: 10.244.1.11:8080/active 10.244.1.12:8080/active\n")

		// Not ready: gone; serving and terminating: kept as terminating.
		slice(t, c, "follow", "web", "web-1",
			ep{ip: "10.244.1.11", ready: ptr.To(false), serving: ptr.To(true), terminating: ptr.To(true)},
			ep{ip: "10.244.1.12", ready: ptr.To(false)},
			ep{ip: "10.244.1.13"})
		waitSnapshot(t, store, "follow", "follow/web 10.96.1.10:80/TCP: 10.244.1.11:8080/terminating 10.244.1.13:8080/active\n")

		// A second slice adds to the same service.
		slice(t, c, "follow", "web", "web-2", ep{ip: "10.244.2.11"})
		waitSnapshot(t, store, "follow", "follow/web 10.96.1.10:80/TCP: 10.244.1.11:8080/terminating 10.244.1.13:8080/active 10.244.2.11:8080/active\n")

		if err := c.CoreV1().Services("follow").Delete(context.Background(), "web", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitSnapshot(t, store, "follow", "")
	})

	t.Run("filters as kube-proxy does", func(t *testing.T) {
		namespace(t, c, "filter")
		selectorless(t, c, "filter", "mine", "10.96.2.10")
		slice(t, c, "filter", "mine", "mine-1", ep{ip: "10.244.1.21"})
		// Another proxy serves this one.
		selectorless(t, c, "filter", "other", "10.96.2.11", func(s *corev1.Service) {
			s.Labels = map[string]string{"service.kubernetes.io/service-proxy-name": "somebody-else"}
		})
		slice(t, c, "filter", "other", "other-1", ep{ip: "10.244.1.22"})
		// Headless: nothing to translate.
		selectorless(t, c, "filter", "headless", "None")
		slice(t, c, "filter", "headless", "headless-1", ep{ip: "10.244.1.23"})
		_, store := run(t, r, "n1")
		waitSnapshot(t, store, "filter", "filter/mine 10.96.2.10:80/TCP: 10.244.1.21:8080/active\n")
	})

	t.Run("service types, policies and affinity", func(t *testing.T) {
		namespace(t, c, "types")
		selectorless(t, c, "types", "lb", "10.96.3.10", func(s *corev1.Service) {
			s.Spec.Type = corev1.ServiceTypeLoadBalancer
			s.Spec.ExternalIPs = []string{"192.0.2.10"}
			s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
			s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
		})
		slice(t, c, "types", "lb", "lb-1", ep{ip: "10.244.1.31", node: "n1"}, ep{ip: "10.244.2.31", node: "n2"})
		lb, err := c.CoreV1().Services("types").Get(context.Background(), "lb", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		lb.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: "198.51.100.10"}}
		if _, err := c.CoreV1().Services("types").UpdateStatus(context.Background(), lb, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		_, store := run(t, r, "n1")
		nodePort := lb.Spec.Ports[0].NodePort
		want := "types/lb 0.0.0.0:" + fmt.Sprint(nodePort) + "/TCP: 10.244.1.31:8080/active 10.244.2.31:8080/active\n" +
			"types/lb 10.96.3.10:80/TCP: 10.244.1.31:8080/active 10.244.2.31:8080/active\n" +
			"types/lb 192.0.2.10:80/TCP: 10.244.1.31:8080/active 10.244.2.31:8080/active\n" +
			"types/lb 198.51.100.10:80/TCP: 10.244.1.31:8080/active 10.244.2.31:8080/active\n"
		// The store sorts frontends inside a service as the model keeps
		// them; compare as sets of lines.
		waitLines(t, store, "types", want)
		snap, _, _ := store.Snapshot()
		var svc *model.Service
		for _, s := range snap.Services {
			if s.Name.Namespace == "types" {
				svc = s
			}
		}
		if svc.AffinityTimeout != 10800 {
			t.Errorf("affinity timeout %d, want 10800", svc.AffinityTimeout)
		}
		for _, f := range svc.Frontends {
			if (f.Type != model.ClusterIP) != f.ExternalLocal || f.InternalLocal {
				t.Errorf("%v %s: ExternalLocal=%v InternalLocal=%v", f.Type, f.Addr, f.ExternalLocal, f.InternalLocal)
			}
		}
	})

	t.Run("a shared external IP belongs to the older service", func(t *testing.T) {
		namespace(t, c, "shared")
		ext := func(s *corev1.Service) { s.Spec.ExternalIPs = []string{"192.0.2.50"} }
		// Created within one second the two have the same creation time:
		// the names, in order, settle it the same way.
		selectorless(t, c, "shared", "a-old", "10.96.6.10", ext)
		selectorless(t, c, "shared", "b-young", "10.96.6.11", ext)
		_, store := run(t, r, "n1")
		waitSnapshot(t, store, "shared", "shared/a-old 10.96.6.10:80/TCP:\nshared/a-old 192.0.2.50:80/TCP:\nshared/b-young 10.96.6.11:80/TCP:\n")
		// The owner goes: the other claimant takes the address over.
		if err := c.CoreV1().Services("shared").Delete(context.Background(), "a-old", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitSnapshot(t, store, "shared", "shared/b-young 10.96.6.11:80/TCP:\nshared/b-young 192.0.2.50:80/TCP:\n")
	})

	t.Run("a service the datapath cannot hold waits for room", func(t *testing.T) {
		namespace(t, c, "full")
		selectorless(t, c, "full", "big", "10.96.7.11")
		slice(t, c, "full", "big", "big-1", ep{ip: "10.244.1.72"}, ep{ip: "10.244.1.73"}, ep{ip: "10.244.1.74"})
		selectorless(t, c, "full", "small", "10.96.7.10")
		slice(t, c, "full", "small", "small-1", ep{ip: "10.244.1.71"})
		// big takes 4 entries, small 2: 6 of 5. Services refused one by
		// one go in name order: big fits, small waits.
		store := model.NewStore()
		store.SetAdmitter(inNamespace{"full", lbmap.NewAdmission("n1", lbmap.Limits{Services: 5})})
		src := k8ssource.New(r, "n1", store, slog.New(slog.DiscardHandler))
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		wg.Go(func() { src.Run(ctx) })
		defer func() { cancel(); wg.Wait() }()
		waitSnapshot(t, store, "full", "full/big 10.96.7.11:80/TCP: 10.244.1.72:8080/active 10.244.1.73:8080/active 10.244.1.74:8080/active\n")
		if st := src.Stats(); st.Refused != 1 || st.LastError != "full/small: weir_services would need 6 entries, more than the 5 it holds: raise datapath.servicesMaxEntries" {
			t.Fatalf("stats %+v; want small refused for room", st)
		}
		if err := c.CoreV1().Services("full").Delete(context.Background(), "big", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitSnapshot(t, store, "full", "full/small 10.96.7.10:80/TCP: 10.244.1.71:8080/active\n")
		if st := src.Stats(); st.Refused != 0 {
			t.Fatalf("stats %+v; want nothing refused once room was made", st)
		}
	})

	t.Run("node labels reach the callback", func(t *testing.T) {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n-labels", Labels: map[string]string{"pool": "a"}},
			Spec: corev1.NodeSpec{PodCIDR: "10.244.7.0/24", PodCIDRs: []string{"10.244.7.0/24"}}}
		if _, err := c.CoreV1().Nodes().Create(context.Background(), node, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		store := model.NewStore()
		src := k8ssource.New(r, "n-labels", store, slog.New(slog.DiscardHandler))
		seen := make(chan string, 10)
		src.OnNode(func(n *corev1.Node) { seen <- n.Labels["pool"] })
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		wg.Go(func() { src.Run(ctx) })
		defer func() { cancel(); wg.Wait() }()
		expect := func(want string) {
			t.Helper()
			select {
			case got := <-seen:
				if got != want {
					t.Fatalf("pool label %q, want %q", got, want)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("no node callback for pool %q", want)
			}
		}
		expect("a")
		n, _ := c.CoreV1().Nodes().Get(context.Background(), "n-labels", metav1.GetOptions{})
		n.Labels["pool"] = "b"
		if _, err := c.CoreV1().Nodes().Update(context.Background(), n, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		expect("b")
		if got := src.Node(); got == nil || got.Spec.PodCIDRs[0] != "10.244.7.0/24" {
			t.Fatalf("Node() = %v", got)
		}
	})
}

// inNamespace admits the services of one namespace through a, and the
// others (of the tests that share the cluster) without counting them.
type inNamespace struct {
	ns string
	a  model.Admitter
}

func (f inNamespace) Admit(cs []model.Change) (func(), error) {
	var mine []model.Change
	for _, c := range cs {
		if n := cmp.Or(c.Old, c.New); n.Name.Namespace == f.ns {
			mine = append(mine, c)
		}
	}
	if len(mine) == 0 {
		return func() {}, nil
	}
	return f.a.Admit(mine)
}

func waitLines(t *testing.T, store *model.Store, ns, want string) {
	t.Helper()
	norm := func(s string) map[string]bool {
		m := map[string]bool{}
		for _, l := range strings.Split(strings.TrimSpace(s), "\n") {
			m[l] = true
		}
		return m
	}
	deadline := time.Now().Add(10 * time.Second)
	var got string
	for time.Now().Before(deadline) {
		snap, _, auth := store.Snapshot()
		got = describe(snap, ns)
		if auth && fmt.Sprint(norm(got)) == fmt.Sprint(norm(want)) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("store never showed\n%s\nlast:\n%s", want, got)
}

// An API that does not answer leaves the store not authoritative (so the
// datapath keeps what it has), and the source stops cleanly.
func TestSourceWithUnreachableAPI(t *testing.T) {
	c, err := kube.New(&rest.Config{Host: "https://127.0.0.1:1", Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	store := model.NewStore()
	src := k8ssource.New(c, "n1", store, slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { src.Run(ctx); close(done) }()
	time.Sleep(1500 * time.Millisecond)
	if _, _, auth := store.Snapshot(); auth {
		t.Fatal("store became authoritative without the API")
	}
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
}
