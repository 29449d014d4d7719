// Package nodeport is the nodeport module: services reached from outside
// the cluster — NodePorts on the node's addresses, load-balancer IPs and
// external IPs — are served in BPF on the uplink's ingress. Backends on
// the node get packets with the client's address; backends elsewhere get
// them over the node's forwarding mode with the node's address as source
// (SNAT), so that replies return through this node.
package nodeport

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"go.uber.org/fx"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/lbmap"
	"github.com/weirnet/weir/core/model"
	"github.com/weirnet/weir/core/module"
	"github.com/weirnet/weir/core/node"
	"github.com/weirnet/weir/core/portrange"
	"github.com/weirnet/weir/modules/endpoints"
	"github.com/weirnet/weir/modules/lb"
	"github.com/weirnet/weir/modules/nativerouting"
)

// Name is the module's name in configuration.
const Name = "nodeport"

// MaxAddresses is how many node addresses NodePorts can listen on
// (NODEPORT_MAX_ADDRS in bpf/nodeport.c).
const MaxAddresses = 8

// Defaults: Kubernetes' NodePort range, and Cilium's range for the
// ports NodePort SNAT gives flows (above Linux's default ephemeral ports'
// start, below nothing: it must not overlap the NodePort range).
const (
	DefaultNodePortRange = "30000-32767"
	DefaultSNATPortRange = "32768-65535"
)

// Settings of the nodeport module.
type Settings struct {
	// NodePortRange is the range node ports are served in; a service's
	// node port outside it is not served.
	NodePortRange string `yaml:"nodePortRange"`
	// SNATPortRange is where the source ports of flows sent to backends
	// on other nodes come from; it must not overlap the NodePort range.
	SNATPortRange string `yaml:"snatPortRange"`
	// Addresses the node serves NodePorts on; empty: every IPv4 address
	// of the uplink.
	Addresses []string `yaml:"addresses"`
	// Mode says how flows to backends on other nodes are dispatched:
	// snat, dsr, or hybrid (DSR for TCP, SNAT for UDP). The nodeport
	// module only does snat; the DSR modules default to dsr.
	Mode string `yaml:"mode"`
	// Maglev chooses backends for flows from outside by Maglev's
	// consistent hashing, the same on every node, so a flow that reaches
	// another node mid-way (an ECMP rehash, a drained node) keeps its
	// backend; without, at random.
	Maglev bool `yaml:"maglev"`
	// IPIPSourcePrefix (dsr-ipip only): outer sources come from this
	// network, their host bits from each flow's hash, so the backend's
	// node spreads flows over its receive queues; the underlay must
	// accept them. Empty: the node's address.
	IPIPSourcePrefix string `yaml:"ipipSourcePrefix"`

	ipipSource      netip.Prefix
	dispatch        Dispatch
	nodePorts, snat portrange.Range
	addrs           []netip.Addr
}

// Dispatch is how a module sends flows to backends on other nodes when
// its mode says DSR (the NodePort dispatch group's members).
type Dispatch uint32

// Dispatch kinds (NODEPORT_* in bpf/nodeport.c).
const (
	SNAT      Dispatch = 0
	DSROption Dispatch = 1
	DSRIPIP   Dispatch = 2
)

// IPIPOverhead is the outer header DSR by IP-in-IP adds: pods get an MTU
// that much smaller, so their TCP peers' segments fit once encapsulated.
const IPIPOverhead = 20

// Modes of the mode setting.
const (
	ModeSNAT   = "snat"
	ModeDSR    = "dsr"
	ModeHybrid = "hybrid"
)

// DefaultSettings returns the defaults of the nodeport module.
func DefaultSettings() *Settings { return DefaultSettingsFor(SNAT) }

// DefaultSettingsFor returns the defaults of the dispatch module d.
func DefaultSettingsFor(d Dispatch) *Settings {
	mode := ModeSNAT
	if d != SNAT {
		mode = ModeDSR
	}
	return &Settings{NodePortRange: DefaultNodePortRange, SNATPortRange: DefaultSNATPortRange, Mode: mode, dispatch: d}
}

// Validate implements module.Settings.
func (s *Settings) Validate() error {
	np, err := portrange.Parse(s.NodePortRange)
	if err != nil {
		return &module.FieldError{Path: "nodePortRange", Msg: err.Error()}
	}
	sn, err := portrange.Parse(s.SNATPortRange)
	if err != nil {
		return &module.FieldError{Path: "snatPortRange", Msg: err.Error()}
	}
	if len(s.Addresses) > MaxAddresses {
		return &module.FieldError{Path: "addresses", Msg: fmt.Sprintf("%d addresses; at most %d", len(s.Addresses), MaxAddresses)}
	}
	var addrs []netip.Addr
	for i, a := range s.Addresses {
		ip, err := netip.ParseAddr(a)
		if err != nil || !ip.Is4() || ip.IsUnspecified() || ip.IsMulticast() {
			return &module.FieldError{Path: fmt.Sprintf("addresses[%d]", i), Msg: fmt.Sprintf("%q is not a unicast IPv4 address", a)}
		}
		addrs = append(addrs, ip)
	}
	switch s.Mode {
	case ModeSNAT:
	case ModeDSR, ModeHybrid:
		if s.dispatch == SNAT {
			return &module.FieldError{Path: "mode", Msg: fmt.Sprintf("%q needs a DSR module (dsr-ipoption or dsr-ipip); nodeport dispatches by snat only", s.Mode)}
		}
	default:
		return &module.FieldError{Path: "mode", Msg: fmt.Sprintf("%q is not one of snat, dsr, hybrid", s.Mode)}
	}
	var src netip.Prefix
	if s.IPIPSourcePrefix != "" {
		if s.dispatch != DSRIPIP {
			return &module.FieldError{Path: "ipipSourcePrefix", Msg: "only dsr-ipip sends IP-in-IP"}
		}
		p, err := netip.ParsePrefix(s.IPIPSourcePrefix)
		if err != nil || !p.Addr().Is4() || p.Bits() < 8 || p.Bits() > 30 {
			return &module.FieldError{Path: "ipipSourcePrefix", Msg: fmt.Sprintf("%q is not an IPv4 network of /8 to /30 such as 100.64.10.0/24", s.IPIPSourcePrefix)}
		}
		src = p.Masked()
	}
	s.nodePorts, s.snat, s.addrs, s.ipipSource = np, sn, addrs, src
	return nil
}

// ipipSourceConsts are the outer source network and host mask (network
// order) of IP-in-IP; zero without a prefix.
func (s *Settings) ipipSourceConsts() (net, hostmask uint32) {
	if !s.ipipSource.IsValid() {
		return 0, 0
	}
	bits := s.ipipSource.Bits()
	m := ^uint32(0) >> bits // host bits, host order
	var b [4]byte
	b[0], b[1], b[2], b[3] = byte(m>>24), byte(m>>16), byte(m>>8), byte(m)
	return datapath.AddrToBE(s.ipipSource.Addr()), datapath.AddrToBE(netip.AddrFrom4(b))
}

// dsrProtos are the protocols the mode dispatches by DSR (bit 0 TCP,
// bit 1 UDP).
func (s *Settings) dsrProtos() uint32 {
	switch s.Mode {
	case ModeDSR:
		return 3
	case ModeHybrid:
		return 1
	}
	return 0
}

// NodePorts is the validated NodePort range.
func (s *Settings) NodePorts() portrange.Range { return s.nodePorts }

// PortRanges implements portrange.Holder: config checks that no served
// range overlaps a translating one, this module's or another's.
func (s *Settings) PortRanges() []portrange.Named {
	return []portrange.Named{
		{Field: "nodePortRange", Use: portrange.Serve, Range: s.nodePorts},
		{Field: "snatPortRange", Use: portrange.Translate, Range: s.snat},
	}
}

var _ portrange.Holder = (*Settings)(nil)

// Factory registers the module.
var Factory = DispatchFactory(Name, "NodePort, load-balancer and external IPs from outside the cluster, SNAT to remote backends", SNAT)

// DispatchFactory is the factory of a member of the NodePort dispatch
// group: nodeport, and the DSR modules, which share its programs (and
// serve SNAT too, for the protocols their mode leaves to it). DSR needs
// native routing: the request keeps the client's address on its way to
// the backend's node, which answers the client itself.
func DispatchFactory(name, summary string, d Dispatch) module.Factory {
	requires := []string{lb.Name, endpoints.Name}
	if d != SNAT {
		requires = append(requires, nativerouting.Name)
	}
	// Every member takes requests other nodes dispatch by DSR (the pools
	// of a cluster may dispatch differently): the IP-in-IP stage too.
	claims := []module.SlotClaim{
		{Slot: "netdev-ingress/nodeport", Program: "nodeport_ingress"},
		{Slot: "netdev-ingress/dsr-receive", Program: "nodeport_dsr_decap"},
		{Slot: "pod-egress/nodeport", Program: "nodeport_reply_local"},
	}
	return module.Factory{
		Descriptor: module.Descriptor{
			Name:    name,
			Summary: summary,
			// lb keeps the service maps and serves in-cluster clients of
			// the same frontends; endpoints delivers to local backends.
			Requires:    requires,
			Slots:       claims,
			NewSettings: func() module.Settings { return DefaultSettingsFor(d) },
		},
		Provide: func(s module.Settings) fx.Option {
			opts := []fx.Option{fx.Supply(s.(*Settings)), module.Provide(func(p Params) *Module {
				m := New(p)
				m.name = name
				return m
			})}
			if d == DSRIPIP {
				opts = append(opts, fx.Provide(fx.Annotate(func() module.MTUOverhead { return IPIPOverhead }, fx.ResultTags(module.MTUOverheadTag))))
			}
			return fx.Options(opts...)
		},
	}
}

// Params are what the module is built from.
type Params struct {
	fx.In
	Settings *Settings
	Info     *node.Info
	// Taking the reconciler keeps the service maps.
	Reconciler *lbmap.Reconciler
	Store      *model.Store
	Datapath   *datapath.Datapath
	Log        *slog.Logger
}

// Module is the running nodeport module (or a DSR module).
type Module struct {
	name   string
	s      *Settings
	up     node.Uplink
	store  *model.Store
	log    *slog.Logger
	health *healthChecks
	ranges *sourceRanges
	maglev *maglevWriter
	spec   *ebpf.CollectionSpec
	cancel context.CancelFunc
	done   chan struct{}
}

var (
	_ module.Starter = (*Module)(nil)
	_ module.Stopper = (*Module)(nil)
)

// New builds the module.
func New(p Params) *Module {
	log := p.Log.With("module", Name)
	return &Module{name: Name, s: p.Settings, up: p.Info.Uplink, store: p.Store, log: log, health: newHealthChecks(p.Info.Name, log),
		ranges: newSourceRanges(p.Datapath),
		maglev: &maglevWriter{node: p.Info.Name, byService: map[model.ServiceName][]maglevFront{}, services: func() (*ebpf.Map, *ebpf.Map, error) {
			s, err := p.Datapath.Map(datapath.MapServices)
			if err != nil {
				return nil, nil, err
			}
			a, err := p.Datapath.Map(datapath.MapBackendAddrs)
			return s, a, err
		}}}
}

// Name implements module.Module.
func (m *Module) Name() string { return m.name }

// Object implements module.Module: the node's address (the SNAT source),
// the addresses NodePorts listen on and the port ranges become load-time
// constants.
func (m *Module) Object() (*ebpf.CollectionSpec, error) {
	if !m.up.Valid() {
		return nil, errors.New("nodeport needs the node's uplink and address: give --node-ip or --uplink")
	}
	addrs := m.s.addrs
	if len(addrs) == 0 {
		var err error
		if addrs, err = uplinkAddrs(m.up); err != nil {
			return nil, err
		}
	}
	spec, err := ObjectSpec(m.s, m.up.IP, addrs)
	m.spec = spec
	return spec, err
}

// uplinkAddrs lists the uplink's IPv4 addresses (at most MaxAddresses,
// the node's own first).
func uplinkAddrs(up node.Uplink) ([]netip.Addr, error) {
	link, err := netlink.LinkByIndex(up.Index)
	if err != nil {
		return nil, fmt.Errorf("uplink %s: %w", up.Name, err)
	}
	list, err := netlink.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("addresses of %s: %w", up.Name, err)
	}
	out := []netip.Addr{up.IP}
	for _, a := range list {
		if v, ok := netip.AddrFromSlice(a.IP.To4()); ok && v != up.IP && len(out) < MaxAddresses {
			out = append(out, v)
		}
	}
	return out, nil
}

// ObjectSpec returns the module's BPF object configured for a node whose
// address is nodeIP, listening on addrs.
func ObjectSpec(s *Settings, nodeIP netip.Addr, addrs []netip.Addr) (*ebpf.CollectionSpec, error) {
	if len(addrs) > MaxAddresses {
		return nil, fmt.Errorf("%d NodePort addresses; at most %d", len(addrs), MaxAddresses)
	}
	spec, err := loadNodeport()
	if err != nil {
		return nil, err
	}
	ipipNet, ipipMask := s.ipipSourceConsts()
	var list [MaxAddresses]uint32
	for i, a := range addrs {
		list[i] = datapath.AddrToBE(a)
	}
	for name, v := range map[string]any{
		"nodeport_node_ip":           datapath.AddrToBE(nodeIP),
		"nodeport_addrs":             list,
		"nodeport_addr_count":        uint32(len(addrs)),
		"nodeport_min":               uint32(s.nodePorts.Min),
		"nodeport_max":               uint32(s.nodePorts.Max),
		"nodeport_snat_min":          uint32(s.snat.Min),
		"nodeport_snat_max":          uint32(s.snat.Max),
		"nodeport_dispatch":          uint32(s.dispatch),
		"nodeport_dsr_protos":        s.dsrProtos(),
		"nodeport_maglev":            boolU32(s.Maglev),
		"nodeport_ipip_src_net":      ipipNet,
		"nodeport_ipip_src_hostmask": ipipMask,
	} {
		if err := spec.Variables[name].Set(v); err != nil {
			return nil, fmt.Errorf("setting %s: %w", name, err)
		}
	}
	return spec, nil
}

func boolU32(b bool) uint32 {
	if b {
		return 1
	}
	return 0
}

var _ module.Loaded = (*Module)(nil)

// Loaded implements module.Loaded: the Maglev tables go in the loaded
// object's map.
func (m *Module) Loaded(coll *ebpf.Collection) error {
	if !m.s.Maglev {
		return nil
	}
	outer, ok := coll.Maps["weir_maglev"]
	if !ok || m.spec == nil || m.spec.Maps["weir_maglev"] == nil || m.spec.Maps["weir_maglev"].InnerMap == nil {
		return errors.New("the nodeport object has no Maglev map")
	}
	m.maglev.outer, m.maglev.inner = outer, m.spec.Maps["weir_maglev"].InnerMap.Copy()
	return nil
}

// Start implements module.Starter: health checks and source ranges
// follow the services.
func (m *Module) Start(context.Context) error {
	ctx, cancel := context.WithCancel(context.Background())
	m.cancel, m.done = cancel, make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { model.FollowServices(ctx, m.store, m.log, "serving health checks", m.health.apply) })
	wg.Go(func() { model.FollowServices(ctx, m.store, m.log, "writing source ranges", m.ranges.apply) })
	wg.Go(func() { model.FollowServices(ctx, m.store, m.log, "checking node ports", m.outOfRange().apply) })
	if m.s.Maglev {
		wg.Go(func() { model.FollowServices(ctx, m.store, m.log, "writing Maglev tables", m.maglev.apply) })
	}
	go func() {
		wg.Wait()
		close(m.done)
	}()
	return nil
}

// outOfRange reports NodePorts outside nodePortRange: the datapath does
// not serve them, and a user must hear of it rather than find out.
func (m *Module) outOfRange() *rangeCheck {
	return &rangeCheck{r: m.s.nodePorts, log: m.log, told: map[model.ServiceName]string{}}
}

type rangeCheck struct {
	r    portrange.Range
	log  *slog.Logger
	told map[model.ServiceName]string
}

func (c *rangeCheck) apply(d model.Delta) error {
	if d.Full {
		clear(c.told)
	}
	for name, svc := range d.Services {
		var out []string
		if svc != nil {
			for _, f := range svc.Frontends {
				if f.Type == model.NodePort && !c.r.Contains(f.Addr.Port()) {
					out = append(out, f.Key().String())
				}
			}
		}
		msg := strings.Join(out, ", ")
		if msg != "" && c.told[name] != msg {
			c.log.Warn("node ports outside nodePortRange are not served from outside", "service", name.String(), "frontends", msg, "nodePortRange", c.r.String())
		}
		if msg == "" {
			delete(c.told, name)
		} else {
			c.told[name] = msg
		}
	}
	return nil
}

// Stop implements module.Stopper.
func (m *Module) Stop(context.Context) error {
	if m.cancel != nil {
		m.cancel()
		<-m.done
	}
	m.health.close()
	return nil
}
