// Package masquerade is the masquerade module: traffic from this node's
// pods to destinations outside the cluster leaves the uplink with the
// node's address, translated in BPF on the shared NAT map (no iptables
// MASQUERADE), and replies are translated back and delivered to the pod.
package masquerade

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
	"go.uber.org/fx"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/ipcache"
	"github.com/weirnet/weir/core/module"
	"github.com/weirnet/weir/core/node"
	"github.com/weirnet/weir/core/portrange"
	"github.com/weirnet/weir/modules/endpoints"
	"github.com/weirnet/weir/modules/lb"
)

// Name is the module's name in configuration.
const Name = "masquerade"

// MaxNonMasqueradeCIDRs is how many CIDRs can be left untranslated beyond
// the cluster's own (MASQ_MAX_SKIP in bpf/masquerade.c).
const MaxNonMasqueradeCIDRs = 16

// DefaultPortRange is above Linux's default ephemeral ports (32768 to
// 60999), so a translated flow never takes the port of a connection the
// node itself opened to the same destination.
const DefaultPortRange = "61000-65535"

// Settings of the masquerade module.
type Settings struct {
	// NonMasqueradeCIDRs are destinations pods reach with their own
	// address, beyond pod CIDRs and node addresses (which always are).
	NonMasqueradeCIDRs []string `yaml:"nonMasqueradeCIDRs"`
	// PortRange is where translated flows get their source port.
	PortRange string `yaml:"portRange"`

	skip  []netip.Prefix
	ports portrange.Range
}

// DefaultSettings returns the defaults.
func DefaultSettings() *Settings { return &Settings{PortRange: DefaultPortRange} }

// Validate implements module.Settings.
func (s *Settings) Validate() error {
	if len(s.NonMasqueradeCIDRs) > MaxNonMasqueradeCIDRs {
		return &module.FieldError{Path: "nonMasqueradeCIDRs", Msg: fmt.Sprintf("%d CIDRs; at most %d", len(s.NonMasqueradeCIDRs), MaxNonMasqueradeCIDRs)}
	}
	var skip []netip.Prefix
	for i, c := range s.NonMasqueradeCIDRs {
		p, err := netip.ParsePrefix(c)
		if err != nil || !p.Addr().Is4() {
			return &module.FieldError{Path: fmt.Sprintf("nonMasqueradeCIDRs[%d]", i), Msg: fmt.Sprintf("%q is not an IPv4 CIDR such as 10.0.0.0/8", c)}
		}
		if p.Masked() != p {
			return &module.FieldError{Path: fmt.Sprintf("nonMasqueradeCIDRs[%d]", i), Msg: fmt.Sprintf("%q has host bits set; the network is %s", c, p.Masked())}
		}
		skip = append(skip, p)
	}
	r, err := portrange.Parse(s.PortRange)
	if err != nil {
		return &module.FieldError{Path: "portRange", Msg: err.Error()}
	}
	s.skip, s.ports = skip, r
	return nil
}

// PortRanges implements portrange.Holder.
func (s *Settings) PortRanges() []portrange.Named {
	return []portrange.Named{{Field: "portRange", Use: portrange.Translate, Range: s.ports}}
}

var _ portrange.Holder = (*Settings)(nil)

// Factory registers the module.
var Factory = module.Factory{
	Descriptor: module.Descriptor{
		Name:    Name,
		Summary: "pods reach outside the cluster with the node's address, translated in BPF",
		// lb's conntrack keeps the TCP and UDP flows whose NAT entries
		// live as long as they do; endpoints delivers the replies.
		Requires: []string{lb.Name, endpoints.Name},
		Slots: []module.SlotClaim{
			{Slot: "netdev-egress/masquerade", Program: "masq_egress"},
			{Slot: "netdev-ingress/masquerade", Program: "masq_ingress"},
		},
		NewSettings: func() module.Settings { return DefaultSettings() },
	},
	Provide: func(s module.Settings) fx.Option {
		return fx.Options(fx.Supply(s.(*Settings)), module.Provide(New))
	},
}

// Module is the running masquerade module.
type Module struct {
	s  *Settings
	up node.Uplink
}

// New builds the module; taking the ipcache makes fx keep it (the
// datapath tells the cluster's addresses from the rest by it).
func New(s *Settings, info *node.Info, _ *ipcache.Reconciler) *Module {
	return &Module{s: s, up: info.Uplink}
}

// Name implements module.Module.
func (*Module) Name() string { return Name }

// Object implements module.Module.
func (m *Module) Object() (*ebpf.CollectionSpec, error) {
	if !m.up.Valid() {
		return nil, errors.New("masquerade needs the node's uplink and address: give --node-ip or --uplink")
	}
	return ObjectSpec(m.s, m.up.IP)
}

// ObjectSpec returns the module's BPF object for a node whose address is
// nodeIP.
func ObjectSpec(s *Settings, nodeIP netip.Addr) (*ebpf.CollectionSpec, error) {
	spec, err := loadMasquerade()
	if err != nil {
		return nil, err
	}
	var addrs, masks [MaxNonMasqueradeCIDRs]uint32
	for i, p := range s.skip {
		addrs[i] = datapath.AddrToBE(p.Addr())
		var m [4]byte
		for b := range p.Bits() {
			m[b/8] |= 0x80 >> (b % 8)
		}
		masks[i] = datapath.AddrToBE(netip.AddrFrom4(m))
	}
	for name, v := range map[string]any{
		"masq_node_ip":    datapath.AddrToBE(nodeIP),
		"masq_min":        uint32(s.ports.Min),
		"masq_max":        uint32(s.ports.Max),
		"masq_skip_addr":  addrs,
		"masq_skip_mask":  masks,
		"masq_skip_count": uint32(len(s.skip)),
	} {
		if err := spec.Variables[name].Set(v); err != nil {
			return nil, fmt.Errorf("setting %s: %w", name, err)
		}
	}
	return spec, nil
}
