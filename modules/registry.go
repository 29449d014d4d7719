// Package modules lists every in-tree module. Adding a module is one folder
// under modules/ and one line here.
package modules

import (
	"github.com/weirnet/weir/core/module"
	dsripip "github.com/weirnet/weir/modules/dsr-ipip"
	dsripoption "github.com/weirnet/weir/modules/dsr-ipoption"
	"github.com/weirnet/weir/modules/endpoints"
	"github.com/weirnet/weir/modules/lb"
	"github.com/weirnet/weir/modules/masquerade"
	"github.com/weirnet/weir/modules/nativerouting"
	"github.com/weirnet/weir/modules/nodeport"
	"github.com/weirnet/weir/modules/socketlb"
	"github.com/weirnet/weir/modules/tunnel"
)

// Factories are the in-tree modules.
var Factories = []module.Factory{
	endpoints.Factory,
	lb.Factory,
	tunnel.Factory,
	nativerouting.Factory,
	socketlb.Factory,
	nodeport.Factory,
	masquerade.Factory,
	dsripoption.Factory,
	dsripip.Factory,
}

// Compile-time guards: each in-tree module satisfies the contract.
var (
	_ module.Module = (*endpoints.Module)(nil)
	_ module.Module = (*lb.Module)(nil)
	_ module.Module = (*tunnel.Module)(nil)
	_ module.Module = (*nativerouting.Module)(nil)
	_ module.Module = (*socketlb.Module)(nil)
	_ module.Module = (*nodeport.Module)(nil)
	_ module.Module = (*masquerade.Module)(nil)
)

// Registry returns the catalog of in-tree modules.
func Registry() (*module.Registry, error) {
	return module.NewRegistry(Factories...)
}
