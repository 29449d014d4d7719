package lab

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"

	"github.com/weirnet/weir/core/strictyaml"
)

// Spec is a lab topology, as in examples/lab/*.yaml.
type Spec struct {
	// Name prefixes every namespace, link and directory of the lab.
	Name string `yaml:"name" json:"name"`
	// Underlay is the subnet of the shared underlay bridge; nodes get
	// addresses from .11 on.
	Underlay string `yaml:"underlay" json:"underlay"`
	// AgentConfig is the agents' configuration file (relative to the spec
	// file); empty uses DefaultAgentConfig.
	AgentConfig string `yaml:"agentConfig" json:"agentConfig,omitempty"`
	// Services is a services file every node starts with (relative to
	// the spec file); empty starts without services.
	Services string `yaml:"services" json:"services,omitempty"`
	// Kubernetes runs a real control plane (etcd, kube-apiserver,
	// kube-controller-manager) on the underlay; agents follow it and each
	// node gets a kubelet that runs Pod objects through weir-cni. Pods of
	// the spec become Pod objects; services come from the API.
	Kubernetes bool       `yaml:"kubernetes" json:"kubernetes,omitempty"`
	Nodes      []NodeSpec `yaml:"nodes" json:"nodes"`
	// Externals are hosts outside the cluster: clients on the underlay,
	// and hosts beyond the lab's router in networks of their own (the
	// "internet").
	Externals []ExternalSpec `yaml:"externals" json:"externals,omitempty"`
}

// ExternalSpec is a host outside the cluster.
type ExternalSpec struct {
	Name string `yaml:"name" json:"name"`
	// Subnet, when set, puts the host beyond the lab's router in a
	// network of its own: the router takes .1 of it, the host .10, and
	// nodes reach it through their default route (the router's underlay
	// address). Empty: the host sits on the underlay itself.
	Subnet string `yaml:"subnet" json:"subnet,omitempty"`
	// Routes send prefixes (load-balancer and external IPs) from a host on
	// the underlay to a node, as an announcement by BGP or ARP would:
	// prefix -> node name.
	Routes map[string]string `yaml:"routes" json:"routes,omitempty"`
	Serve  Workload          `yaml:"serve" json:"serve"`
}

// Underlay addresses the lab gives hosts that are not nodes: nodes take
// .11 to .210 (at most 200), externals on the underlay .240 on, the router
// .254.
const (
	externalFirstHost = 240
	maxUnderlayHosts  = 254 - externalFirstHost
	routerHost        = 254
)

// NodeSpec is one node.
type NodeSpec struct {
	Name    string            `yaml:"name" json:"name"`
	Labels  map[string]string `yaml:"labels" json:"labels,omitempty"`
	PodCIDR string            `yaml:"podCIDR" json:"podCIDR"`
	Pods    []PodSpec         `yaml:"pods" json:"pods,omitempty"`
}

// PodSpec is one pod.
type PodSpec struct {
	Name string `yaml:"name" json:"name"`
	// IP is the pod's address; empty takes the next free one from .10 of
	// the node's pod CIDR. With Kubernetes, weir-cni allocates it.
	IP    string   `yaml:"ip" json:"ip,omitempty"`
	Serve Workload `yaml:"serve" json:"serve"`
	// Namespace and Labels of the Pod object (Kubernetes mode).
	Namespace string            `yaml:"namespace" json:"namespace,omitempty"`
	Labels    map[string]string `yaml:"labels" json:"labels,omitempty"`
}

// DefaultAgentConfig is used when a spec names none.
const DefaultAgentConfig = `modules: [endpoints, lb]
datapath:
  ctMaxEntries: 65536
`

var (
	labName  = regexp.MustCompile(`^[a-z][a-z0-9]{0,7}$`)
	nodeName = regexp.MustCompile(`^[a-z][a-z0-9]{0,9}$`)
	podName  = regexp.MustCompile(`^[a-z][a-z0-9-]{0,14}$`)
)

// LoadSpec reads and validates a spec file, resolving its relative paths.
func LoadSpec(path string) (*Spec, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading lab spec: %w", err)
	}
	var s Spec
	if err := strictyaml.Decode(path, data, &s); err != nil {
		return nil, err
	}
	dir := filepath.Dir(path)
	for _, p := range []*string{&s.AgentConfig, &s.Services} {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(dir, *p)
		}
	}
	if err := s.Validate(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &s, nil
}

// Validate checks names (they become namespace and interface names, so
// they are short), addresses, and fills in defaults.
func (s *Spec) Validate() error {
	if !labName.MatchString(s.Name) {
		return fmt.Errorf("name: %q must be 1 to 8 lower-case letters or digits, starting with a letter", s.Name)
	}
	if s.Underlay == "" {
		s.Underlay = "192.168.100.0/24"
	}
	ul, err := netip.ParsePrefix(s.Underlay)
	if err != nil || !ul.Addr().Is4() || ul.Bits() > 24 {
		return fmt.Errorf("underlay: %q must be an IPv4 subnet of /24 or larger", s.Underlay)
	}
	if len(s.Nodes) == 0 {
		return fmt.Errorf("nodes: a lab needs at least one node")
	}
	if len(s.Nodes) > 200 {
		return fmt.Errorf("nodes: at most 200 nodes")
	}
	nodes := map[string]bool{}
	pods := map[string]string{}
	ips := map[netip.Addr]string{}
	for i := range s.Nodes {
		n := &s.Nodes[i]
		np := fmt.Sprintf("nodes[%d]", i)
		if !nodeName.MatchString(n.Name) {
			return fmt.Errorf("%s.name: %q must be 1 to 10 lower-case letters or digits, starting with a letter", np, n.Name)
		}
		if nodes[n.Name] {
			return fmt.Errorf("%s.name: node %q is defined twice", np, n.Name)
		}
		nodes[n.Name] = true
		cidr, err := netip.ParsePrefix(n.PodCIDR)
		if err != nil || !cidr.Addr().Is4() || cidr.Bits() > 28 || cidr.Masked() != cidr {
			return fmt.Errorf("%s.podCIDR: %q must be an IPv4 network of /28 or larger", np, n.PodCIDR)
		}
		if cidr.Overlaps(ul) {
			return fmt.Errorf("%s.podCIDR: %s overlaps the underlay %s", np, cidr, ul)
		}
		next := cidr.Addr()
		for range 10 {
			next = next.Next()
		}
		for j := range n.Pods {
			p := &n.Pods[j]
			pp := fmt.Sprintf("%s.pods[%d]", np, j)
			if !podName.MatchString(p.Name) {
				return fmt.Errorf("%s.name: %q must be 1 to 15 lower-case letters, digits or '-'", pp, p.Name)
			}
			if other, dup := pods[p.Name]; dup {
				return fmt.Errorf("%s.name: pod %q is already defined on node %s", pp, p.Name, other)
			}
			pods[p.Name] = n.Name
			if s.Kubernetes {
				if p.IP != "" {
					return fmt.Errorf("%s.ip: with kubernetes: true, weir-cni allocates pod addresses; leave ip out", pp)
				}
				continue
			}
			if p.Namespace != "" || len(p.Labels) > 0 {
				return fmt.Errorf("%s: namespace and labels apply only with kubernetes: true", pp)
			}
			if p.IP == "" {
				for ips[next] != "" {
					next = next.Next()
				}
				p.IP = next.String()
			}
			a, err := netip.ParseAddr(p.IP)
			if err != nil || !cidr.Contains(a) || a == cidr.Addr() {
				return fmt.Errorf("%s.ip: %q must be an address inside %s", pp, p.IP, cidr)
			}
			if other, dup := ips[a]; dup {
				return fmt.Errorf("%s.ip: %s is already used by pod %s", pp, a, other)
			}
			ips[a] = p.Name
			for _, port := range []int{p.Serve.HTTP, p.Serve.UDP, p.Serve.Echo, p.Serve.Sink, p.Serve.DNS, p.Serve.Source} {
				if port < 0 || port > 65535 {
					return fmt.Errorf("%s.serve: port %d is out of range (1 to 65535)", pp, port)
				}
			}
		}
	}
	return s.validateExternals(nodes, ul)
}

func (s *Spec) validateExternals(nodes map[string]bool, ul netip.Prefix) error {
	names := map[string]bool{}
	onUnderlay := 0
	var subnets []netip.Prefix
	for i := range s.Externals {
		e := &s.Externals[i]
		ep := fmt.Sprintf("externals[%d]", i)
		if !nodeName.MatchString(e.Name) {
			return fmt.Errorf("%s.name: %q must be 1 to 10 lower-case letters or digits, starting with a letter", ep, e.Name)
		}
		if names[e.Name] || nodes[e.Name] {
			return fmt.Errorf("%s.name: %q is already the name of a node or an external host", ep, e.Name)
		}
		names[e.Name] = true
		for _, port := range []int{e.Serve.HTTP, e.Serve.UDP, e.Serve.Echo, e.Serve.Sink, e.Serve.DNS} {
			if port < 0 || port > 65535 {
				return fmt.Errorf("%s.serve: port %d is out of range (1 to 65535)", ep, port)
			}
		}
		if e.Subnet == "" {
			onUnderlay++
			if onUnderlay > maxUnderlayHosts {
				return fmt.Errorf("%s: at most %d external hosts sit on the underlay", ep, maxUnderlayHosts)
			}
		} else {
			sn, err := netip.ParsePrefix(e.Subnet)
			if err != nil || !sn.Addr().Is4() || sn.Bits() > 28 || sn.Masked() != sn {
				return fmt.Errorf("%s.subnet: %q must be an IPv4 network of /28 or larger", ep, e.Subnet)
			}
			if sn.Overlaps(ul) {
				return fmt.Errorf("%s.subnet: %s overlaps the underlay %s", ep, sn, ul)
			}
			for _, n := range s.Nodes {
				if c, err := netip.ParsePrefix(n.PodCIDR); err == nil && c.Overlaps(sn) {
					return fmt.Errorf("%s.subnet: %s overlaps the pod CIDR of node %s", ep, sn, n.Name)
				}
			}
			for _, o := range subnets {
				if o.Overlaps(sn) {
					return fmt.Errorf("%s.subnet: %s overlaps another external subnet %s", ep, sn, o)
				}
			}
			subnets = append(subnets, sn)
			if len(e.Routes) > 0 {
				return fmt.Errorf("%s.routes: only hosts on the underlay (no subnet) take routes to nodes", ep)
			}
		}
		for pfx, node := range e.Routes {
			p, err := netip.ParsePrefix(pfx)
			if err != nil || !p.Addr().Is4() || p.Masked() != p {
				return fmt.Errorf("%s.routes: %q is not an IPv4 prefix (as 198.51.100.0/24)", ep, pfx)
			}
			if !nodes[node] {
				return fmt.Errorf("%s.routes[%s]: no node %q", ep, pfx, node)
			}
		}
	}
	return nil
}
