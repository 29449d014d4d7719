package k8ssource

import (
	"net/netip"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/weirnet/weir/core/model"
)

// The informers' caches keep compact records instead of the objects as
// served: what conversion, the ownership of frontends (creation time) and
// the informers themselves (name, namespace, resource version) read, and
// no more. At ten thousand services of ten endpoints the objects as
// decoded are most of the agent's memory: managed fields, selectors,
// target references, a 96-byte struct and three allocations per endpoint.
// The transforms below build the records; each may see a record again
// (it passes unchanged), and objects of other types pass unchanged too.

// identity is the part of an object's metadata every cache keeps.
func identity(m *metav1.ObjectMeta) metav1.ObjectMeta {
	return metav1.ObjectMeta{Name: m.Name, Namespace: m.Namespace, ResourceVersion: m.ResourceVersion,
		CreationTimestamp: m.CreationTimestamp, DeletionTimestamp: m.DeletionTimestamp}
}

// service is what the cache keeps of a Service.
type service struct {
	meta
	// proxied: neither headless nor ExternalName, so there is something
	// to translate.
	proxied       bool
	typ           corev1.ServiceType
	clusterIPs    []string
	externalIPs   []string
	lbIPs         []string // ingress IPs in VIP mode
	ports         []corev1.ServicePort
	affinity      uint32 // seconds of sessionAffinity ClientIP, 0 without
	healthCheck   uint16 // healthCheckNodePort, 0 without
	mode          string // the forwarding-mode annotation, as written
	sourceRanges  []string
	internalLocal bool
	externalLocal bool
}

// defaultAffinityTimeout is Kubernetes' default for sessionAffinity
// ClientIP (three hours).
const defaultAffinityTimeout = 10800

func compactService(svc *corev1.Service) *service {
	out := &service{
		meta:          metaOf(&svc.ObjectMeta),
		proxied:       svc.Spec.Type != corev1.ServiceTypeExternalName && svc.Spec.ClusterIP != corev1.ClusterIPNone,
		typ:           svc.Spec.Type,
		clusterIPs:    svc.Spec.ClusterIPs,
		externalIPs:   svc.Spec.ExternalIPs,
		internalLocal: svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal,
		externalLocal: svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal,
	}
	out.mode = svc.Annotations[model.ForwardingModeAnnotation]
	if out.externalLocal && svc.Spec.HealthCheckNodePort > 0 && svc.Spec.HealthCheckNodePort <= 65535 {
		out.healthCheck = uint16(svc.Spec.HealthCheckNodePort)
	}
	if svc.Spec.Type == corev1.ServiceTypeLoadBalancer {
		out.sourceRanges = svc.Spec.LoadBalancerSourceRanges
	}
	if len(out.clusterIPs) == 0 && svc.Spec.ClusterIP != "" {
		out.clusterIPs = []string{svc.Spec.ClusterIP}
	}
	if svc.Spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		out.affinity = defaultAffinityTimeout
		if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil && *c.ClientIP.TimeoutSeconds > 0 {
			out.affinity = uint32(*c.ClientIP.TimeoutSeconds)
		}
	}
	for _, in := range svc.Status.LoadBalancer.Ingress {
		// An ingress in Proxy mode is reached through the load balancer
		// (PROXY protocol, TLS termination), not short-circuited here.
		if in.IPMode != nil && *in.IPMode != corev1.LoadBalancerIPModeVIP {
			continue
		}
		out.lbIPs = append(out.lbIPs, in.IP)
	}
	// Only what conversion reads of each port.
	out.ports = make([]corev1.ServicePort, len(svc.Spec.Ports))
	for i, p := range svc.Spec.Ports {
		proto := p.Protocol
		if proto == "" {
			proto = corev1.ProtocolTCP
		}
		out.ports[i] = corev1.ServicePort{Name: p.Name, Protocol: proto, Port: p.Port, NodePort: p.NodePort}
	}
	return out
}

// endpointSlice is what the cache keeps of an EndpointSlice: its
// service, its ports, and the endpoints that serve (IPv4 slices only: the
// datapath is IPv4).
type endpointSlice struct {
	meta
	service   string
	ports     []endpointPort
	endpoints []endpoint
}

type endpointPort struct {
	name  string
	proto corev1.Protocol
	port  int32
}

type endpoint struct {
	addr  [4]byte
	state model.BackendState
	node  *string
	zone  *string
	hints *model.Hints // shared between endpoints with equal hints
}

func compactSlice(es *discoveryv1.EndpointSlice) *endpointSlice {
	out := &endpointSlice{meta: metaOf(&es.ObjectMeta), service: es.Labels[discoveryv1.LabelServiceName]}
	if es.AddressType != discoveryv1.AddressTypeIPv4 {
		return out
	}
	for _, p := range es.Ports {
		ep := endpointPort{proto: corev1.ProtocolTCP}
		if p.Name != nil {
			ep.name = *p.Name
		}
		if p.Protocol != nil {
			ep.proto = *p.Protocol
		}
		if p.Port != nil {
			ep.port = *p.Port
		}
		out.ports = append(out.ports, ep)
	}
	for _, e := range es.Endpoints {
		st, ok := state(e.Conditions)
		if !ok || len(e.Addresses) == 0 {
			continue
		}
		a, err := netip.ParseAddr(e.Addresses[0])
		if err != nil || !a.Is4() {
			continue
		}
		out.endpoints = append(out.endpoints, endpoint{addr: a.As4(), state: st,
			node: sharedStrings.of(e.NodeName), zone: sharedStrings.of(e.Zone), hints: sharedHints.of(e.Hints)})
	}
	return out
}

// shared hands out one pointer per distinct value, so that the endpoints
// of a cluster share their node names and zones.
type shared[T comparable] struct {
	mu sync.Mutex
	m  map[T]*T
}

func (s *shared[T]) of(p *T) *T {
	if p == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[T]*T{}
	}
	if q, ok := s.m[*p]; ok {
		return q
	}
	v := *p
	s.m[v] = &v
	return &v
}

// Node names and zones are few in any cluster; the set grows with them
// and is never pruned.
var sharedStrings shared[string]

// hintsTable hands out one *model.Hints per distinct set of hints: a
// cluster has few (a zone or a node each), endpoints many.
type hintsTable struct {
	mu sync.Mutex
	m  map[string]*model.Hints
}

func (h *hintsTable) of(in *discoveryv1.EndpointHints) *model.Hints {
	if in == nil || len(in.ForZones) == 0 && len(in.ForNodes) == 0 {
		return nil
	}
	var key strings.Builder
	for _, z := range in.ForZones {
		key.WriteString(z.Name)
		key.WriteByte(0)
	}
	key.WriteByte(1)
	for _, n := range in.ForNodes {
		key.WriteString(n.Name)
		key.WriteByte(0)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if got, ok := h.m[key.String()]; ok {
		return got
	}
	out := &model.Hints{}
	for _, z := range in.ForZones {
		out.Zones = append(out.Zones, z.Name)
	}
	for _, n := range in.ForNodes {
		out.Nodes = append(out.Nodes, n.Name)
	}
	if h.m == nil {
		h.m = map[string]*model.Hints{}
	}
	h.m[key.String()] = out
	return out
}

// Like node names, the sets of hints a cluster uses are few; the table
// grows with them and is never pruned.
var sharedHints hintsTable

func trimService(o any) (any, error) {
	if svc, ok := o.(*corev1.Service); ok {
		return compactService(svc), nil
	}
	return o, nil
}

func trimSlice(o any) (any, error) {
	if es, ok := o.(*discoveryv1.EndpointSlice); ok {
		return compactSlice(es), nil
	}
	return o, nil
}

func trimNode(o any) (any, error) {
	n, ok := o.(*corev1.Node)
	if !ok {
		return o, nil
	}
	out := &corev1.Node{ObjectMeta: identity(&n.ObjectMeta), Spec: n.Spec}
	out.Labels = n.Labels // the node's pool follows them
	out.Status.Addresses = n.Status.Addresses
	return out, nil
}

// trimPod keeps a pod's identity only: the agent asks whether a pod
// exists.
func trimPod(o any) (any, error) {
	p, ok := o.(*corev1.Pod)
	if !ok {
		return o, nil
	}
	return &corev1.Pod{ObjectMeta: identity(&p.ObjectMeta), Spec: corev1.PodSpec{NodeName: p.Spec.NodeName}}, nil
}
