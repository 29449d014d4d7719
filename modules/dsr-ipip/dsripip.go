// Package dsripip is the dsr-ipip module: NodePort, load-balancer and
// external IPs served as the nodeport module serves them, except that a
// flow to a backend on another node travels there inside an outer IPv4
// header (IP-in-IP, decapsulated in BPF by the backend's node), the
// request itself untouched, so the backend's node answers the client
// directly (Direct Server Return) without IP options, which switches send
// to their slow path. It shares the nodeport module's programs and
// settings.
package dsripip

import (
	"github.com/weirnet/weir/core/module"
	"github.com/weirnet/weir/modules/nodeport"
)

// Name is the module's name in configuration.
const Name = "dsr-ipip"

// Factory registers the module: a member of the NodePort dispatch group.
var Factory = nodeport.DispatchFactory(Name, "NodePort, load-balancer and external IPs with Direct Server Return, requests carried in IP-in-IP", nodeport.DSRIPIP)

var _ module.Module = (*nodeport.Module)(nil)
