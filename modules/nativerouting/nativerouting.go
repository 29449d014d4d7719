// Package nativerouting is the nativerouting module: pod traffic to another
// node leaves unencapsulated, routed by the kernel's FIB (direct routes to
// the owning node when it shares the uplink's subnet, which the core
// ipcache installs, or the underlay's router when the underlay routes pod
// CIDRs) and sent with bpf_redirect_neigh.
package nativerouting

import (
	"github.com/cilium/ebpf"
	"go.uber.org/fx"

	"github.com/weirnet/weir/core/ipcache"
	"github.com/weirnet/weir/core/module"
	"github.com/weirnet/weir/modules/endpoints"
)

// Name is the module's name in configuration.
const Name = "nativerouting"

// Factory registers the module.
var Factory = module.Factory{
	Descriptor: module.Descriptor{
		Name:     Name,
		Summary:  "unencapsulated forwarding between nodes through the kernel's FIB",
		Requires: []string{endpoints.Name},
		Excludes: []string{"tunnel"},
		Slots: []module.SlotClaim{
			{Slot: "pod-egress/forward", Program: "nativerouting_forward"},
		},
	},
	Provide: func(module.Settings) fx.Option { return module.Provide(New) },
}

// Module is the running module.
type Module struct{}

// New builds the module; taking the ipcache makes fx keep it (and its
// routes).
func New(_ *ipcache.Reconciler) *Module { return &Module{} }

// Name implements module.Module.
func (*Module) Name() string { return Name }

// Object implements module.Module.
func (*Module) Object() (*ebpf.CollectionSpec, error) { return loadNativerouting() }
