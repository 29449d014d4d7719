package lab

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/weirnet/weir/core/model"
)

// Two nodes in two zones, a Service with trafficDistribution PreferClose:
// the EndpointSlice controller hints each endpoint for its node's zone,
// and a pod in zone-a reaches only zone-a's backend while it is ready;
// when it is not, every ready backend (zone-b's two); when it is ready
// again, zone-a's alone. `weir service list` says why.
func TestPreferCloseKeepsTrafficInTheZone(t *testing.T) {
	const config = `modules: [endpoints, lb, tunnel]
settings: {tunnel: {protocol: vxlan}}
`
	l, c := upKubeWith(t, config, []NodeSpec{
		{Name: "n1", PodCIDR: "10.244.1.0/24", Labels: map[string]string{model.ZoneLabel: "zone-a"}, Pods: []PodSpec{{Name: "client"}}},
		{Name: "n2", PodCIDR: "10.244.2.0/24", Labels: map[string]string{model.ZoneLabel: "zone-b"}},
	})
	ctx := context.Background()
	for name, node := range map[string]string{"web-a": "n1", "web-b1": "n2", "web-b2": "n2"} {
		p := backendPod(name)
		p.Spec.NodeName = node
		if _, err := c.CoreV1().Pods("default").Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	svc := webService()
	svc.Spec.TrafficDistribution = new(corev1.ServiceTrafficDistributionPreferClose)
	created, err := c.CoreV1().Services("default").Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	url := "http://" + created.Spec.ClusterIP + "/"
	client := l.Pod("client")

	// The controller hints all three once it knows their zones.
	waitFor(t, 60*time.Second, "the slice to hint every endpoint for its zone", func() bool {
		return hintedEndpoints(ctx, c) == 3
	})
	waitFor(t, 30*time.Second, "n1 to choose zone-a's backend", func() bool {
		return serviceWhy(t, l, "n1", created.Spec.ClusterIP) == "zone [1 backends]"
	})
	if got := get(t, client, url, 30); len(got) != 1 || got["web-a"] != 30 {
		t.Fatalf("from zone-a while web-a is ready: %v, want all 30 from web-a", got)
	}

	setReady(t, c, "web-a", false)
	waitFor(t, 60*time.Second, "n1 to fall back to every ready backend", func() bool {
		return serviceWhy(t, l, "n1", created.Spec.ClusterIP) == "all [2 backends]"
	})
	if got := get(t, client, url, 30); got["web-a"] != 0 || got["web-b1"] == 0 || got["web-b2"] == 0 {
		t.Fatalf("from zone-a while web-a is not ready: %v, want zone-b's two only", got)
	}

	setReady(t, c, "web-a", true)
	waitFor(t, 60*time.Second, "n1 to choose zone-a's backend again", func() bool {
		return serviceWhy(t, l, "n1", created.Spec.ClusterIP) == "zone [1 backends]"
	})
	if got := get(t, client, url, 30); len(got) != 1 || got["web-a"] != 30 {
		t.Fatalf("from zone-a once web-a is ready again: %v, want all 30 from web-a", got)
	}
	// n2 in zone-b meanwhile keeps to zone-b's pair.
	if got := serviceWhy(t, l, "n2", created.Spec.ClusterIP); got != "zone [2 backends]" {
		t.Fatalf("n2 serves the ClusterIP with %s, want zone-b's two", got)
	}

	// n1 moves to zone-b (no restart: no pool selects on the zone). Its
	// agent serves zone-b's choice: zone-b's pair, and web-a too if the
	// controller re-zoned web-a's endpoint meanwhile.
	node, err := c.CoreV1().Nodes().Get(ctx, "n1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	node.Labels[model.ZoneLabel] = "zone-b"
	if _, err := c.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "n1 to serve zone-b's choice", func() bool {
		w := serviceWhy(t, l, "n1", created.Spec.ClusterIP)
		return w == "zone [2 backends]" || w == "zone [3 backends]"
	})
	if got := get(t, client, url, 30); got["web-b1"] == 0 || got["web-b2"] == 0 {
		t.Fatalf("from n1 in zone-b: %v, want zone-b's pair among them", got)
	}
}

// hintedEndpoints counts the ready endpoints of web's slices whose zone
// hint names their own zone.
func hintedEndpoints(ctx context.Context, c kubernetes.Interface) int {
	list, err := c.DiscoveryV1().EndpointSlices("default").List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=web"})
	if err != nil {
		return 0
	}
	n := 0
	for _, s := range list.Items {
		for _, e := range s.Endpoints {
			if e.Zone != nil && e.Hints != nil && len(e.Hints.ForZones) == 1 && e.Hints.ForZones[0].Name == *e.Zone {
				n++
			}
		}
	}
	return n
}

// serviceWhy is what `weir service list` says of the ClusterIP's port 80
// on a node: why and how many backends.
func serviceWhy(t *testing.T, l *Lab, node, clusterIP string) string {
	t.Helper()
	for _, r := range serviceRows(t, l.Node(node)) {
		if r.Frontend.String() == clusterIP+":80" {
			return fmt.Sprintf("%s [%d backends]", r.Selected, len(r.Backends))
		}
	}
	return "absent"
}

// setReady reports a pod ready or not, as a kubelet's readiness probe
// would (the lab's kubelet reports it once and leaves it).
func setReady(t *testing.T, c kubernetes.Interface, name string, ready bool) {
	t.Helper()
	ctx := context.Background()
	p, err := c.CoreV1().Pods("default").Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	status := corev1.ConditionFalse
	if ready {
		status = corev1.ConditionTrue
	}
	for i, cond := range p.Status.Conditions {
		if cond.Type == corev1.PodReady || cond.Type == corev1.ContainersReady {
			p.Status.Conditions[i].Status = status
			p.Status.Conditions[i].LastTransitionTime = metav1.Now()
		}
	}
	for i := range p.Status.ContainerStatuses {
		p.Status.ContainerStatuses[i].Ready = ready
	}
	if _, err := c.CoreV1().Pods("default").UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("pod %s ready=%v: %v", name, ready, err)
	}
}
