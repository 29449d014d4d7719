// Package lb is the lb module: per-packet load balancing of services for
// pod traffic. On pod egress a packet to a service frontend gets a backend
// chosen at random, remembered in conntrack for the life of the flow; on
// delivery to a pod, replies get the frontend back as their source. The
// service maps it reads are written by core's reconciler (core/lbmap),
// which composing this module starts.
package lb

import (
	"github.com/cilium/ebpf"
	"go.uber.org/fx"

	"github.com/weirnet/weir/core/lbmap"
	"github.com/weirnet/weir/core/module"
	"github.com/weirnet/weir/modules/endpoints"
)

// Name is the module's name in configuration.
const Name = "lb"

// Factory registers the module.
var Factory = module.Factory{
	Descriptor: module.Descriptor{
		Name:    Name,
		Summary: "per-packet service load balancing with conntrack for pod traffic",
		// Translation happens on pod egress and reverse translation on
		// delivery to pods: without pods wired by endpoints there is no
		// hook to run in.
		Requires: []string{endpoints.Name},
		Slots: []module.SlotClaim{
			{Slot: "pod-egress/lb", Program: "lb_pod_egress"},
			{Slot: "pod-ingress/lb-revnat", Program: "lb_pod_ingress"},
		},
	},
	Provide: func(module.Settings) fx.Option { return module.Provide(New) },
}

// Module is the running lb module.
type Module struct{}

// New builds the module. Taking the reconciler makes fx construct it: the
// service maps are kept only on nodes that translate services.
func New(_ *lbmap.Reconciler) *Module { return &Module{} }

// Name implements module.Module.
func (*Module) Name() string { return Name }

// Object implements module.Module.
func (*Module) Object() (*ebpf.CollectionSpec, error) { return loadLb() }
