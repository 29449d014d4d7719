// Package model is the desired state every source feeds and the reconcilers
// read: services as frontends with their backends, already resolved from
// whatever the source speaks (Kubernetes objects, a YAML file).
package model

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Proto is an IP protocol number.
type Proto uint8

// Protocols a frontend can carry.
const (
	TCP  Proto = 6
	UDP  Proto = 17
	SCTP Proto = 132
)

func (p Proto) String() string {
	switch p {
	case TCP:
		return "TCP"
	case UDP:
		return "UDP"
	case SCTP:
		return "SCTP"
	}
	return fmt.Sprintf("proto-%d", uint8(p))
}

// ParseProto accepts a Kubernetes protocol name; empty means TCP.
func ParseProto(s string) (Proto, error) {
	switch strings.ToUpper(s) {
	case "", "TCP":
		return TCP, nil
	case "UDP":
		return UDP, nil
	case "SCTP":
		return SCTP, nil
	}
	return 0, fmt.Errorf("%q is not a protocol; allowed: TCP, UDP, SCTP", s)
}

// Served says whether the datapath can serve frontends of the protocol:
// nil, or why not.
func (p Proto) Served() error {
	switch p {
	case TCP, UDP:
		return nil
	case SCTP:
		return errors.New("SCTP is not served: the datapath translates TCP and UDP only (SCTP would need its CRC32c checksum recomputed)")
	}
	return fmt.Errorf("protocol %s is not served: the datapath translates TCP and UDP only", p)
}

// CheckFrontendAddr refuses addresses a frontend of type typ cannot have:
// not IPv4, loopback, link-local, multicast, the broadcast address, and
// the unspecified address (except for NodePort frontends, which it stands
// for every address of the node).
func CheckFrontendAddr(a netip.Addr, typ FrontendType) error {
	switch {
	case !a.Is4():
		return fmt.Errorf("address %s is not IPv4 (only IPv4 is supported)", a)
	case a.IsUnspecified():
		if typ == NodePort {
			return nil
		}
		return fmt.Errorf("%s cannot be a service address", a)
	case a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return fmt.Errorf("%s is the broadcast address and cannot be a service address", a)
	case a.IsMulticast():
		return fmt.Errorf("%s is a multicast address and cannot be a service address", a)
	case a.IsLoopback(), a.IsLinkLocalUnicast():
		return fmt.Errorf("%s cannot be a service address (loopback and link-local addresses stay on their host)", a)
	}
	return nil
}

// FrontendType is how a frontend is reached.
type FrontendType uint8

// Frontend types (the same numbers as enum weir_svc_type).
const (
	ClusterIP    FrontendType = 1
	NodePort     FrontendType = 2
	LoadBalancer FrontendType = 3
	ExternalIP   FrontendType = 4
)

func (t FrontendType) String() string {
	switch t {
	case ClusterIP:
		return "ClusterIP"
	case NodePort:
		return "NodePort"
	case LoadBalancer:
		return "LoadBalancer"
	case ExternalIP:
		return "ExternalIP"
	}
	return fmt.Sprintf("type-%d", uint8(t))
}

// BackendState says whether a backend takes new flows.
type BackendState uint8

// Backend states.
const (
	// Active backends get new flows.
	Active BackendState = 0
	// Terminating backends keep their flows and get new ones only when no
	// backend of the frontend is active (Kubernetes serving-terminating).
	Terminating BackendState = 1
)

func (s BackendState) String() string {
	if s == Terminating {
		return "terminating"
	}
	return "active"
}

// Forwarding modes a service can ask for.
const (
	ForwardSNAT   = "snat"
	ForwardDSR    = "dsr"
	ForwardHybrid = "hybrid"
)

// ForwardingModeAnnotation is the Service annotation (and the services
// file's forwardingMode) that overrides the pool's mode for one service.
const ForwardingModeAnnotation = "service.weir.dev/forwarding-mode"

// ParseForwardingMode checks a forwarding mode's value.
func ParseForwardingMode(s string) (string, error) {
	switch s {
	case "", ForwardSNAT, ForwardDSR, ForwardHybrid:
		return s, nil
	}
	return "", fmt.Errorf("%q is not one of snat, dsr, hybrid", s)
}

// ServiceName identifies a service.
type ServiceName struct {
	Namespace, Name string
}

func (n ServiceName) String() string { return n.Namespace + "/" + n.Name }

// Backend is one endpoint of a frontend.
type Backend struct {
	Addr     netip.AddrPort
	State    BackendState
	NodeName string
	// Hints, when set, are the zones and nodes the endpoint is meant for
	// (EndpointSlice hints, written for a Service's trafficDistribution):
	// see Frontend.ClusterBackends for when they apply. Equal hints may
	// share one value; it is never changed once set.
	Hints *Hints
}

// Hints say for which zones and which nodes an endpoint should take
// cluster-wide traffic.
type Hints struct {
	Zones []string
	Nodes []string
}

// Equal reports whether two backends are the same, hints by value.
func (b Backend) Equal(o Backend) bool {
	if b.Addr != o.Addr || b.State != o.State || b.NodeName != o.NodeName {
		return false
	}
	if b.Hints == o.Hints {
		return true
	}
	if b.Hints == nil || o.Hints == nil {
		return false
	}
	return slices.Equal(b.Hints.Zones, o.Hints.Zones) && slices.Equal(b.Hints.Nodes, o.Hints.Nodes)
}

// Frontend is an address clients use, with the backends behind it.
type Frontend struct {
	Addr     netip.AddrPort
	Proto    Proto
	Type     FrontendType
	PortName string
	Backends []Backend
	// InternalLocal (internalTrafficPolicy: Local) sends in-cluster
	// traffic to a ClusterIP only to backends on the client's node.
	InternalLocal bool
	// ExternalLocal (externalTrafficPolicy: Local) sends traffic from
	// outside the cluster to a NodePort, load-balancer or external IP only
	// to backends on the receiving node; in-cluster clients still use
	// every backend, as with kube-proxy.
	ExternalLocal bool
}

// Key identifies the frontend in the datapath.
func (f Frontend) Key() FrontendKey { return FrontendKey{Addr: f.Addr, Proto: f.Proto} }

// FrontendKey is what two frontends may not share.
type FrontendKey struct {
	Addr  netip.AddrPort
	Proto Proto
}

func (k FrontendKey) String() string { return k.Addr.String() + "/" + k.Proto.String() }

// Service is a named set of frontends.
type Service struct {
	Name      ServiceName
	Frontends []Frontend
	// AffinityTimeout, when non-zero, keeps a client on one backend for
	// that many seconds (sessionAffinity: ClientIP).
	AffinityTimeout uint32
	// HealthCheckNodePort, when non-zero, is the port on every node where
	// external load balancers learn whether the node has local backends
	// (externalTrafficPolicy Local), as kube-proxy answers it.
	HealthCheckNodePort uint16
	// SourceRanges, when set, are the only clients outside the cluster
	// its load-balancer IPs take traffic from (loadBalancerSourceRanges).
	SourceRanges []netip.Prefix
	// ForwardingMode overrides, for this service, how the node pool's
	// NodePort dispatch module sends flows to backends on other nodes:
	// ForwardSNAT, ForwardDSR, ForwardHybrid, or "" for the pool's mode.
	ForwardingMode string
	// Source names the source that defined the service.
	Source string
	// Unserved lists what a source left out because the datapath cannot
	// serve it (an SCTP port, say), for it to report.
	Unserved []string
}

// Validate checks one service on its own.
func (s *Service) Validate() error {
	if s.Name.Name == "" {
		return fmt.Errorf("service has no name")
	}
	for i, f := range s.Frontends {
		if err := f.validate(); err != nil {
			return fmt.Errorf("service %s: frontend %d: %w", s.Name, i, err)
		}
		// A service has a few frontends: earlier ones are looked through.
		if slices.ContainsFunc(s.Frontends[:i], func(o Frontend) bool { return o.Key() == f.Key() }) {
			return fmt.Errorf("service %s: frontend %s is listed twice", s.Name, f.Key())
		}
	}
	return nil
}

func (f *Frontend) validate() error {
	if err := CheckFrontendAddr(f.Addr.Addr(), f.Type); err != nil {
		return err
	}
	if f.Addr.Port() == 0 {
		return fmt.Errorf("%s: port 0 is not allowed (1-65535)", f.Addr)
	}
	if err := f.Proto.Served(); err != nil {
		return fmt.Errorf("%s: %w", f.Addr, err)
	}
	switch f.Type {
	case ClusterIP, NodePort, LoadBalancer, ExternalIP:
	default:
		return fmt.Errorf("%s: unknown frontend type %d", f.Addr, f.Type)
	}
	// Backends sorted by address (as the sources give them) are checked
	// for duplicates against the previous one; others through a set.
	sorted := slices.IsSortedFunc(f.Backends, func(a, b Backend) int { return a.Addr.Compare(b.Addr) })
	var seen map[netip.AddrPort]bool
	if !sorted {
		seen = make(map[netip.AddrPort]bool, len(f.Backends))
	}
	for i, b := range f.Backends {
		a := b.Addr.Addr()
		if !a.Is4() {
			return fmt.Errorf("%s: backend address %s is not IPv4", f.Addr, a)
		}
		if a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() {
			return fmt.Errorf("%s: %s cannot be a backend address", f.Addr, a)
		}
		if b.Addr.Port() == 0 {
			return fmt.Errorf("%s: backend %s: port 0 is not allowed (1-65535)", f.Addr, a)
		}
		dup := seen[b.Addr]
		if sorted {
			dup = i > 0 && f.Backends[i-1].Addr == b.Addr
		} else {
			seen[b.Addr] = true
		}
		if dup {
			return fmt.Errorf("%s: backend %s is listed twice", f.Addr, b.Addr)
		}
	}
	return nil
}

// Snapshot is an immutable desired state: every service and node of every
// source.
type Snapshot struct {
	Services []*Service // sorted by name
	Nodes    []*Node    // sorted by name
}

// Frontends returns every frontend with its service, sorted by key.
func (s *Snapshot) Frontends() []FrontendOf {
	var out []FrontendOf
	for _, svc := range s.Services {
		for i := range svc.Frontends {
			out = append(out, FrontendOf{Service: svc, Frontend: &svc.Frontends[i]})
		}
	}
	slices.SortFunc(out, func(a, b FrontendOf) int { return compareKeys(a.Frontend.Key(), b.Frontend.Key()) })
	return out
}

// FrontendOf is a frontend and the service it belongs to.
type FrontendOf struct {
	Service  *Service
	Frontend *Frontend
}

func compareKeys(a, b FrontendKey) int {
	if c := a.Addr.Addr().Compare(b.Addr.Addr()); c != 0 {
		return c
	}
	if c := cmp.Compare(a.Addr.Port(), b.Addr.Port()); c != 0 {
		return c
	}
	return cmp.Compare(a.Proto, b.Proto)
}
