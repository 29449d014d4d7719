package k8ssource

import (
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/datapath/dptest"
	"github.com/weirnet/weir/core/lbmap"
	"github.com/weirnet/weir/core/model"
)

// kpEndpoint is an endpoint of kube-proxy's categorisation tests
// (BaseEndpointInfo): ready implies serving, as for a real pod.
type kpEndpoint struct {
	addr                        string
	zones, nodes                []string
	ready, serving, terminating bool
	local                       bool
}

// kpCase is a case of TestCategorizeEndpoints (k8s.io/kubernetes v1.34
// pkg/proxy/topology_test.go). cluster and local are the endpoints each
// policy uses; nil means the service does not use that kind. why is the
// selection Weir shows for cluster-wide traffic.
type kpCase struct {
	name                string
	node, zone          string
	iTPLocal, eTPLocal  bool
	nodePort            bool
	endpoints           []kpEndpoint
	cluster, local, all []string
	onlyRemote          bool
	why                 string
}

// Every case of kube-proxy's TestCategorizeEndpoints, with its endpoints
// as a Service and an EndpointSlice: converted as the Kubernetes source
// converts them, written to real maps by core's reconciler, and read back
// as `weir service list` reads them. Each scope must use exactly the
// endpoints kube-proxy uses for that traffic, and a service with no usable
// endpoint anywhere is rejected while one with only remote ones is not.
func TestCategorizeEndpointsAsKubeProxy(t *testing.T) {
	z := func(s ...string) []string { return s }
	r := func(addr string, zones ...string) kpEndpoint {
		return kpEndpoint{addr: addr, zones: zones, ready: true}
	}
	rl := func(addr string, zones ...string) kpEndpoint {
		return kpEndpoint{addr: addr, zones: zones, ready: true, local: true}
	}
	rn := func(addr, zone, node string) kpEndpoint {
		return kpEndpoint{addr: addr, zones: z(zone), nodes: z(node), ready: true}
	}
	cases := []kpCase{{
		name: "should use topology since all endpoints have hints, node has a zone label and and there are endpoints for the node's zone",
		zone: "zone-a",
		endpoints: []kpEndpoint{
			r("10.1.2.3:80", "zone-a"), r("10.1.2.4:80", "zone-b"), r("10.1.2.5:80", "zone-c"), r("10.1.2.6:80", "zone-a"),
		},
		cluster: z("10.1.2.3:80", "10.1.2.6:80"), why: "zone",
	}, {
		name: "externalTrafficPolicy: Local, topology ignored for Local endpoints",
		zone: "zone-a", eTPLocal: true, nodePort: true,
		endpoints: []kpEndpoint{
			rl("10.1.2.3:80", "zone-a"), rl("10.1.2.4:80", "zone-b"), r("10.1.2.5:80", "zone-c"), r("10.1.2.6:80", "zone-a"),
		},
		cluster: z("10.1.2.3:80", "10.1.2.6:80"), local: z("10.1.2.3:80", "10.1.2.4:80"),
		all: z("10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"), why: "zone",
	}, {
		name: "internalTrafficPolicy: Local, topology ignored for Local endpoints",
		zone: "zone-a", iTPLocal: true, nodePort: true,
		endpoints: []kpEndpoint{
			rl("10.1.2.3:80", "zone-a"), rl("10.1.2.4:80", "zone-b"), r("10.1.2.5:80", "zone-c"), r("10.1.2.6:80", "zone-a"),
		},
		cluster: z("10.1.2.3:80", "10.1.2.6:80"), local: z("10.1.2.3:80", "10.1.2.4:80"),
		all: z("10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"), why: "zone",
	}, {
		name:      "empty node labels",
		endpoints: []kpEndpoint{r("10.1.2.3:80", "zone-a")},
		cluster:   z("10.1.2.3:80"), why: "all",
	}, {
		name:      "empty zone label",
		zone:      "",
		endpoints: []kpEndpoint{r("10.1.2.3:80", "zone-a")},
		cluster:   z("10.1.2.3:80"), why: "all",
	}, {
		name:      "node in different zone, no endpoint filtering",
		zone:      "zone-b",
		endpoints: []kpEndpoint{r("10.1.2.3:80", "zone-a")},
		cluster:   z("10.1.2.3:80"), why: "all",
	}, {
		name: "unready endpoint",
		zone: "zone-a",
		endpoints: []kpEndpoint{
			r("10.1.2.3:80", "zone-a"), r("10.1.2.4:80", "zone-b"), r("10.1.2.5:80", "zone-c"),
			{addr: "10.1.2.6:80", zones: z("zone-a")},
		},
		cluster: z("10.1.2.3:80"), why: "zone",
	}, {
		name: "only unready endpoints in same zone (should not filter)",
		zone: "zone-a",
		endpoints: []kpEndpoint{
			{addr: "10.1.2.3:80", zones: z("zone-a")}, r("10.1.2.4:80", "zone-b"), r("10.1.2.5:80", "zone-c"),
			{addr: "10.1.2.6:80", zones: z("zone-a")},
		},
		cluster: z("10.1.2.4:80", "10.1.2.5:80"), why: "all",
	}, {
		name: "missing hints, no filtering applied",
		zone: "zone-a",
		endpoints: []kpEndpoint{
			r("10.1.2.3:80", "zone-a"), r("10.1.2.4:80", "zone-b"), r("10.1.2.5:80"), r("10.1.2.6:80", "zone-a"),
		},
		cluster: z("10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"), why: "all",
	}, {
		name: "multiple hints per endpoint, filtering includes any endpoint with zone included",
		zone: "zone-c",
		endpoints: []kpEndpoint{
			r("10.1.2.3:80", "zone-a", "zone-b", "zone-c"), r("10.1.2.4:80", "zone-b", "zone-c"),
			r("10.1.2.5:80", "zone-b", "zone-d"), r("10.1.2.6:80", "zone-c"),
		},
		cluster: z("10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"), why: "zone",
	}, {
		// kube-proxy's case runs with the PreferSameTrafficDistribution
		// gate off, and gets the zone's two. Weir follows 1.34's default
		// (the gate on), which is the next case.
		name: "PreferSameNode falls back to same-zone when feature gate disabled (gate on, as 1.34's default)",
		node: "node-1", zone: "zone-a",
		endpoints: []kpEndpoint{
			rn("10.1.2.3:80", "zone-a", "node-1"), rn("10.1.2.4:80", "zone-b", "node-2"),
			rn("10.1.2.5:80", "zone-c", "node-3"), rn("10.1.2.6:80", "zone-a", "node-4"),
		},
		cluster: z("10.1.2.3:80"), why: "node",
	}, {
		name: "PreferSameNode available",
		node: "node-1", zone: "zone-a",
		endpoints: []kpEndpoint{
			rn("10.1.2.3:80", "zone-a", "node-1"), rn("10.1.2.4:80", "zone-b", "node-2"),
			rn("10.1.2.5:80", "zone-c", "node-3"), rn("10.1.2.6:80", "zone-a", "node-4"),
		},
		cluster: z("10.1.2.3:80"), why: "node",
	}, {
		name: "PreferSameNode ignored if some endpoints unhinted",
		node: "node-1", zone: "zone-a",
		endpoints: []kpEndpoint{
			rn("10.1.2.3:80", "zone-a", "node-1"), r("10.1.2.4:80"),
			rn("10.1.2.5:80", "zone-c", "node-3"), rn("10.1.2.6:80", "zone-a", "node-4"),
		},
		cluster: z("10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"), why: "all",
	}, {
		name: "PreferSameNode falls back to PreferSameZone if no endpoint for node",
		node: "node-0", zone: "zone-a",
		endpoints: []kpEndpoint{
			rn("10.1.2.3:80", "zone-a", "node-1"), rn("10.1.2.4:80", "zone-b", "node-2"),
			rn("10.1.2.5:80", "zone-c", "node-3"), rn("10.1.2.6:80", "zone-a", "node-4"),
		},
		cluster: z("10.1.2.3:80", "10.1.2.6:80"), why: "zone",
	}, {
		name: "conflicting topology and localness require merging allEndpoints",
		zone: "zone-a", eTPLocal: true, nodePort: true,
		endpoints: []kpEndpoint{
			rl("10.0.0.0:80", "zone-a"), rl("10.0.0.1:80", "zone-b"), r("10.0.0.2:80", "zone-a"), r("10.0.0.3:80", "zone-b"),
		},
		cluster: z("10.0.0.0:80", "10.0.0.2:80"), local: z("10.0.0.0:80", "10.0.0.1:80"),
		all: z("10.0.0.0:80", "10.0.0.1:80", "10.0.0.2:80"), why: "zone",
	}, {
		name:     "internalTrafficPolicy: Local, with empty endpoints",
		iTPLocal: true,
		local:    z(),
	}, {
		name:     "internalTrafficPolicy: Local, but all endpoints are remote",
		iTPLocal: true,
		endpoints: []kpEndpoint{
			{addr: "10.0.0.0:80", ready: true}, {addr: "10.0.0.1:80", ready: true},
		},
		local: z(), onlyRemote: true,
	}, {
		name:     "internalTrafficPolicy: Local, all endpoints are local",
		iTPLocal: true,
		endpoints: []kpEndpoint{
			{addr: "10.0.0.0:80", ready: true, local: true}, {addr: "10.0.0.1:80", ready: true, local: true},
		},
		local: z("10.0.0.0:80", "10.0.0.1:80"),
	}, {
		name:     "internalTrafficPolicy: Local, some endpoints are local",
		iTPLocal: true,
		endpoints: []kpEndpoint{
			{addr: "10.0.0.0:80", ready: true, local: true}, {addr: "10.0.0.1:80", ready: true},
		},
		local: z("10.0.0.0:80"),
	}, {
		name:      "Cluster traffic policy, endpoints not Ready",
		endpoints: []kpEndpoint{{addr: "10.0.0.0:80"}, {addr: "10.0.0.1:80"}},
		cluster:   z(), why: "all",
	}, {
		name:      "Cluster traffic policy, some endpoints are Ready",
		endpoints: []kpEndpoint{{addr: "10.0.0.0:80"}, {addr: "10.0.0.1:80", ready: true}},
		cluster:   z("10.0.0.1:80"), why: "all",
	}, {
		name: "Cluster traffic policy, all endpoints are terminating",
		endpoints: []kpEndpoint{
			{addr: "10.0.0.0:80", serving: true, terminating: true, local: true},
			{addr: "10.0.0.1:80", serving: true, terminating: true},
		},
		cluster: z("10.0.0.0:80", "10.0.0.1:80"), why: "all",
	}, {
		name:     "iTP: Local, eTP: Cluster, some endpoints local",
		iTPLocal: true, nodePort: true,
		endpoints: []kpEndpoint{
			{addr: "10.0.0.0:80", ready: true, local: true}, {addr: "10.0.0.1:80", ready: true},
		},
		cluster: z("10.0.0.0:80", "10.0.0.1:80"), local: z("10.0.0.0:80"),
		all: z("10.0.0.0:80", "10.0.0.1:80"), why: "all",
	}, {
		name:     "iTP: Cluster, eTP: Local, some endpoints local",
		eTPLocal: true, nodePort: true,
		endpoints: []kpEndpoint{
			{addr: "10.0.0.0:80", ready: true, local: true}, {addr: "10.0.0.1:80", ready: true},
		},
		cluster: z("10.0.0.0:80", "10.0.0.1:80"), local: z("10.0.0.0:80"),
		all: z("10.0.0.0:80", "10.0.0.1:80"), why: "all",
	}, {
		name:     "iTP: Local, eTP: Local, some endpoints local",
		iTPLocal: true, eTPLocal: true, nodePort: true,
		endpoints: []kpEndpoint{
			{addr: "10.0.0.0:80", ready: true, local: true}, {addr: "10.0.0.1:80", ready: true},
		},
		cluster: z("10.0.0.0:80", "10.0.0.1:80"), local: z("10.0.0.0:80"),
		all: z("10.0.0.0:80", "10.0.0.1:80"), why: "all",
	}, {
		name:     "iTP: Local, eTP: Local, all endpoints remote",
		iTPLocal: true, eTPLocal: true, nodePort: true,
		endpoints: []kpEndpoint{
			{addr: "10.0.0.0:80", ready: true}, {addr: "10.0.0.1:80", ready: true},
		},
		cluster: z("10.0.0.0:80", "10.0.0.1:80"), local: z(),
		all: z("10.0.0.0:80", "10.0.0.1:80"), why: "all",
	}, {
		name:     "iTP: Local, eTP: Local, all endpoints remote and terminating",
		iTPLocal: true, eTPLocal: true, nodePort: true,
		endpoints: []kpEndpoint{
			{addr: "10.0.0.0:80", serving: true, terminating: true}, {addr: "10.0.0.1:80", serving: true, terminating: true},
		},
		cluster: z("10.0.0.0:80", "10.0.0.1:80"), local: z(),
		all: z("10.0.0.0:80", "10.0.0.1:80"), onlyRemote: true, why: "all",
	}, {
		name:     "iTP: Cluster, eTP: Local, with terminating endpoints",
		eTPLocal: true, nodePort: true,
		endpoints: []kpEndpoint{
			{addr: "10.0.0.0:80", ready: true},
			{addr: "10.0.0.1:80", local: true},
			{addr: "10.0.0.2:80", serving: true, terminating: true, local: true},
			{addr: "10.0.0.3:80", serving: true, terminating: true},
		},
		cluster: z("10.0.0.0:80"), local: z("10.0.0.2:80"),
		all: z("10.0.0.0:80", "10.0.0.2:80"), why: "all",
	}, {
		name:     "externalTrafficPolicy ignored if not externally accessible",
		eTPLocal: true,
		endpoints: []kpEndpoint{
			{addr: "10.0.0.0:80", ready: true}, {addr: "10.0.0.1:80", ready: true, local: true},
		},
		cluster: z("10.0.0.0:80", "10.0.0.1:80"),
		all:     z("10.0.0.0:80", "10.0.0.1:80"), why: "all",
	}, {
		name:     "no cluster endpoints for iTP:Local internal-only service",
		iTPLocal: true,
		endpoints: []kpEndpoint{
			{addr: "10.0.0.0:80", ready: true}, {addr: "10.0.0.1:80", ready: true, local: true},
		},
		local: z("10.0.0.1:80"),
		all:   z("10.0.0.1:80"),
	}, {
		name: "empty endpoints when no service endpoints exist",
		why:  "all",
	}}
	dp := dptest.Open(t)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { checkCategorized(t, dp, tc) })
	}
}

// checkCategorized writes one case's service to the maps (replacing the
// previous case's) and compares every scope with kube-proxy's choice.
func checkCategorized(t *testing.T, dp *datapath.Datapath, tc kpCase) {
	node := tc.node
	if node == "" {
		node = "this-node"
	}
	opts := []svcOpt{withPorts(corev1.ServicePort{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80})}
	if tc.nodePort {
		opts = append(opts, withType(corev1.ServiceTypeNodePort), withNodePort(30080))
	}
	if tc.iTPLocal {
		opts = append(opts, withITP(corev1.ServiceInternalTrafficPolicyLocal))
	}
	if tc.eTPLocal {
		opts = append(opts, withETP(corev1.ServiceExternalTrafficPolicyLocal))
	}
	var eps []discoveryv1.Endpoint
	for _, e := range tc.endpoints {
		a := netip.MustParseAddrPort(e.addr)
		where := "other-node"
		if e.local {
			where = node
		}
		d := discoveryv1.Endpoint{Addresses: []string{a.Addr().String()}, NodeName: ptr(where),
			Conditions: discoveryv1.EndpointConditions{Ready: ptr(e.ready), Serving: ptr(e.ready || e.serving), Terminating: ptr(e.terminating)}}
		if len(e.zones) > 0 || len(e.nodes) > 0 {
			d.Hints = &discoveryv1.EndpointHints{}
			for _, zone := range e.zones {
				d.Hints.ForZones = append(d.Hints.ForZones, discoveryv1.ForZone{Name: zone})
			}
			for _, n := range e.nodes {
				d.Hints.ForNodes = append(d.Hints.ForNodes, discoveryv1.ForNode{Name: n})
			}
		}
		eps = append(eps, d)
	}
	m := Convert(svc(opts...), []*discoveryv1.EndpointSlice{v4("web-1", httpPort(80), eps...)})
	if m == nil {
		t.Fatal("the service converted to nothing")
	}

	r := lbmap.NewFromDatapath(dp, nil)
	r.SetNode(node)
	// A full pass: what the previous case wrote is replaced.
	if err := r.Apply(model.Delta{Full: true, Zone: tc.zone, Services: map[model.ServiceName]*model.Service{m.Name: m}}); err != nil {
		t.Fatalf("writing the service: %v", err)
	}
	p, err := datapath.OpenPinned(dp.PinDir())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	rows, err := p.Services()
	if err != nil {
		t.Fatal(err)
	}
	lb, err := p.LB()
	if err != nil {
		t.Fatal(err)
	}

	type scope struct{ front, traffic string }
	got := map[scope][]string{}
	why := map[scope]string{}
	reachable := map[string]bool{}
	for _, row := range rows {
		s := scope{row.Frontend.String(), row.Traffic}
		got[s] = []string{}
		why[s] = row.Selected
		for _, b := range row.Backends {
			got[s] = append(got[s], b.Addr.String())
			reachable[b.Addr.String()] = true
		}
		slices.Sort(got[s])
	}
	want := map[scope][]string{}
	wantWhy := map[scope]string{}
	const clusterIP, nodePort = "10.96.0.10:80", "0.0.0.0:30080"
	if tc.iTPLocal {
		want[scope{clusterIP, datapath.TrafficAny}], wantWhy[scope{clusterIP, datapath.TrafficAny}] = tc.local, "local"
	} else {
		want[scope{clusterIP, datapath.TrafficAny}], wantWhy[scope{clusterIP, datapath.TrafficAny}] = tc.cluster, tc.why
	}
	if tc.nodePort {
		switch {
		case !tc.eTPLocal:
			want[scope{nodePort, datapath.TrafficAny}], wantWhy[scope{nodePort, datapath.TrafficAny}] = tc.cluster, tc.why
		case sameSet(tc.local, tc.cluster) && len(tc.endpoints) == countLocal(tc.endpoints):
			// One entry serves both when they choose alike.
			want[scope{nodePort, datapath.TrafficAny}], wantWhy[scope{nodePort, datapath.TrafficAny}] = tc.local, "local"
		default:
			want[scope{nodePort, datapath.TrafficOutside}], wantWhy[scope{nodePort, datapath.TrafficOutside}] = tc.local, "local"
			want[scope{nodePort, datapath.TrafficInCluster}], wantWhy[scope{nodePort, datapath.TrafficInCluster}] = tc.cluster, tc.why
		}
	}
	for s, w := range want {
		if w == nil {
			w = []string{}
		}
		slices.Sort(w)
		g, ok := got[s]
		if !ok {
			t.Errorf("%s (%s traffic): no entry; entries: %v", s.front, s.traffic, slices.Collect(maps.Keys(got)))
			continue
		}
		if !slices.Equal(g, w) {
			t.Errorf("%s (%s traffic) uses %v, kube-proxy uses %v", s.front, s.traffic, g, w)
		}
		if why[s] != wantWhy[s] {
			t.Errorf("%s (%s traffic): why %q, want %q", s.front, s.traffic, why[s], wantWhy[s])
		}
	}
	if len(got) != len(want) {
		t.Errorf("entries %v, want %v", slices.Collect(maps.Keys(got)), slices.Collect(maps.Keys(want)))
	}

	// kube-proxy's allEndpoints: everything reachable from this node.
	wantAll := tc.all
	switch {
	case len(tc.cluster) != 0 && len(tc.local) == 0:
		wantAll = tc.cluster
	case len(tc.local) != 0 && len(tc.cluster) == 0:
		wantAll = tc.local
	}
	gotAll := slices.Sorted(maps.Keys(reachable))
	wantAll = slices.Clone(wantAll)
	slices.Sort(wantAll)
	if !slices.Equal(gotAll, wantAll) && !(len(gotAll) == 0 && len(wantAll) == 0) {
		t.Errorf("reachable from this node: %v, kube-proxy's %v", gotAll, wantAll)
	}

	// hasAnyEndpoints: without any, new flows are rejected; with only
	// remote ones (a Local policy), they are dropped, not rejected.
	hasAny := len(wantAll) > 0 || tc.onlyRemote
	for _, e := range lb {
		if e.Slot != 0 {
			continue
		}
		if rejected := e.Flags2&datapath.SvcFlagReject != 0; rejected == hasAny {
			t.Errorf("%s (%s scope): rejected=%v, but kube-proxy's hasAnyEndpoints=%v", e.Frontend, e.Scope, rejected, hasAny)
		}
	}
	if t.Failed() {
		var b strings.Builder
		for _, row := range rows {
			b.WriteString(row.Frontend.String() + " " + row.Traffic + " " + row.Selected + "\n")
		}
		t.Logf("entries:\n%s", b.String())
	}
}

func sameSet(a, b []string) bool {
	return len(a) == len(b) && !slices.ContainsFunc(a, func(s string) bool { return !slices.Contains(b, s) })
}

func countLocal(eps []kpEndpoint) int {
	n := 0
	for _, e := range eps {
		if e.local {
			n++
		}
	}
	return n
}
