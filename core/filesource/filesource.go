// Package filesource reads services and their backends from a YAML file
// (the lab's and standalone mode's source) and follows its changes. A file
// with any error is rejected as a whole: the services it would replace keep
// serving, and the error names the file, line and field.
package filesource

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/weirnet/weir/core/model"
	"github.com/weirnet/weir/core/strictyaml"
)

// Name is the source's name in the model store.
const Name = "file"

// File is the document format.
type File struct {
	Services []Service `yaml:"services"`
	// Nodes describe the cluster's nodes when no Kubernetes API does.
	Nodes []Node `yaml:"nodes"`
}

// Node is one node of the cluster.
type Node struct {
	Name     string            `yaml:"name"`
	IP       string            `yaml:"ip"`
	PodCIDRs []string          `yaml:"podCIDRs"`
	Labels   map[string]string `yaml:"labels"`
}

// Contents is what a file declares.
type Contents struct {
	Services []*model.Service
	Nodes    []*model.Node
}

// Service is one service as a user writes it, close to a Kubernetes
// Service with its endpoints inline.
type Service struct {
	Name      string `yaml:"name"`
	Namespace string `yaml:"namespace"`
	ClusterIP string `yaml:"clusterIP"`
	// Type is ClusterIP (the default), NodePort or LoadBalancer, as in
	// Kubernetes: NodePort and LoadBalancer services are served on their
	// ports' nodePorts too.
	Type string `yaml:"type"`
	// ExternalIPs are further addresses the service is reached at.
	ExternalIPs []string `yaml:"externalIPs"`
	// LoadBalancerIPs are the ingress addresses a load balancer gave a
	// LoadBalancer service (its status in Kubernetes).
	LoadBalancerIPs []string `yaml:"loadBalancerIPs"`
	// ExternalTrafficPolicy is Cluster (the default) or Local: traffic
	// from outside the cluster goes only to backends on the node it
	// reached, which keeps the client's address.
	ExternalTrafficPolicy string `yaml:"externalTrafficPolicy"`
	// HealthCheckNodePort is where, with externalTrafficPolicy Local,
	// every node answers load balancers whether it has local backends.
	HealthCheckNodePort int `yaml:"healthCheckNodePort"`
	// LoadBalancerSourceRanges restrict the clients outside the cluster a
	// LoadBalancer service's load-balancer IPs take traffic from.
	LoadBalancerSourceRanges []string `yaml:"loadBalancerSourceRanges"`
	// ForwardingMode overrides the node pool's NodePort dispatch mode
	// for this service: snat, dsr or hybrid (the annotation
	// service.weir.dev/forwarding-mode in Kubernetes).
	ForwardingMode string        `yaml:"forwardingMode"`
	Ports          []ServicePort `yaml:"ports"`
	Backends       []Backend     `yaml:"backends"`
}

// ServicePort is one port of a service; each becomes a frontend.
type ServicePort struct {
	Name       string `yaml:"name"`
	Port       int    `yaml:"port"`
	TargetPort int    `yaml:"targetPort"`
	Protocol   string `yaml:"protocol"`
	// NodePort is the port on every node's addresses (NodePort and
	// LoadBalancer services; 0: none).
	NodePort int `yaml:"nodePort"`
}

// Backend is one endpoint of a service.
type Backend struct {
	IP string `yaml:"ip"`
	// Terminating backends keep their flows and get new ones only when
	// no other backend can take them.
	Terminating bool   `yaml:"terminating"`
	NodeName    string `yaml:"nodeName"`
	// ForZones and ForNodes are topology hints, as an EndpointSlice
	// carries them: cluster-wide traffic on a node prefers the backends
	// hinted for it, or for its zone (when every ready backend has such
	// hints, as kube-proxy decides).
	ForZones []string `yaml:"forZones"`
	ForNodes []string `yaml:"forNodes"`
}

var dnsLabel = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$`)

// Parse decodes and validates a services file into model services.
func Parse(file string, data []byte) ([]*model.Service, error) {
	c, err := ParseContents(file, data)
	if err != nil {
		return nil, err
	}
	return c.Services, nil
}

// ParseContents decodes and validates a file: services and nodes.
func ParseContents(file string, data []byte) (*Contents, error) {
	root, err := strictyaml.Parse(file, data)
	if err != nil {
		return nil, err
	}
	// An empty file is more likely a write caught half-way than a wish to
	// delete every service; that wish is written "services: []".
	if root == nil {
		return nil, &strictyaml.Error{File: file, Msg: "the file is empty; to remove every service write \"services: []\""}
	}
	var f File
	if err := strictyaml.DecodeNode(file, root, "", &f); err != nil {
		return nil, err
	}
	fail := func(path, format string, a ...any) error {
		return strictyaml.At(file, strictyaml.Locate(root, path), path, fmt.Sprintf(format, a...))
	}
	missing := func(path string) bool { return !strictyaml.Present(root, path) }
	var out []*model.Service
	names := map[model.ServiceName]int{}
	frontends := map[model.FrontendKey]string{}
	for i, s := range f.Services {
		sp := strictyaml.Index("services", i)
		if s.Namespace == "" {
			s.Namespace = "default"
		}
		if s.Name == "" && missing(strictyaml.Key(sp, "name")) {
			return nil, fail(strictyaml.Key(sp, "name"), "missing: every service needs a name")
		}
		if !dnsLabel.MatchString(s.Name) {
			return nil, fail(strictyaml.Key(sp, "name"), "%q is not a valid service name (a DNS label: lower-case letters, digits and '-', at most 63)", s.Name)
		}
		if !dnsLabel.MatchString(s.Namespace) {
			return nil, fail(strictyaml.Key(sp, "namespace"), "%q is not a valid namespace (a DNS label)", s.Namespace)
		}
		name := model.ServiceName{Namespace: s.Namespace, Name: s.Name}
		if j, dup := names[name]; dup {
			return nil, fail(strictyaml.Key(sp, "name"), "service %s is already defined by services[%d]", name, j)
		}
		names[name] = i
		if s.ClusterIP == "" && missing(strictyaml.Key(sp, "clusterIP")) {
			return nil, fail(strictyaml.Key(sp, "clusterIP"), "missing: every service needs an IPv4 clusterIP")
		}
		vip, err := netip.ParseAddr(s.ClusterIP)
		if err != nil || !vip.Is4() {
			return nil, fail(strictyaml.Key(sp, "clusterIP"), "%q is not an IPv4 address", s.ClusterIP)
		}
		if err := model.CheckFrontendAddr(vip, model.ClusterIP); err != nil {
			return nil, fail(strictyaml.Key(sp, "clusterIP"), "%v", err)
		}
		if len(s.Ports) == 0 {
			return nil, fail(strictyaml.Key(sp, "ports"), "a service needs at least one port")
		}
		ext, err := parseExternal(&s, sp, fail)
		if err != nil {
			return nil, err
		}
		var backends []netip.Addr
		var states []model.BackendState
		var hints []*model.Hints
		seenBE := map[netip.Addr]int{}
		for j, b := range s.Backends {
			bp := strictyaml.Index(strictyaml.Key(sp, "backends"), j)
			a, err := netip.ParseAddr(b.IP)
			if err != nil || !a.Is4() {
				return nil, fail(strictyaml.Key(bp, "ip"), "%q is not an IPv4 address", b.IP)
			}
			if a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() {
				return nil, fail(strictyaml.Key(bp, "ip"), "%s cannot be a backend address", a)
			}
			if k, dup := seenBE[a]; dup {
				return nil, fail(strictyaml.Key(bp, "ip"), "backend %s is already listed as backends[%d]", a, k)
			}
			seenBE[a] = j
			backends = append(backends, a)
			st := model.Active
			if b.Terminating {
				st = model.Terminating
			}
			states = append(states, st)
			for _, hs := range []struct {
				key  string
				vals []string
			}{{"forZones", b.ForZones}, {"forNodes", b.ForNodes}} {
				for k, v := range hs.vals {
					if v == "" {
						return nil, fail(strictyaml.Index(strictyaml.Key(bp, hs.key), k), "the name is empty: give a zone (forZones) or node (forNodes) name")
					}
					if first := slices.Index(hs.vals, v); first != k {
						return nil, fail(strictyaml.Index(strictyaml.Key(bp, hs.key), k), "%s is already listed as %s[%d]", v, hs.key, first)
					}
				}
			}
			var h *model.Hints
			if len(b.ForZones) > 0 || len(b.ForNodes) > 0 {
				h = &model.Hints{Zones: b.ForZones, Nodes: b.ForNodes}
			}
			hints = append(hints, h)
		}
		mode, err := model.ParseForwardingMode(s.ForwardingMode)
		if err != nil {
			return nil, fail(strictyaml.Key(sp, "forwardingMode"), "%v", err)
		}
		svc := &model.Service{Name: name, HealthCheckNodePort: uint16(s.HealthCheckNodePort), SourceRanges: ext.sourceRanges, ForwardingMode: mode}
		if s.HealthCheckNodePort != 0 {
			hc := model.FrontendKey{Addr: netip.AddrPortFrom(netip.IPv4Unspecified(), uint16(s.HealthCheckNodePort)), Proto: model.TCP}
			if owner, dup := frontends[hc]; dup {
				return nil, fail(strictyaml.Key(sp, "healthCheckNodePort"), "port %d is already used by %s", s.HealthCheckNodePort, owner)
			}
			frontends[hc] = fmt.Sprintf("%s (%s) as its health check port", sp, name)
		}
		portNames := map[string]int{}
		for j, p := range s.Ports {
			pp := strictyaml.Index(strictyaml.Key(sp, "ports"), j)
			if p.Port == 0 && missing(strictyaml.Key(pp, "port")) {
				return nil, fail(strictyaml.Key(pp, "port"), "missing: every port needs a port number (1 to 65535)")
			}
			if p.Port < 1 || p.Port > 65535 {
				return nil, fail(strictyaml.Key(pp, "port"), "%d is not a valid port (1 to 65535)", p.Port)
			}
			if p.TargetPort == 0 {
				p.TargetPort = p.Port
			}
			if p.TargetPort < 1 || p.TargetPort > 65535 {
				return nil, fail(strictyaml.Key(pp, "targetPort"), "%d is not a valid port (1 to 65535)", p.TargetPort)
			}
			proto, err := model.ParseProto(p.Protocol)
			if err != nil {
				return nil, fail(strictyaml.Key(pp, "protocol"), "%v", err)
			}
			if err := proto.Served(); err != nil {
				return nil, fail(strictyaml.Key(pp, "protocol"), "%v; allowed: TCP, UDP", err)
			}
			if len(s.Ports) > 1 && p.Name == "" {
				return nil, fail(strictyaml.Key(pp, "name"), "ports of a service with several ports need names")
			}
			if k, dup := portNames[p.Name]; dup && p.Name != "" {
				return nil, fail(strictyaml.Key(pp, "name"), "port name %q is already used by ports[%d]", p.Name, k)
			}
			portNames[p.Name] = j
			fe := model.Frontend{Addr: netip.AddrPortFrom(vip, uint16(p.Port)), Proto: proto, Type: model.ClusterIP, PortName: p.Name}
			if owner, dup := frontends[fe.Key()]; dup {
				return nil, fail(pp, "frontend %s is already used by %s", fe.Key(), owner)
			}
			frontends[fe.Key()] = fmt.Sprintf("%s (%s)", pp, name)
			for k, a := range backends {
				fe.Backends = append(fe.Backends, model.Backend{Addr: netip.AddrPortFrom(a, uint16(p.TargetPort)), State: states[k], NodeName: s.Backends[k].NodeName, Hints: hints[k]})
			}
			svc.Frontends = append(svc.Frontends, fe)
			if p.NodePort != 0 && !ext.nodePorts {
				return nil, fail(strictyaml.Key(pp, "nodePort"), "only services of type NodePort or LoadBalancer have node ports")
			}
			if p.NodePort < 0 || p.NodePort > 65535 {
				return nil, fail(strictyaml.Key(pp, "nodePort"), "%d is not a valid port (1 to 65535)", p.NodePort)
			}
			more := make([]model.Frontend, 0, len(ext.addrs)+1)
			for _, a := range ext.addrs {
				more = append(more, model.Frontend{Addr: netip.AddrPortFrom(a.addr, uint16(p.Port)), Type: a.typ})
			}
			if p.NodePort != 0 {
				more = append(more, model.Frontend{Addr: netip.AddrPortFrom(netip.IPv4Unspecified(), uint16(p.NodePort)), Type: model.NodePort})
			}
			for _, m := range more {
				m.Proto, m.PortName, m.Backends, m.ExternalLocal = proto, p.Name, fe.Backends, ext.local
				if owner, dup := frontends[m.Key()]; dup {
					return nil, fail(pp, "frontend %s (%s) is already used by %s", m.Key(), m.Type, owner)
				}
				frontends[m.Key()] = fmt.Sprintf("%s (%s)", pp, name)
				svc.Frontends = append(svc.Frontends, m)
			}
		}
		out = append(out, svc)
	}
	nodes, err := parseNodes(f.Nodes, fail)
	if err != nil {
		return nil, err
	}
	return &Contents{Services: out, Nodes: nodes}, nil
}

// external is what a service adds beyond its ClusterIP.
type external struct {
	addrs []struct {
		addr netip.Addr
		typ  model.FrontendType
	}
	nodePorts, local bool
	sourceRanges     []netip.Prefix
}

func parseExternal(s *Service, sp string, fail func(path, format string, a ...any) error) (external, error) {
	var out external
	switch s.Type {
	case "", "ClusterIP":
	case "NodePort":
		out.nodePorts = true
	case "LoadBalancer":
		out.nodePorts = true
	default:
		return out, fail(strictyaml.Key(sp, "type"), "%q is not one of ClusterIP, NodePort, LoadBalancer", s.Type)
	}
	switch s.ExternalTrafficPolicy {
	case "", "Cluster":
	case "Local":
		out.local = true
	default:
		return out, fail(strictyaml.Key(sp, "externalTrafficPolicy"), "%q is not one of Cluster, Local", s.ExternalTrafficPolicy)
	}
	if len(s.LoadBalancerIPs) > 0 && s.Type != "LoadBalancer" {
		return out, fail(strictyaml.Key(sp, "loadBalancerIPs"), "only services of type LoadBalancer have load-balancer IPs")
	}
	if s.HealthCheckNodePort != 0 {
		if !out.local || !out.nodePorts {
			return out, fail(strictyaml.Key(sp, "healthCheckNodePort"), "only NodePort and LoadBalancer services with externalTrafficPolicy Local have a health check port")
		}
		if s.HealthCheckNodePort < 1 || s.HealthCheckNodePort > 65535 {
			return out, fail(strictyaml.Key(sp, "healthCheckNodePort"), "%d is not a valid port (1 to 65535)", s.HealthCheckNodePort)
		}
	}
	if len(s.LoadBalancerSourceRanges) > 0 && s.Type != "LoadBalancer" {
		return out, fail(strictyaml.Key(sp, "loadBalancerSourceRanges"), "only services of type LoadBalancer have source ranges")
	}
	for j, r := range s.LoadBalancerSourceRanges {
		p, err := netip.ParsePrefix(r)
		if err != nil || !p.Addr().Is4() {
			return out, fail(strictyaml.Index(strictyaml.Key(sp, "loadBalancerSourceRanges"), j), "%q is not an IPv4 CIDR such as 203.0.113.0/24", r)
		}
		out.sourceRanges = append(out.sourceRanges, p.Masked())
	}
	for _, list := range []struct {
		key string
		ips []string
		typ model.FrontendType
	}{{"externalIPs", s.ExternalIPs, model.ExternalIP}, {"loadBalancerIPs", s.LoadBalancerIPs, model.LoadBalancer}} {
		for j, ip := range list.ips {
			path := strictyaml.Index(strictyaml.Key(sp, list.key), j)
			a, err := netip.ParseAddr(ip)
			if err != nil || !a.Is4() {
				return out, fail(path, "%q is not an IPv4 address", ip)
			}
			if err := model.CheckFrontendAddr(a, list.typ); err != nil || a.IsUnspecified() {
				if err == nil {
					err = fmt.Errorf("%s cannot be a service address", a)
				}
				return out, fail(path, "%v", err)
			}
			out.addrs = append(out.addrs, struct {
				addr netip.Addr
				typ  model.FrontendType
			}{a, list.typ})
		}
	}
	return out, nil
}

func parseNodes(in []Node, fail func(path, format string, a ...any) error) ([]*model.Node, error) {
	var out []*model.Node
	names := map[string]int{}
	for i, n := range in {
		np := strictyaml.Index("nodes", i)
		if n.Name == "" {
			return nil, fail(strictyaml.Key(np, "name"), "missing: every node needs a name")
		}
		if j, dup := names[n.Name]; dup {
			return nil, fail(strictyaml.Key(np, "name"), "node %q is already defined by nodes[%d]", n.Name, j)
		}
		names[n.Name] = i
		ip, err := netip.ParseAddr(n.IP)
		if err != nil || !ip.Is4() {
			return nil, fail(strictyaml.Key(np, "ip"), "%q is not an IPv4 address", n.IP)
		}
		m := &model.Node{Name: n.Name, IP: ip, Labels: n.Labels}
		for j, c := range n.PodCIDRs {
			p, err := netip.ParsePrefix(c)
			if err != nil || !p.Addr().Is4() || p.Masked() != p {
				return nil, fail(strictyaml.Index(strictyaml.Key(np, "podCIDRs"), j), "%q is not an IPv4 network such as 10.244.1.0/24", c)
			}
			m.PodCIDRs = append(m.PodCIDRs, p)
		}
		out = append(out, m)
	}
	return out, nil
}

// Source feeds one file into a model store.
type Source struct {
	path  string
	store *model.Store
	log   *slog.Logger
	last  [32]byte
	have  bool
	// rejected is the content last refused, so a periodic check does not
	// report the same mistake again.
	rejected [32]byte

	mu     sync.Mutex
	status Status
}

// Status says what became of the file's content: the last content
// applied, and the last refused with why, each by its SHA-256 (hex), so a
// writer of the file can tell whether its content took.
type Status struct {
	File string `json:"file"`
	// Applied is the digest of the content the store holds, Services
	// its number of services, and Version the store's ServicesVersion
	// once it held them: the datapath holds the file once its reconciler
	// applied that version.
	Applied  string `json:"applied,omitempty"`
	Services int    `json:"services"`
	Version  uint64 `json:"version"`
	// Rejected is the digest of the content last refused and Error why;
	// both clear when a later content is applied.
	Rejected string `json:"rejected,omitempty"`
	Error    string `json:"error,omitempty"`
}

// Status returns what became of the file's content.
func (s *Source) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.status
	st.File = s.path
	return st
}

func (s *Source) reject(sum [32]byte, err error) error {
	s.mu.Lock()
	s.status.Rejected, s.status.Error = hex.EncodeToString(sum[:]), err.Error()
	s.mu.Unlock()
	return err
}

// New returns a source for the file at path.
func New(path string, store *model.Store, log *slog.Logger) *Source {
	if log == nil {
		log = slog.Default()
	}
	return &Source{path: path, store: store, log: log}
}

// Load reads the file and replaces the source's services. An invalid file
// changes nothing and returns the error; reading the same invalid content
// again returns errUnchanged instead of repeating it. A file the store
// refuses (a frontend another source holds) is tried again each time.
func (s *Source) Load() error {
	data, err := os.ReadFile(s.path)
	if err != nil {
		return fmt.Errorf("reading services file: %w", err)
	}
	sum := sha256.Sum256(data)
	if s.have && sum == s.last {
		return nil
	}
	if sum == s.rejected {
		return errUnchanged
	}
	c, err := ParseContents(s.path, data)
	if err != nil {
		// The content itself is wrong: only an edit can fix it.
		s.rejected = sum
		return s.reject(sum, err)
	}
	// A refusal by the store (a frontend or node another source holds,
	// more than the datapath holds) may go away when the other source
	// changes, so it is retried next time.
	if err := s.store.ReplaceNodes(Name, c.Nodes); err != nil {
		return s.reject(sum, fmt.Errorf("%s: %w", s.path, err))
	}
	if err := s.store.Replace(Name, c.Services); err != nil {
		return s.reject(sum, fmt.Errorf("%s: %w", s.path, err))
	}
	svcs := c.Services
	s.rejected = [32]byte{}
	s.last, s.have = sum, true
	s.mu.Lock()
	s.status = Status{Applied: hex.EncodeToString(sum[:]), Services: len(svcs), Version: s.store.ServicesVersion()}
	s.mu.Unlock()
	s.log.Info("services file applied", "file", s.path, "services", len(svcs))
	return nil
}

// Watch reloads the file whenever it changes until ctx ends. It watches the
// directory, so editors that replace the file by renaming, and Kubernetes
// ConfigMap symlink swaps, are seen too; a slow periodic check covers
// anything the notifications miss.
func (s *Source) Watch(ctx context.Context) {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		s.log.Error("cannot watch services file; checking periodically", "err", err)
	} else {
		defer w.Close()
		if err := w.Add(filepath.Dir(s.path)); err != nil {
			s.log.Error("cannot watch services file directory; checking periodically", "err", err)
		}
	}
	var events <-chan fsnotify.Event
	var errs <-chan error
	if w != nil {
		events, errs = w.Events, w.Errors
	}
	tick := time.NewTicker(10 * time.Second)
	defer tick.Stop()
	var debounce <-chan time.Time
	base := filepath.Base(s.path)
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-events:
			if filepath.Base(ev.Name) == base || filepath.Base(ev.Name) == "..data" {
				// Let a burst of writes settle before reading.
				debounce = time.After(20 * time.Millisecond)
			}
		case err := <-errs:
			s.log.Warn("watching services file", "err", err)
		case <-debounce:
			debounce = nil
			s.reload()
		case <-tick.C:
			s.reload()
		}
	}
}

// errUnchanged: the file still holds content already rejected and reported.
var errUnchanged = errors.New("services file unchanged since it was rejected")

func (s *Source) reload() {
	err := s.Load()
	if err == nil || errors.Is(err, errUnchanged) {
		return
	}
	if errors.Is(err, os.ErrNotExist) {
		s.log.Warn("services file is missing; keeping the current services", "file", s.path)
		return
	}
	s.log.Error("services file rejected; keeping the current services", "err", err)
}
