// Package dsripoption is the dsr-ipoption module: NodePort, load-balancer
// and external IPs served as the nodeport module serves them, except that
// a flow to a backend on another node keeps the client's address and
// carries the service address in an IPv4 option on its first packet (every
// UDP datagram), so the backend's node answers the client directly (Direct
// Server Return). It shares the nodeport module's programs and settings.
package dsripoption

import (
	"github.com/weirnet/weir/core/module"
	"github.com/weirnet/weir/modules/nodeport"
)

// Name is the module's name in configuration.
const Name = "dsr-ipoption"

// Factory registers the module: a member of the NodePort dispatch group.
var Factory = nodeport.DispatchFactory(Name, "NodePort, load-balancer and external IPs with Direct Server Return, the service address in an IPv4 option", nodeport.DSROption)

var _ module.Module = (*nodeport.Module)(nil)
