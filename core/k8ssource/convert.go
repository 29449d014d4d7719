package k8ssource

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/weirnet/weir/core/model"
)

// Convert turns a Service and its EndpointSlices into a model service: one
// frontend per port and address (cluster IPs, external IPs, load-balancer
// ingress IPs, and the node port), each with the endpoints serving that
// port. It returns nil for a service with no IPv4 frontend. IPv6 addresses
// are ignored (the datapath is IPv4-only for now).
func Convert(svc *corev1.Service, slices_ []*discoveryv1.EndpointSlice) *model.Service {
	eps := make([]*endpointSlice, len(slices_))
	for i, es := range slices_ {
		eps[i] = compactSlice(es)
	}
	return convert(compactService(svc), eps)
}

// convert is Convert from what the caches keep.
func convert(svc *service, eps []*endpointSlice) *model.Service {
	if !svc.proxied {
		return nil
	}
	out := &model.Service{
		Name:                model.ServiceName{Namespace: svc.Namespace, Name: svc.Name},
		Source:              Name,
		AffinityTimeout:     svc.affinity,
		HealthCheckNodePort: svc.healthCheck,
	}
	// An annotation value the datapath does not know leaves the pool's
	// mode in force, and is said so.
	if mode, err := model.ParseForwardingMode(svc.mode); err != nil {
		out.Unserved = append(out.Unserved, fmt.Sprintf("annotation %s: %v; the node pool's mode applies", model.ForwardingModeAnnotation, err))
	} else {
		out.ForwardingMode = mode
	}
	// Ranges that do not parse are left out and said so, as kube-proxy
	// leaves them out (the API server validates them on write).
	for _, r := range svc.sourceRanges {
		p, err := netip.ParsePrefix(strings.TrimSpace(r))
		if err != nil {
			out.Unserved = append(out.Unserved, fmt.Sprintf("loadBalancerSourceRanges %q is not a CIDR", r))
			continue
		}
		if !p.Addr().Is4() {
			continue // the IPv6 proxy's
		}
		out.SourceRanges = append(out.SourceRanges, p.Masked())
	}
	// Ranges given but none usable: closed to every client, not open to
	// all (0.0.0.0 is never a source).
	if len(svc.sourceRanges) > 0 && len(out.SourceRanges) == 0 && len(out.Unserved) > 0 {
		out.SourceRanges = []netip.Prefix{netip.PrefixFrom(netip.IPv4Unspecified(), 32)}
	}
	// A service whose cluster IPs are all IPv6 belongs to an IPv6 proxy,
	// as with kube-proxy's IPv4 proxier: none of its frontends are ours.
	if !slices.ContainsFunc(svc.clusterIPs, func(s string) bool {
		a, err := netip.ParseAddr(s)
		return err == nil && a.Is4()
	}) {
		return nil
	}
	for _, port := range svc.ports {
		proto, err := model.ParseProto(string(port.Protocol))
		if err != nil || port.Port <= 0 || port.Port > 65535 {
			continue
		}
		if err := proto.Served(); err != nil {
			out.Unserved = append(out.Unserved, fmt.Sprintf("port %s (%d/%s): %v", port.Name, port.Port, port.Protocol, err))
			continue
		}
		backends := backendsFor(port, eps)
		add := func(a netip.Addr, p int32, typ model.FrontendType) {
			out.Frontends = append(out.Frontends, model.Frontend{
				Addr: netip.AddrPortFrom(a, uint16(p)), Proto: proto, Type: typ, PortName: port.Name,
				Backends: backends, InternalLocal: svc.internalLocal && typ == model.ClusterIP,
				ExternalLocal: svc.externalLocal && typ != model.ClusterIP,
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
		addAll(svc.clusterIPs, model.ClusterIP)
		addAll(svc.externalIPs, model.ExternalIP)
		if svc.typ == corev1.ServiceTypeLoadBalancer {
			addAll(svc.lbIPs, model.LoadBalancer)
		}
		if port.NodePort > 0 && port.NodePort <= 65535 && (svc.typ == corev1.ServiceTypeNodePort || svc.typ == corev1.ServiceTypeLoadBalancer) {
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
// flows (and take new ones only when nothing else can); others were left
// out of the cache already.
func backendsFor(port corev1.ServicePort, eps []*endpointSlice) []model.Backend {
	n := 0
	for _, s := range eps {
		n += len(s.endpoints)
	}
	// Sized once: a hundred thousand backends are the model's bulk.
	out := make([]model.Backend, 0, n)
	byAddr := make(map[netip.AddrPort]int, n)
	for _, s := range eps {
		var num int32
		for _, p := range s.ports {
			if p.name == port.Name && p.proto == port.Protocol && p.port != 0 {
				num = p.port
				break
			}
		}
		if num <= 0 || num > 65535 {
			continue
		}
		for _, ep := range s.endpoints {
			b := model.Backend{Addr: netip.AddrPortFrom(netip.AddrFrom4(ep.addr), uint16(num)), State: ep.state, Hints: ep.hints}
			if ep.node != nil {
				b.NodeName = *ep.node
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
	if len(out) == 0 {
		return nil
	}
	return slices.Clip(out)
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
