package k8ssource

import (
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/weirnet/weir/core/model"
)

// The kube-proxy code these tests compare with is
// k8s.io/kubernetes v1.34 pkg/proxy: endpointslicecache.go (addEndpoints,
// endpointInfoByServicePort), servicechangetracker.go (serviceToServiceMap),
// serviceport.go (newBaseServiceInfo), topology.go (CategorizeEndpoints),
// and k8s.io/endpointslice utils.go (podToEndpoint) for what the
// EndpointSlice controller writes.

func ptr[T any](v T) *T { return &v }

// Fixtures.

type svcOpt func(*corev1.Service)

func svc(opts ...svcOpt) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web"},
		Spec: corev1.ServiceSpec{
			Type:       corev1.ServiceTypeClusterIP,
			ClusterIP:  "10.96.0.10",
			ClusterIPs: []string{"10.96.0.10"},
			Ports:      []corev1.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080)}},
		},
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

func withType(t corev1.ServiceType) svcOpt { return func(s *corev1.Service) { s.Spec.Type = t } }

func withClusterIPs(ips ...string) svcOpt {
	return func(s *corev1.Service) {
		s.Spec.ClusterIPs = ips
		s.Spec.ClusterIP = ""
		if len(ips) > 0 {
			s.Spec.ClusterIP = ips[0]
		}
	}
}

func withPorts(ps ...corev1.ServicePort) svcOpt {
	return func(s *corev1.Service) { s.Spec.Ports = ps }
}

func withNodePort(n int32) svcOpt {
	return func(s *corev1.Service) {
		for i := range s.Spec.Ports {
			s.Spec.Ports[i].NodePort = n + int32(i)
		}
	}
}

func withExternalIPs(ips ...string) svcOpt {
	return func(s *corev1.Service) { s.Spec.ExternalIPs = ips }
}

func withIngress(in ...corev1.LoadBalancerIngress) svcOpt {
	return func(s *corev1.Service) { s.Status.LoadBalancer.Ingress = in }
}

func withITP(p corev1.ServiceInternalTrafficPolicy) svcOpt {
	return func(s *corev1.Service) { s.Spec.InternalTrafficPolicy = &p }
}

func withETP(p corev1.ServiceExternalTrafficPolicy) svcOpt {
	return func(s *corev1.Service) { s.Spec.ExternalTrafficPolicy = p }
}

func withAffinity(a corev1.ServiceAffinity, timeout *int32) svcOpt {
	return func(s *corev1.Service) {
		s.Spec.SessionAffinity = a
		if timeout != nil {
			s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: timeout}}
		}
	}
}

// vip is a LoadBalancer ingress with ipMode VIP, as the API server
// requires ipMode for an IP since LoadBalancerIPMode went GA.
func vip(ip string) corev1.LoadBalancerIngress {
	return corev1.LoadBalancerIngress{IP: ip, IPMode: ptr(corev1.LoadBalancerIPModeVIP)}
}

func sport(name string, proto corev1.Protocol, port int32) discoveryv1.EndpointPort {
	return discoveryv1.EndpointPort{Name: ptr(name), Protocol: ptr(proto), Port: ptr(port)}
}

func slice(name string, at discoveryv1.AddressType, ports []discoveryv1.EndpointPort, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "ns", Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: at,
		Ports:       ports,
		Endpoints:   eps,
	}
}

func v4(name string, ports []discoveryv1.EndpointPort, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return slice(name, discoveryv1.AddressTypeIPv4, ports, eps...)
}

func httpPort(n int32) []discoveryv1.EndpointPort {
	return []discoveryv1.EndpointPort{sport("http", corev1.ProtocolTCP, n)}
}

// ep is a ready endpoint as the EndpointSlice controller writes it.
func ep(addr, node string) discoveryv1.Endpoint {
	e := discoveryv1.Endpoint{
		Addresses:  []string{addr},
		Conditions: discoveryv1.EndpointConditions{Ready: ptr(true), Serving: ptr(true), Terminating: ptr(false)},
	}
	if node != "" {
		e.NodeName = ptr(node)
	}
	return e
}

func cond(e discoveryv1.Endpoint, ready, serving, terminating *bool) discoveryv1.Endpoint {
	e.Conditions = discoveryv1.EndpointConditions{Ready: ready, Serving: serving, Terminating: terminating}
	return e
}

// terminatingEP is a serving pod being deleted, as the controller writes it.
func terminatingEP(addr, node string) discoveryv1.Endpoint {
	return cond(ep(addr, node), ptr(false), ptr(true), ptr(true))
}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func active(addr, node string) model.Backend {
	return model.Backend{Addr: ap(addr), State: model.Active, NodeName: node}
}

func term(addr, node string) model.Backend {
	return model.Backend{Addr: ap(addr), State: model.Terminating, NodeName: node}
}

func fe(addr string, proto model.Proto, typ model.FrontendType, name string, bes ...model.Backend) model.Frontend {
	f := model.Frontend{Addr: ap(addr), Proto: proto, Type: typ, PortName: name}
	if len(bes) > 0 {
		f.Backends = bes
	}
	return f
}

func local(f model.Frontend, internal, external bool) model.Frontend {
	f.InternalLocal, f.ExternalLocal = internal, external
	return f
}

func want(affinity uint32, fes ...model.Frontend) *model.Service {
	return &model.Service{
		Name:            model.ServiceName{Namespace: "ns", Name: "web"},
		Frontends:       fes,
		AffinityTimeout: affinity,
		Source:          Name,
	}
}

// dump prints a service one frontend a line, for failure messages.
func dump(s *model.Service) string {
	if s == nil {
		return "<nil>"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "service %s source=%q affinity=%d unserved=%q\n", s.Name, s.Source, s.AffinityTimeout, s.Unserved)
	for _, f := range s.Frontends {
		fmt.Fprintf(&b, "  %s/%s %s port=%q internalLocal=%v externalLocal=%v backends=",
			f.Addr, f.Proto, f.Type, f.PortName, f.InternalLocal, f.ExternalLocal)
		if f.Backends == nil {
			b.WriteString("nil\n")
			continue
		}
		b.WriteString("[")
		for i, be := range f.Backends {
			if i > 0 {
				b.WriteString(" ")
			}
			fmt.Fprintf(&b, "%s(%s,node=%q)", be.Addr, be.State, be.NodeName)
		}
		b.WriteString("]\n")
	}
	return b.String()
}

type convertCase struct {
	name   string
	svc    *corev1.Service
	slices []*discoveryv1.EndpointSlice
	want   *model.Service
}

func runConvertCases(t *testing.T, cases []convertCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := Convert(tc.svc, tc.slices)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("Convert mismatch\n--- got:\n%s--- want:\n%s", dump(got), dump(tc.want))
			}
		})
	}
}

const (
	tcp = model.TCP
	udp = model.UDP
)

func TestConvertPorts(t *testing.T) {
	twoPorts := withPorts(
		corev1.ServicePort{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromString("web")},
		corev1.ServicePort{Name: "dns", Protocol: corev1.ProtocolUDP, Port: 53, TargetPort: intstr.FromInt32(5353)},
	)
	runConvertCases(t, []convertCase{
		{
			name: "two named ports matched by name, port numbers from the slice",
			svc:  svc(twoPorts),
			slices: []*discoveryv1.EndpointSlice{
				v4("a", []discoveryv1.EndpointPort{sport("http", corev1.ProtocolTCP, 8080), sport("dns", corev1.ProtocolUDP, 1053)},
					ep("10.0.1.2", "node-a"), ep("10.0.1.1", "node-b")),
				// Differently named port: matches neither service port.
				v4("b", []discoveryv1.EndpointPort{sport("metrics", corev1.ProtocolTCP, 9090)}, ep("10.0.2.1", "node-a")),
				// Right name, wrong protocol: kube-proxy's ServicePortName
				// includes the protocol, so no match.
				v4("c", []discoveryv1.EndpointPort{sport("http", corev1.ProtocolUDP, 8081)}, ep("10.0.3.1", "node-a")),
				// Unnamed port: matches no named service port.
				v4("d", []discoveryv1.EndpointPort{sport("", corev1.ProtocolTCP, 7070)}, ep("10.0.4.1", "node-a")),
			},
			want: want(0,
				fe("10.96.0.10:80", tcp, model.ClusterIP, "http", active("10.0.1.1:8080", "node-b"), active("10.0.1.2:8080", "node-a")),
				fe("10.96.0.10:53", udp, model.ClusterIP, "dns", active("10.0.1.1:1053", "node-b"), active("10.0.1.2:1053", "node-a")),
			),
		},
		{
			name: "a port number differs between slices: one backend per address and port",
			svc:  svc(),
			slices: []*discoveryv1.EndpointSlice{
				v4("a", httpPort(8080), ep("10.0.1.1", "n")),
				v4("b", httpPort(9090), ep("10.0.1.1", "n")),
			},
			want: want(0, fe("10.96.0.10:80", tcp, model.ClusterIP, "http", active("10.0.1.1:8080", "n"), active("10.0.1.1:9090", "n"))),
		},
		{
			name:   "unnamed single port matches an unnamed service port",
			svc:    svc(withPorts(corev1.ServicePort{Protocol: corev1.ProtocolTCP, Port: 443, TargetPort: intstr.FromInt32(8443)})),
			slices: []*discoveryv1.EndpointSlice{v4("a", []discoveryv1.EndpointPort{sport("", corev1.ProtocolTCP, 6443)}, ep("10.0.1.1", "n"))},
			want:   want(0, fe("10.96.0.10:443", tcp, model.ClusterIP, "", active("10.0.1.1:6443", "n"))),
		},
		{
			// The API server defaults both, so this only happens with
			// hand-made objects. kube-proxy skips a port with a nil name
			// (endpointInfoByServicePort); Weir reads it as "" and a nil
			// protocol as TCP. Harmless; documented here.
			name:   "slice port with nil name and protocol reads as unnamed TCP",
			svc:    svc(withPorts(corev1.ServicePort{Protocol: corev1.ProtocolTCP, Port: 443})),
			slices: []*discoveryv1.EndpointSlice{v4("a", []discoveryv1.EndpointPort{{Port: ptr(int32(6443))}}, ep("10.0.1.1", "n"))},
			want:   want(0, fe("10.96.0.10:443", tcp, model.ClusterIP, "", active("10.0.1.1:6443", "n"))),
		},
		{
			name:   "named service port does not match an unnamed slice port",
			svc:    svc(),
			slices: []*discoveryv1.EndpointSlice{v4("a", []discoveryv1.EndpointPort{sport("", corev1.ProtocolTCP, 8080)}, ep("10.0.1.1", "n"))},
			want:   want(0, fe("10.96.0.10:80", tcp, model.ClusterIP, "http")),
		},
		{
			name: "slice port with nil or out-of-range number is skipped",
			svc:  svc(),
			slices: []*discoveryv1.EndpointSlice{
				v4("a", []discoveryv1.EndpointPort{{Name: ptr("http"), Protocol: ptr(corev1.ProtocolTCP)}}, ep("10.0.1.1", "n")),
				v4("b", httpPort(0), ep("10.0.1.2", "n")),
				v4("c", httpPort(70000), ep("10.0.1.3", "n")),
			},
			want: want(0, fe("10.96.0.10:80", tcp, model.ClusterIP, "http")),
		},
		{
			name:   "no slices: frontend with no backends",
			svc:    svc(),
			slices: nil,
			want:   want(0, fe("10.96.0.10:80", tcp, model.ClusterIP, "http")),
		},
		{
			name: "SCTP port",
			svc:  svc(withPorts(corev1.ServicePort{Name: "s", Protocol: corev1.ProtocolSCTP, Port: 3868})),
			slices: []*discoveryv1.EndpointSlice{
				v4("a", []discoveryv1.EndpointPort{sport("s", corev1.ProtocolSCTP, 3868)}, ep("10.0.1.1", "n")),
			},
			// Not served, and said so: never accepted silently.
			want: func() *model.Service {
				w := want(0)
				w.Unserved = []string{"port s (3868/SCTP): SCTP is not served: the datapath translates TCP and UDP only (SCTP would need its CRC32c checksum recomputed)"}
				return w
			}(),
		},
		{
			name: "SCTP port beside a TCP port: the TCP port is served",
			svc:  svc(withPorts(corev1.ServicePort{Name: "s", Protocol: corev1.ProtocolSCTP, Port: 3868}, corev1.ServicePort{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80})),
			want: func() *model.Service {
				w := want(0, fe("10.96.0.10:80", tcp, model.ClusterIP, "http"))
				w.Unserved = []string{"port s (3868/SCTP): SCTP is not served: the datapath translates TCP and UDP only (SCTP would need its CRC32c checksum recomputed)"}
				return w
			}(),
		},
		{
			name: "unsupported protocol and invalid port are skipped, the rest kept",
			svc: svc(withPorts(
				corev1.ServicePort{Name: "icmp", Protocol: corev1.Protocol("ICMP"), Port: 1},
				corev1.ServicePort{Name: "zero", Protocol: corev1.ProtocolTCP, Port: 0},
				corev1.ServicePort{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80},
			)),
			slices: []*discoveryv1.EndpointSlice{v4("a", httpPort(8080), ep("10.0.1.1", "n"))},
			want:   want(0, fe("10.96.0.10:80", tcp, model.ClusterIP, "http", active("10.0.1.1:8080", "n"))),
		},
		{
			// The API server rejects it; a hand-made object keeps the
			// first port's frontend.
			name: "two ports on the same frontend: first kept",
			svc: svc(withPorts(
				corev1.ServicePort{Name: "a", Protocol: corev1.ProtocolTCP, Port: 80},
				corev1.ServicePort{Name: "b", Protocol: corev1.ProtocolTCP, Port: 80},
			)),
			slices: []*discoveryv1.EndpointSlice{v4("a", []discoveryv1.EndpointPort{sport("a", corev1.ProtocolTCP, 1), sport("b", corev1.ProtocolTCP, 2)}, ep("10.0.1.1", "n"))},
			want:   want(0, fe("10.96.0.10:80", tcp, model.ClusterIP, "a", active("10.0.1.1:1", "n"))),
		},
	})
}

func TestConvertEndpointConditions(t *testing.T) {
	T, F := ptr(true), ptr(false)
	cases := []struct {
		name                      string
		ready, serving, terminate *bool
		want                      []model.Backend // nil: excluded
	}{
		{"all nil (ready)", nil, nil, nil, []model.Backend{active("10.0.0.1:8080", "n")}},
		{"ready nil, serving true, terminating false", nil, T, F, []model.Backend{active("10.0.0.1:8080", "n")}},
		{"ready true", T, nil, nil, []model.Backend{active("10.0.0.1:8080", "n")}},
		{"ready true, serving true, terminating false", T, T, F, []model.Backend{active("10.0.0.1:8080", "n")}},
		{"ready false, serving true, terminating true", F, T, T, []model.Backend{term("10.0.0.1:8080", "n")}},
		{"ready false, serving false, terminating true", F, F, T, nil},
		{"ready false, serving false, terminating nil", F, F, nil, nil},
		{"ready false, serving true, terminating nil", F, T, nil, nil},
		{"ready false, serving true, terminating false", F, T, F, nil},
		{"ready false, serving nil, terminating nil", F, nil, nil, nil},
		{"ready false, serving nil, terminating false", F, nil, F, nil},
		// A nil serving means true (the API, and kube-proxy's
		// endpointslicecache.go): serving-terminating.
		{"ready false, serving nil, terminating true", F, nil, T, []model.Backend{term("10.0.0.1:8080", "n")}},
		// publishNotReadyAddresses: the EndpointSlice controller writes
		// ready=true whatever the pod's state (k8s.io/endpointslice
		// podToEndpoint), and kube-proxy uses every ready endpoint for new
		// flows (topology.go CategorizeEndpoints filters on IsReady only).
		{"ready true, serving false, terminating false (publishNotReadyAddresses, pod not ready)", T, F, F, []model.Backend{active("10.0.0.1:8080", "n")}},
		// Ready wins, as in kube-proxy, whatever terminating says.
		{"ready true, serving true, terminating true (publishNotReadyAddresses, pod deleted)", T, T, T, []model.Backend{active("10.0.0.1:8080", "n")}},
		{"ready true, serving false, terminating true (publishNotReadyAddresses, pod deleted, not ready)", T, F, T, []model.Backend{active("10.0.0.1:8080", "n")}},
		{"ready nil, serving nil, terminating true", nil, nil, T, []model.Backend{active("10.0.0.1:8080", "n")}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := cond(ep("10.0.0.1", "n"), tc.ready, tc.serving, tc.terminate)
			got := Convert(svc(), []*discoveryv1.EndpointSlice{v4("a", httpPort(8080), e)})
			w := want(0, fe("10.96.0.10:80", tcp, model.ClusterIP, "http", tc.want...))
			if !reflect.DeepEqual(got, w) {
				t.Errorf("Convert mismatch\n--- got:\n%s--- want:\n%s", dump(got), dump(w))
			}
		})
	}
}

func TestConvertEndpoints(t *testing.T) {
	noNode := ep("10.0.0.9", "")
	twoAddrs := ep("10.0.0.7", "n")
	twoAddrs.Addresses = []string{"10.0.0.7", "10.0.0.8"}
	noAddr := ep("10.0.0.1", "n")
	noAddr.Addresses = nil
	runConvertCases(t, []convertCase{
		{
			name: "same endpoint in two slices, terminating first: one active backend",
			svc:  svc(),
			slices: []*discoveryv1.EndpointSlice{
				v4("old", httpPort(8080), terminatingEP("10.0.0.5", "old-node")),
				v4("new", httpPort(8080), ep("10.0.0.5", "new-node")),
			},
			want: want(0, fe("10.96.0.10:80", tcp, model.ClusterIP, "http", active("10.0.0.5:8080", "new-node"))),
		},
		{
			name: "same endpoint in two slices, ready first: one active backend",
			svc:  svc(),
			slices: []*discoveryv1.EndpointSlice{
				v4("new", httpPort(8080), ep("10.0.0.5", "new-node")),
				v4("old", httpPort(8080), terminatingEP("10.0.0.5", "old-node")),
			},
			want: want(0, fe("10.96.0.10:80", tcp, model.ClusterIP, "http", active("10.0.0.5:8080", "new-node"))),
		},
		{
			name: "same endpoint terminating in two slices: one terminating backend, first kept",
			svc:  svc(),
			slices: []*discoveryv1.EndpointSlice{
				v4("a", httpPort(8080), terminatingEP("10.0.0.5", "a")),
				v4("b", httpPort(8080), terminatingEP("10.0.0.5", "b")),
			},
			want: want(0, fe("10.96.0.10:80", tcp, model.ClusterIP, "http", term("10.0.0.5:8080", "a"))),
		},
		{
			name: "backends sorted by address (numerically), node names copied, nil node empty",
			svc:  svc(),
			slices: []*discoveryv1.EndpointSlice{
				v4("a", httpPort(8080), ep("10.0.0.30", "n3"), ep("10.0.0.100", "n1")),
				v4("b", httpPort(8080), noNode, ep("10.0.0.4", "n2"), terminatingEP("10.0.0.20", "n4")),
			},
			want: want(0, fe("10.96.0.10:80", tcp, model.ClusterIP, "http",
				active("10.0.0.4:8080", "n2"), active("10.0.0.9:8080", ""), term("10.0.0.20:8080", "n4"),
				active("10.0.0.30:8080", "n3"), active("10.0.0.100:8080", "n1"))),
		},
		{
			name: "first address only; no address, bad address and IPv6 in an IPv4 slice skipped",
			svc:  svc(),
			slices: []*discoveryv1.EndpointSlice{
				v4("a", httpPort(8080), twoAddrs, noAddr, ep("not-an-ip", "n"), ep("fd00::1", "n")),
			},
			want: want(0, fe("10.96.0.10:80", tcp, model.ClusterIP, "http", active("10.0.0.7:8080", "n"))),
		},
		{
			name: "IPv6 and FQDN slices ignored",
			svc:  svc(),
			slices: []*discoveryv1.EndpointSlice{
				slice("v6", discoveryv1.AddressTypeIPv6, httpPort(8080), ep("fd00::1", "n")),
				slice("fqdn", discoveryv1.AddressTypeFQDN, httpPort(8080), ep("db.example.com", "n")),
				v4("v4", httpPort(8080), ep("10.0.0.1", "n")),
			},
			want: want(0, fe("10.96.0.10:80", tcp, model.ClusterIP, "http", active("10.0.0.1:8080", "n"))),
		},
		{
			// kube-proxy parses endpoint addresses with ParseIPSloppy,
			// which accepts leading zeros ("legacy" IPs the API still
			// admits while StrictIPCIDRValidation is off); netip does
			// not. Reported as a minor divergence.
			name:   "leading-zero endpoint address is skipped",
			svc:    svc(),
			slices: []*discoveryv1.EndpointSlice{v4("a", httpPort(8080), ep("010.000.000.001", "n"))},
			want:   want(0, fe("10.96.0.10:80", tcp, model.ClusterIP, "http")),
		},
	})
}

func TestConvertAddressFamilies(t *testing.T) {
	dual := []*discoveryv1.EndpointSlice{
		v4("v4", httpPort(8080), ep("10.0.0.1", "n")),
		slice("v6", discoveryv1.AddressTypeIPv6, httpPort(8080), ep("fd00:1::1", "n")),
	}
	runConvertCases(t, []convertCase{
		{
			name:   "dual-stack, IPv4 first: IPv4 frontends only",
			svc:    svc(withClusterIPs("10.96.0.20", "fd00::20"), withExternalIPs("192.0.2.1", "2001:db8::1")),
			slices: dual,
			want: want(0,
				fe("10.96.0.20:80", tcp, model.ClusterIP, "http", active("10.0.0.1:8080", "n")),
				fe("192.0.2.1:80", tcp, model.ExternalIP, "http", active("10.0.0.1:8080", "n")),
			),
		},
		{
			name:   "dual-stack, IPv6 first: IPv4 frontends only",
			svc:    svc(withClusterIPs("fd00::20", "10.96.0.20")),
			slices: dual,
			want:   want(0, fe("10.96.0.20:80", tcp, model.ClusterIP, "http", active("10.0.0.1:8080", "n"))),
		},
		{
			name: "only ClusterIP set (no ClusterIPs)",
			svc: svc(func(s *corev1.Service) {
				s.Spec.ClusterIPs = nil
				s.Spec.ClusterIP = "10.96.0.30"
			}),
			slices: dual,
			want:   want(0, fe("10.96.0.30:80", tcp, model.ClusterIP, "http", active("10.0.0.1:8080", "n"))),
		},
		{
			name:   "IPv6-only service: nil",
			svc:    svc(withClusterIPs("fd00::20"), withExternalIPs("2001:db8::1")),
			slices: []*discoveryv1.EndpointSlice{slice("v6", discoveryv1.AddressTypeIPv6, httpPort(8080), ep("fd00:1::1", "n"))},
			want:   nil,
		},
		{
			name: "IPv6-only LoadBalancer with IPv6 ingress: nil",
			svc: svc(withType(corev1.ServiceTypeLoadBalancer), withClusterIPs("fd00::20"),
				withIngress(vip("2001:db8::10"))),
			want: nil,
		},
		{
			// kube-proxy's IPv4 proxier drops a service with no IPv4
			// cluster IP altogether (servicechangetracker.go).
			name:   "IPv6-only NodePort service with an IPv4 external IP",
			svc:    svc(withType(corev1.ServiceTypeNodePort), withClusterIPs("fd00::20"), withNodePort(30080), withExternalIPs("192.0.2.1")),
			slices: []*discoveryv1.EndpointSlice{slice("v6", discoveryv1.AddressTypeIPv6, httpPort(8080), ep("fd00:1::1", "n"))},
			want:   nil,
		},
		{
			name:   "cluster IP not an address: nil",
			svc:    svc(withClusterIPs("not-an-ip")),
			slices: dual,
			want:   nil,
		},
	})
}

func TestConvertNotProxied(t *testing.T) {
	slices := []*discoveryv1.EndpointSlice{v4("a", httpPort(8080), ep("10.0.0.1", "n"))}
	runConvertCases(t, []convertCase{
		{
			name:   "headless",
			svc:    svc(withClusterIPs(corev1.ClusterIPNone)),
			slices: slices,
		},
		{
			name:   "headless with external IPs and a node port",
			svc:    svc(withClusterIPs(corev1.ClusterIPNone), withExternalIPs("192.0.2.1"), withNodePort(30080)),
			slices: slices,
		},
		{
			name: "ExternalName",
			svc: svc(withType(corev1.ServiceTypeExternalName), withClusterIPs(), func(s *corev1.Service) {
				s.Spec.ExternalName = "db.example.com"
			}),
			slices: slices,
		},
		{
			name:   "ExternalName with a cluster IP (hand-made)",
			svc:    svc(withType(corev1.ServiceTypeExternalName)),
			slices: slices,
		},
		{
			name:   "no ports",
			svc:    svc(withPorts()),
			slices: slices,
		},
		{
			name: "every port unsupported",
			svc: svc(withPorts(
				corev1.ServicePort{Name: "icmp", Protocol: corev1.Protocol("ICMP"), Port: 1},
				corev1.ServicePort{Name: "big", Protocol: corev1.ProtocolTCP, Port: 70000},
				corev1.ServicePort{Name: "neg", Protocol: corev1.ProtocolUDP, Port: -1},
			)),
			slices: slices,
		},
	})
}

func TestConvertFrontendTypes(t *testing.T) {
	b := []model.Backend{active("10.0.0.1:8080", "n")}
	slices := []*discoveryv1.EndpointSlice{v4("a", httpPort(8080), ep("10.0.0.1", "n"))}
	twoPorts := withPorts(
		corev1.ServicePort{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80},
		corev1.ServicePort{Name: "dns", Protocol: corev1.ProtocolUDP, Port: 53},
	)
	runConvertCases(t, []convertCase{
		{
			name: "ClusterIP with external IPs; node port and ingress ignored on a ClusterIP service",
			svc: svc(withExternalIPs("192.0.2.1", "192.0.2.2", "bogus"), withNodePort(30080),
				withIngress(vip("203.0.113.1"))),
			slices: slices,
			want: want(0,
				fe("10.96.0.10:80", tcp, model.ClusterIP, "http", b...),
				fe("192.0.2.1:80", tcp, model.ExternalIP, "http", b...),
				fe("192.0.2.2:80", tcp, model.ExternalIP, "http", b...),
			),
		},
		{
			name:   "NodePort",
			svc:    svc(withType(corev1.ServiceTypeNodePort), withNodePort(30080), withIngress(vip("203.0.113.1"))),
			slices: slices,
			want: want(0,
				fe("10.96.0.10:80", tcp, model.ClusterIP, "http", b...),
				fe("0.0.0.0:30080", tcp, model.NodePort, "http", b...),
			),
		},
		{
			name:   "NodePort with two ports: a node port each",
			svc:    svc(withType(corev1.ServiceTypeNodePort), twoPorts, withNodePort(30080)),
			slices: slices,
			want: want(0,
				fe("10.96.0.10:80", tcp, model.ClusterIP, "http", b...),
				fe("0.0.0.0:30080", tcp, model.NodePort, "http", b...),
				fe("10.96.0.10:53", udp, model.ClusterIP, "dns"),
				fe("0.0.0.0:30081", udp, model.NodePort, "dns"),
			),
		},
		{
			name: "LoadBalancer: cluster IP, external IP, ingress IPs, node port",
			svc: svc(withType(corev1.ServiceTypeLoadBalancer), withNodePort(30080), withExternalIPs("192.0.2.1"),
				withIngress(
					vip("203.0.113.1"),
					corev1.LoadBalancerIngress{Hostname: "lb.example.com"}, // hostname only: skipped
					corev1.LoadBalancerIngress{IP: "203.0.113.2", Hostname: "lb2.example.com", IPMode: ptr(corev1.LoadBalancerIPModeVIP)},
					corev1.LoadBalancerIngress{IP: "203.0.113.3"}, // no ipMode: VIP
					vip("2001:db8::10"),
				)),
			slices: slices,
			want: want(0,
				fe("10.96.0.10:80", tcp, model.ClusterIP, "http", b...),
				fe("192.0.2.1:80", tcp, model.ExternalIP, "http", b...),
				fe("203.0.113.1:80", tcp, model.LoadBalancer, "http", b...),
				fe("203.0.113.2:80", tcp, model.LoadBalancer, "http", b...),
				fe("203.0.113.3:80", tcp, model.LoadBalancer, "http", b...),
				fe("0.0.0.0:30080", tcp, model.NodePort, "http", b...),
			),
		},
		{
			name:   "LoadBalancer without node ports (allocateLoadBalancerNodePorts false)",
			svc:    svc(withType(corev1.ServiceTypeLoadBalancer), withIngress(vip("203.0.113.1"))),
			slices: slices,
			want: want(0,
				fe("10.96.0.10:80", tcp, model.ClusterIP, "http", b...),
				fe("203.0.113.1:80", tcp, model.LoadBalancer, "http", b...),
			),
		},
		{
			name:   "LoadBalancer not yet provisioned",
			svc:    svc(withType(corev1.ServiceTypeLoadBalancer), withNodePort(30080)),
			slices: slices,
			want: want(0,
				fe("10.96.0.10:80", tcp, model.ClusterIP, "http", b...),
				fe("0.0.0.0:30080", tcp, model.NodePort, "http", b...),
			),
		},
		{
			// An ingress in Proxy mode is not served locally, as in
			// kube-proxy (serviceport.go): in-cluster clients go through
			// the load balancer (PROXY protocol, TLS termination).
			name: "LoadBalancer ingress with ipMode Proxy",
			svc: svc(withType(corev1.ServiceTypeLoadBalancer),
				withIngress(corev1.LoadBalancerIngress{IP: "203.0.113.1", IPMode: ptr(corev1.LoadBalancerIPModeProxy)})),
			slices: slices,
			want: want(0,
				fe("10.96.0.10:80", tcp, model.ClusterIP, "http", b...),
			),
		},
		{
			name: "an address both external IP and ingress IP: the external IP frontend kept",
			svc: svc(withType(corev1.ServiceTypeLoadBalancer), withExternalIPs("203.0.113.1"),
				withIngress(vip("203.0.113.1"))),
			slices: slices,
			want: want(0,
				fe("10.96.0.10:80", tcp, model.ClusterIP, "http", b...),
				fe("203.0.113.1:80", tcp, model.ExternalIP, "http", b...),
			),
		},
	})
}

func TestConvertTrafficPolicies(t *testing.T) {
	b := []model.Backend{active("10.0.0.1:8080", "n")}
	slices := []*discoveryv1.EndpointSlice{v4("a", httpPort(8080), ep("10.0.0.1", "n"))}
	lb := []svcOpt{withType(corev1.ServiceTypeLoadBalancer), withNodePort(30080), withExternalIPs("192.0.2.1"), withIngress(vip("203.0.113.1"))}
	all := func(internal, external bool) *model.Service {
		return want(0,
			local(fe("10.96.0.10:80", tcp, model.ClusterIP, "http", b...), internal, false),
			local(fe("192.0.2.1:80", tcp, model.ExternalIP, "http", b...), false, external),
			local(fe("203.0.113.1:80", tcp, model.LoadBalancer, "http", b...), false, external),
			local(fe("0.0.0.0:30080", tcp, model.NodePort, "http", b...), false, external),
		)
	}
	runConvertCases(t, []convertCase{
		{name: "defaults", svc: svc(lb...), slices: slices, want: all(false, false)},
		{name: "both Cluster", svc: svc(append(lb, withITP(corev1.ServiceInternalTrafficPolicyCluster), withETP(corev1.ServiceExternalTrafficPolicyCluster))...), slices: slices, want: all(false, false)},
		{name: "internal Local: ClusterIP frontends only", svc: svc(append(lb, withITP(corev1.ServiceInternalTrafficPolicyLocal))...), slices: slices, want: all(true, false)},
		{name: "external Local: non-ClusterIP frontends only", svc: svc(append(lb, withETP(corev1.ServiceExternalTrafficPolicyLocal))...), slices: slices, want: all(false, true)},
		{name: "both Local", svc: svc(append(lb, withITP(corev1.ServiceInternalTrafficPolicyLocal), withETP(corev1.ServiceExternalTrafficPolicyLocal))...), slices: slices, want: all(true, true)},
		{
			name:   "external Local on a ClusterIP-only service: nothing external to mark",
			svc:    svc(withETP(corev1.ServiceExternalTrafficPolicyLocal)),
			slices: slices,
			want:   want(0, fe("10.96.0.10:80", tcp, model.ClusterIP, "http", b...)),
		},
		{
			name:   "external Local on a ClusterIP service with an external IP",
			svc:    svc(withETP(corev1.ServiceExternalTrafficPolicyLocal), withExternalIPs("192.0.2.1")),
			slices: slices,
			want: want(0,
				fe("10.96.0.10:80", tcp, model.ClusterIP, "http", b...),
				local(fe("192.0.2.1:80", tcp, model.ExternalIP, "http", b...), false, true),
			),
		},
	})
}

func TestConvertSessionAffinity(t *testing.T) {
	slices := []*discoveryv1.EndpointSlice{v4("a", httpPort(8080), ep("10.0.0.1", "n"))}
	f := fe("10.96.0.10:80", tcp, model.ClusterIP, "http", active("10.0.0.1:8080", "n"))
	runConvertCases(t, []convertCase{
		{name: "unset", svc: svc(), slices: slices, want: want(0, f)},
		{name: "None", svc: svc(withAffinity(corev1.ServiceAffinityNone, nil)), slices: slices, want: want(0, f)},
		{name: "None with a timeout", svc: svc(withAffinity(corev1.ServiceAffinityNone, ptr(int32(60)))), slices: slices, want: want(0, f)},
		{name: "ClientIP without config: 10800", svc: svc(withAffinity(corev1.ServiceAffinityClientIP, nil)), slices: slices, want: want(10800, f)},
		{
			name: "ClientIP with config but no timeout: 10800",
			svc: svc(withAffinity(corev1.ServiceAffinityClientIP, nil), func(s *corev1.Service) {
				s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{}}
			}),
			slices: slices,
			want:   want(10800, f),
		},
		{name: "ClientIP timeout 0: 10800", svc: svc(withAffinity(corev1.ServiceAffinityClientIP, ptr(int32(0)))), slices: slices, want: want(10800, f)},
		{name: "ClientIP timeout 60", svc: svc(withAffinity(corev1.ServiceAffinityClientIP, ptr(int32(60)))), slices: slices, want: want(60, f)},
		{name: "ClientIP timeout 86400", svc: svc(withAffinity(corev1.ServiceAffinityClientIP, ptr(int32(86400)))), slices: slices, want: want(86400, f)},
	})
}

// The converted services must pass the model's own checks, or build drops
// them whole.
func TestConvertValidates(t *testing.T) {
	s := svc(withType(corev1.ServiceTypeLoadBalancer), withNodePort(30080), withExternalIPs("192.0.2.1"),
		withIngress(vip("203.0.113.1")), withAffinity(corev1.ServiceAffinityClientIP, nil))
	m := Convert(s, []*discoveryv1.EndpointSlice{
		v4("a", httpPort(8080), ep("10.0.0.1", "n"), terminatingEP("10.0.0.2", "m")),
		v4("b", httpPort(8080), ep("10.0.0.1", "n")),
	})
	if m == nil {
		t.Fatal("Convert returned nil")
	}
	if err := m.Validate(); err != nil {
		t.Fatalf("Validate: %v\n%s", err, dump(m))
	}
}

// The forwarding-mode annotation sets the service's own mode; a value
// the datapath does not know leaves the pool's mode and is reported.
// Health check ports and source ranges come through as written.
func TestNorthSouthFields(t *testing.T) {
	ann := func(v string) svcOpt {
		return func(s *corev1.Service) {
			s.Annotations = map[string]string{"service.weir.dev/forwarding-mode": v}
		}
	}
	lb := func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeLoadBalancer
		s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
		s.Spec.HealthCheckNodePort = 31999
		s.Spec.LoadBalancerSourceRanges = []string{"203.0.113.0/24", "2001:db8::/32", "10.1.2.3/8"}
	}
	m := Convert(svc(ann("hybrid"), lb), nil)
	if m.ForwardingMode != "hybrid" || len(m.Unserved) != 0 {
		t.Errorf("annotation hybrid: mode %q, unserved %q", m.ForwardingMode, m.Unserved)
	}
	if m.HealthCheckNodePort != 31999 {
		t.Errorf("health check port %d, want 31999", m.HealthCheckNodePort)
	}
	// The IPv6 range is the IPv6 proxy's; host bits are masked.
	if want := []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24"), netip.MustParsePrefix("10.0.0.0/8")}; !slices.Equal(m.SourceRanges, want) {
		t.Errorf("source ranges %v, want %v", m.SourceRanges, want)
	}
	m = Convert(svc(ann("direct")), nil)
	if m.ForwardingMode != "" || len(m.Unserved) != 1 || !strings.Contains(m.Unserved[0], `"direct" is not one of snat, dsr, hybrid; the node pool's mode applies`) {
		t.Errorf("annotation direct: mode %q, unserved %q", m.ForwardingMode, m.Unserved)
	}
	// Ranges given but none usable: closed, not open.
	m = Convert(svc(func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeLoadBalancer
		s.Spec.LoadBalancerSourceRanges = []string{"nope"}
	}), nil)
	if len(m.SourceRanges) != 1 || m.SourceRanges[0] != netip.MustParsePrefix("0.0.0.0/32") {
		t.Errorf("unusable ranges: %v, want only 0.0.0.0/32 (no client)", m.SourceRanges)
	}
}
