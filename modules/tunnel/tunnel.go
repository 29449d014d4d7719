// Package tunnel is the tunnel module: pod traffic to another node is
// encapsulated in VXLAN or Geneve toward the node that owns the destination,
// and decapsulated there, both in BPF (no kernel tunnel device; the kernel
// here has no geneve module). Peers that do not tunnel with the same
// settings are reached natively.
package tunnel

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
	"go.uber.org/fx"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/ipcache"
	"github.com/weirnet/weir/core/module"
	"github.com/weirnet/weir/core/node"
	"github.com/weirnet/weir/modules/endpoints"
)

// Name is the module's name in configuration.
const Name = "tunnel"

// Overhead is what encapsulation adds to a packet: outer IPv4, UDP, the
// 8-byte VXLAN or Geneve header (no Geneve options), inner Ethernet.
const Overhead = 20 + 8 + 8 + 14

// Default ports: Linux's VXLAN port (also Cilium's) and IANA's Geneve port.
const (
	DefaultVXLANPort  = 8472
	DefaultGenevePort = 6081
)

// Settings of the tunnel module.
type Settings struct {
	// Protocol is vxlan or geneve.
	Protocol string `yaml:"protocol"`
	// Port is the UDP port; 0 takes the protocol's default.
	Port int `yaml:"port"`
	// VNI identifies the cluster's overlay (1 to 16777215).
	VNI int `yaml:"vni"`
}

// DefaultSettings returns the defaults.
func DefaultSettings() *Settings { return &Settings{Protocol: "vxlan", VNI: 1} }

// Validate implements module.Settings.
func (s *Settings) Validate() error {
	switch strings.ToLower(s.Protocol) {
	case "vxlan", "geneve":
		s.Protocol = strings.ToLower(s.Protocol)
	default:
		return &module.FieldError{Path: "protocol", Msg: fmt.Sprintf("%q is not one of vxlan, geneve", s.Protocol)}
	}
	if s.Port == 0 {
		s.Port = DefaultVXLANPort
		if s.Protocol == "geneve" {
			s.Port = DefaultGenevePort
		}
	}
	if s.Port < 1 || s.Port > 65535 {
		return &module.FieldError{Path: "port", Msg: fmt.Sprintf("%d is not a valid port (1 to 65535, or 0 for the protocol's default)", s.Port)}
	}
	if s.VNI < 1 || s.VNI > 1<<24-1 {
		return &module.FieldError{Path: "vni", Msg: fmt.Sprintf("%d is out of range (1 to 16777215)", s.VNI)}
	}
	return nil
}

// EncapsulationKey implements module.Encapsulation: nodes tunnel to each
// other only with the same protocol, port and VNI.
func (s *Settings) EncapsulationKey() string {
	return fmt.Sprintf("%s/%d/vni=%d", s.Protocol, s.Port, s.VNI)
}

// Factory registers the module.
var Factory = module.Factory{
	Descriptor: module.Descriptor{
		Name:     Name,
		Summary:  "VXLAN or Geneve between nodes, encapsulated and decapsulated in BPF",
		Requires: []string{endpoints.Name},
		Excludes: []string{"nativerouting"},
		Slots: []module.SlotClaim{
			{Slot: "pod-egress/forward", Program: "tunnel_forward"},
			{Slot: "netdev-ingress/tunnel", Program: "tunnel_decap"},
			{Slot: "netdev-egress/tunnel", Program: "tunnel_host_egress"},
		},
		NewSettings: func() module.Settings { return DefaultSettings() },
	},
	Provide: func(s module.Settings) fx.Option {
		return fx.Options(
			fx.Supply(s.(*Settings)),
			module.Provide(New),
			fx.Provide(fx.Annotate(func() module.MTUOverhead { return Overhead }, fx.ResultTags(module.MTUOverheadTag))),
		)
	},
}

// Module is the running tunnel module.
type Module struct {
	s  *Settings
	up node.Uplink
}

// New builds the module; taking the ipcache makes fx keep it.
func New(s *Settings, info *node.Info, _ *ipcache.Reconciler) *Module {
	return &Module{s: s, up: info.Uplink}
}

// Name implements module.Module.
func (*Module) Name() string { return Name }

// Object implements module.Module: the node's address, uplink and tunnel
// settings become load-time constants.
func (m *Module) Object() (*ebpf.CollectionSpec, error) {
	if !m.up.Valid() {
		return nil, errors.New("the tunnel needs the node's uplink and address: give --node-ip or --uplink")
	}
	return ObjectSpec(m.s, m.up)
}

// ObjectSpec returns the module's BPF object configured for a node.
func ObjectSpec(s *Settings, up node.Uplink) (*ebpf.CollectionSpec, error) {
	spec, err := loadTunnel()
	if err != nil {
		return nil, err
	}
	geneve := uint32(0)
	if s.Protocol == "geneve" {
		geneve = 1
	}
	for name, v := range map[string]any{
		"tunnel_node_ip": datapath.AddrToBE(up.IP),
		"tunnel_port":    datapath.PortToBE(uint16(s.Port)),
		"tunnel_geneve":  geneve,
		"tunnel_vni":     uint32(s.VNI),
		"tunnel_uplink":  uint32(up.Index),
	} {
		if err := spec.Variables[name].Set(v); err != nil {
			return nil, fmt.Errorf("setting %s: %w", name, err)
		}
	}
	return spec, nil
}
