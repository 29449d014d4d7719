package k8ssource

import (
	"fmt"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/weirnet/weir/core/model"
)

// defaultAffinityTimeout is Kubernetes' default for sessionAffinity
// ClientIP (three hours).
const defaultAffinityTimeout = 10800

// proxied reports whether Weir serves the service at all: headless and
// ExternalName services have no frontend to translate.
func proxied(svc *corev1.Service) bool {
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		return false
	}
	return svc.Spec.ClusterIP != corev1.ClusterIPNone
}

// Convert turns a Service and its EndpointSlices into a model service: one
// frontend per port and address (cluster IPs, external IPs, load-balancer
// ingress IPs, and the node port), each with the endpoints serving that
// port. It returns nil for a service with no IPv4 frontend. IPv6 addresses
// are ignored (the datapath is IPv4-only for now).
func Convert(svc *corev1.Service, slices_ []*discoveryv1.EndpointSlice) *model.Service {
	if !proxied(svc) {
		return nil
	}
	out := &model.Service{
		Name:   model.ServiceName{Namespace: svc.Namespace, Name: svc.Name},
		Source: Name,
	}
	if svc.Spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		out.AffinityTimeout = defaultAffinityTimeout
		if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil && *c.ClientIP.TimeoutSeconds > 0 {
			out.AffinityTimeout = uint32(*c.ClientIP.TimeoutSeconds)
		}
	}
	internalLocal := svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal
	externalLocal := svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal

	clusterIPs := svc.Spec.ClusterIPs
	if len(clusterIPs) == 0 && svc.Spec.ClusterIP != "" {
		clusterIPs = []string{svc.Spec.ClusterIP}
	}
	// A service whose cluster IPs are all IPv6 belongs to an IPv6 proxy,
	// as with kube-proxy's IPv4 proxier: none of its frontends are ours.
	if !slices.ContainsFunc(clusterIPs, func(s string) bool {
		a, err := netip.ParseAddr(s)
		return err == nil && a.Is4()
	}) {
		return nil
	}
	var lbIPs []string
	for _, in := range svc.Status.LoadBalancer.Ingress {
		// An ingress in Proxy mode is reached through the load balancer
		// (PROXY protocol, TLS termination), not short-circuited here.
		if in.IPMode != nil && *in.IPMode != corev1.LoadBalancerIPModeVIP {
			continue
		}
		lbIPs = append(lbIPs, in.IP)
	}
	for _, port := range svc.Spec.Ports {
		proto, err := model.ParseProto(string(port.Protocol))
		if err != nil || port.Port <= 0 || port.Port > 65535 {
			continue
		}
		if err := proto.Served(); err != nil {
			out.Unserved = append(out.Unserved, fmt.Sprintf("port %s (%d/%s): %v", port.Name, port.Port, port.Protocol, err))
			continue
		}
		backends := backendsFor(port, slices_)
		add := func(a netip.Addr, p int32, typ model.FrontendType) {
			out.Frontends = append(out.Frontends, model.Frontend{
				Addr: netip.AddrPortFrom(a, uint16(p)), Proto: proto, Type: typ, PortName: port.Name,
				Backends: backends, InternalLocal: internalLocal && typ == model.ClusterIP,
				ExternalLocal: externalLocal && typ != model.ClusterIP,
			})
		}
		addAll := func(addrs []string, typ model.FrontendType) {
			for _, s := range addrs {
				a, err := netip.ParseAddr(s)
				if err != nil || !a.Is4() {
					continue // IPv6 and malformed addresses: not this datapath's
				}
				if err := model.CheckFrontendAddr(a, typ); err != nil {
					out.Unserved = append(out.Unserved, fmt.Sprintf("%s %s: %v", typ, a, err))
					continue
				}
				add(a, port.Port, typ)
			}
		}
		addAll(clusterIPs, model.ClusterIP)
		addAll(svc.Spec.ExternalIPs, model.ExternalIP)
		if svc.Spec.Type == corev1.ServiceTypeLoadBalancer {
			addAll(lbIPs, model.LoadBalancer)
		}
		if port.NodePort > 0 && port.NodePort <= 65535 && (svc.Spec.Type == corev1.ServiceTypeNodePort || svc.Spec.Type == corev1.ServiceTypeLoadBalancer) {
			// On any address of the node: the north-south modules serve it.
			add(netip.IPv4Unspecified(), port.NodePort, model.NodePort)
		}
	}
	// Two ports of one service on the same frontend (the API server
	// rejects it, but a mirrored or hand-made object may have it): keep
	// the first.
	seen := map[model.FrontendKey]bool{}
	out.Frontends = slices.DeleteFunc(out.Frontends, func(f model.Frontend) bool {
		if seen[f.Key()] {
			return true
		}
		seen[f.Key()] = true
		return false
	})
	if len(out.Frontends) == 0 && len(out.Unserved) == 0 {
		return nil
	}
	return out
}

// backendsFor collects the IPv4 endpoints that serve a service port, by
// port name as EndpointSlices match them. Conditions follow Kubernetes:
// ready endpoints take new flows; serving-but-terminating ones keep their
// flows (and take new ones only when nothing else can); others are left
// out.
func backendsFor(port corev1.ServicePort, eps []*discoveryv1.EndpointSlice) []model.Backend {
	byAddr := map[netip.AddrPort]int{}
	var out []model.Backend
	for _, s := range eps {
		if s.AddressType != discoveryv1.AddressTypeIPv4 {
			continue
		}
		var num int32
		for _, p := range s.Ports {
			name := ""
			if p.Name != nil {
				name = *p.Name
			}
			proto := corev1.ProtocolTCP
			if p.Protocol != nil {
				proto = *p.Protocol
			}
			if name == port.Name && proto == port.Protocol && p.Port != nil {
				num = *p.Port
				break
			}
		}
		if num <= 0 || num > 65535 {
			continue
		}
		for _, ep := range s.Endpoints {
			st, ok := state(ep.Conditions)
			if !ok || len(ep.Addresses) == 0 {
				continue
			}
			a, err := netip.ParseAddr(ep.Addresses[0])
			if err != nil || !a.Is4() {
				continue
			}
			b := model.Backend{Addr: netip.AddrPortFrom(a, uint16(num)), State: st}
			if ep.NodeName != nil {
				b.NodeName = *ep.NodeName
			}
			// An endpoint moving between slices may show up twice for a
			// moment; the more available state wins.
			if i, dup := byAddr[b.Addr]; dup {
				if b.State == model.Active {
					out[i] = b
				}
				continue
			}
			byAddr[b.Addr] = len(out)
			out = append(out, b)
		}
	}
	slices.SortFunc(out, func(a, b model.Backend) int { return a.Addr.Compare(b.Addr) })
	return out
}

// state reads endpoint conditions as kube-proxy does: a ready endpoint
// takes new flows (even a terminating one, which the EndpointSlice
// controller reports ready for publishNotReadyAddresses); one serving and
// terminating only keeps its flows; nil conditions mean true.
func state(c discoveryv1.EndpointConditions) (model.BackendState, bool) {
	ready := c.Ready == nil || *c.Ready
	serving := c.Serving == nil || *c.Serving
	terminating := c.Terminating != nil && *c.Terminating
	switch {
	case ready:
		return model.Active, true
	case serving && terminating:
		return model.Terminating, true
	}
	return 0, false
}

// ConvertNode turns a Node into a model node: its first IPv4 InternalIP,
// its IPv4 pod CIDRs and its labels. It returns nil without an IPv4
// InternalIP.
func ConvertNode(n *corev1.Node) *model.Node {
	out := &model.Node{Name: n.Name, Labels: n.Labels}
	for _, a := range n.Status.Addresses {
		if ip, err := netip.ParseAddr(a.Address); a.Type == corev1.NodeInternalIP && err == nil && ip.Is4() {
			out.IP = ip
			break
		}
	}
	if !out.IP.IsValid() {
		return nil
	}
	cidrs := n.Spec.PodCIDRs
	if len(cidrs) == 0 && n.Spec.PodCIDR != "" {
		cidrs = []string{n.Spec.PodCIDR}
	}
	for _, c := range cidrs {
		if p, err := netip.ParsePrefix(c); err == nil && p.Addr().Is4() && p.Masked() == p {
			out.PodCIDRs = append(out.PodCIDRs, p)
		}
	}
	return out
}
