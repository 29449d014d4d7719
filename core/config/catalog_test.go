package config

import (
	"fmt"
	"net/netip"
	"testing"

	"go.uber.org/fx"

	"github.com/weirnet/weir/core/module"
)

// endpointsSettings is a fake settings type with defaults, a nested list
// and a Validate that rejects bad values by field path.
type endpointsSettings struct {
	GatewayIP string  `yaml:"gatewayIP"`
	MTU       int     `yaml:"mtu"`
	Routes    []route `yaml:"routes"`
}

type route struct {
	CIDR string `yaml:"cidr"`
	Via  string `yaml:"via"`
}

func (s *endpointsSettings) Validate() error {
	if _, err := netip.ParseAddr(s.GatewayIP); err != nil {
		return &module.FieldError{Path: "gatewayIP", Msg: fmt.Sprintf("%q is not an IP address", s.GatewayIP)}
	}
	if s.MTU < 576 || s.MTU > 9000 {
		return &module.FieldError{Path: "mtu", Msg: fmt.Sprintf("%d is out of range; allowed 576 to 9000", s.MTU)}
	}
	for i, r := range s.Routes {
		if _, err := netip.ParseAddr(r.Via); err != nil {
			return &module.FieldError{Path: fmt.Sprintf("routes[%d].via", i), Msg: fmt.Sprintf("%q is not an IP address", r.Via)}
		}
	}
	return nil
}

type tunnelSettings struct {
	Protocol string `yaml:"protocol"`
	Port     uint16 `yaml:"port"`
}

// EncapsulationKey makes the fake tunnel one whose pools must agree.
func (s *tunnelSettings) EncapsulationKey() string { return fmt.Sprintf("%s/%d", s.Protocol, s.Port) }

func (s *tunnelSettings) Validate() error {
	if s.Protocol != "vxlan" && s.Protocol != "geneve" {
		return &module.FieldError{Path: "protocol", Msg: fmt.Sprintf("%q is not one of vxlan, geneve", s.Protocol)}
	}
	return nil
}

func fake(d module.Descriptor) module.Factory {
	return module.Factory{Descriptor: d, Provide: func(module.Settings) fx.Option { return fx.Options() }}
}

// testCatalog has a requirement (lb needs endpoints), an exclusion
// (socketlb and lb), and two claimants of one slot (tunnel and bridge).
func testCatalog(t testing.TB) module.Catalog {
	t.Helper()
	cat, err := module.NewRegistry(
		fake(module.Descriptor{
			Name:        "endpoints",
			Slots:       []module.SlotClaim{{Slot: "pod-ingress/deliver", Program: "deliver"}},
			NewSettings: func() module.Settings { return &endpointsSettings{GatewayIP: "169.254.1.1", MTU: 1500} },
		}),
		fake(module.Descriptor{
			Name:     "lb",
			Requires: []string{"endpoints"},
			Slots:    []module.SlotClaim{{Slot: "pod-egress/lb", Program: "lb"}},
		}),
		fake(module.Descriptor{Name: "socketlb", Excludes: []string{"lb"}}),
		fake(module.Descriptor{
			Name:        "tunnel",
			Slots:       []module.SlotClaim{{Slot: "pod-egress/forward", Program: "encap"}},
			NewSettings: func() module.Settings { return &tunnelSettings{Protocol: "vxlan", Port: 8472} },
		}),
		fake(module.Descriptor{
			Name:  "bridge",
			Slots: []module.SlotClaim{{Slot: "pod-egress/forward", Program: "bridge"}},
		}),
	)
	if err != nil {
		t.Fatal(err)
	}
	return cat
}
