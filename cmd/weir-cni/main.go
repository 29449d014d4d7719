// Command weir-cni is Weir's CNI plugin (spec 1.x: ADD, DEL, CHECK,
// VERSION, GC, STATUS). It allocates the pod's address from the node's pod
// CIDRs (learnt from the local agent, which reads them from the Node) and
// asks the agent to wire the pod; the agent owns every interface and BPF
// object.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/weirnet/weir/core/api"
	"github.com/weirnet/weir/core/ipam"
)

// Defaults of the network configuration.
const (
	defaultSocket  = "/run/weir/agent.sock"
	defaultDataDir = "/var/lib/weir/cni"
)

// netConf is the network configuration on stdin.
type netConf struct {
	types.NetConf
	// AgentSocket is the local agent's API socket.
	AgentSocket string `json:"agentSocket"`
	// DataDir holds the address allocations.
	DataDir string `json:"dataDir"`
}

// k8sArgs are the CNI_ARGS a container runtime passes for Kubernetes pods.
type k8sArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE          types.UnmarshallableString //nolint:revive // the CNI_ARGS key
	K8S_POD_NAME               types.UnmarshallableString //nolint:revive
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString //nolint:revive
	K8S_POD_UID                types.UnmarshallableString //nolint:revive
}

func parseConf(data []byte) (*netConf, error) {
	c := &netConf{}
	if err := json.Unmarshal(data, c); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "invalid network configuration", err.Error())
	}
	if c.AgentSocket == "" {
		c.AgentSocket = defaultSocket
	}
	if c.DataDir == "" {
		c.DataDir = defaultDataDir
	}
	var problems []string
	if c.Name == "" {
		problems = append(problems, `"name" is required`)
	}
	if c.CNIVersion == "" {
		problems = append(problems, `"cniVersion" is required`)
	}
	if !filepath.IsAbs(c.AgentSocket) {
		problems = append(problems, fmt.Sprintf(`"agentSocket" %q must be an absolute path`, c.AgentSocket))
	}
	if !filepath.IsAbs(c.DataDir) {
		problems = append(problems, fmt.Sprintf(`"dataDir" %q must be an absolute path`, c.DataDir))
	}
	if len(problems) > 0 {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "invalid network configuration", fmt.Sprint(problems))
	}
	return c, nil
}

func client(c *netConf) *api.Client { return api.NewClient(c.AgentSocket) }

func ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 60*time.Second)
}

// agentDown is the error for an agent that does not answer: the runtime
// retries later.
func agentDown(c *netConf, err error) error {
	return types.NewError(types.ErrTryAgainLater, "the weir-agent at "+c.AgentSocket+" did not answer", err.Error())
}

// allocator opens IPAM over the node's pod CIDRs as the agent reports them.
func allocator(cx context.Context, c *netConf) (*ipam.Allocator, error) {
	st, err := client(c).Status(cx)
	if err != nil {
		return nil, agentDown(c, err)
	}
	var ranges []netip.Prefix
	for _, s := range st.PodCIDRs {
		p, err := netip.ParsePrefix(s)
		if err != nil || !p.Addr().Is4() {
			continue
		}
		ranges = append(ranges, p)
	}
	if len(ranges) == 0 {
		return nil, types.NewError(types.ErrTryAgainLater, "node "+st.Node+" has no IPv4 pod CIDR yet", "the agent reports no Node.spec.podCIDRs")
	}
	a, err := ipam.Open(c.DataDir, ranges)
	if err != nil {
		return nil, types.NewError(types.ErrInternal, "address allocation", err.Error())
	}
	return a, nil
}

func cmdAdd(args *skel.CmdArgs) error {
	c, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	var ka k8sArgs
	if err := types.LoadArgs(args.Args, &ka); err != nil {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "invalid CNI_ARGS", err.Error())
	}
	cx, cancel := ctx()
	defer cancel()
	a, err := allocator(cx, c)
	if err != nil {
		return err
	}
	owner := ipam.Owner{ID: args.ContainerID, IfName: args.IfName}
	ip, err := a.Allocate(owner)
	if err != nil {
		return types.NewError(types.ErrInternal, "no address for the pod", err.Error())
	}
	ep, err := client(c).CreateEndpoint(cx, api.EndpointRequest{
		ID: args.ContainerID, Netns: args.Netns, IfName: args.IfName, Address: ip.String(),
		PodNamespace: string(ka.K8S_POD_NAMESPACE), PodName: string(ka.K8S_POD_NAME),
	})
	if err != nil {
		_ = a.Release(owner)
		var se *api.StatusError
		if errors.As(err, &se) && se.Code/100 == 4 {
			return types.NewError(types.ErrInvalidNetworkConfig, "the agent refused the pod", se.Msg)
		}
		if errors.As(err, &se) {
			return types.NewError(types.ErrInternal, "the agent could not wire the pod", se.Msg)
		}
		return agentDown(c, err)
	}
	return types.PrintResult(result(ep, args, c), c.CNIVersion)
}

func result(ep *api.Endpoint, args *skel.CmdArgs, c *netConf) *current.Result {
	ip := net.ParseIP(ep.Address).To4()
	gw := net.ParseIP(ep.Gateway).To4()
	zero := 0
	return &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{{Name: args.IfName, Mac: ep.MAC, Sandbox: args.Netns}},
		IPs:        []*current.IPConfig{{Address: net.IPNet{IP: ip, Mask: net.CIDRMask(32, 32)}, Gateway: gw, Interface: &zero}},
		Routes:     []*types.Route{{Dst: net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}, GW: gw}},
		DNS:        c.DNS,
	}
}

func cmdDel(args *skel.CmdArgs) error {
	c, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	cx, cancel := ctx()
	defer cancel()
	// The endpoint goes first: its address is free only once no pod uses
	// it. An agent that does not answer means try again, never a leak.
	if err := client(c).DeleteEndpoint(cx, args.ContainerID); err != nil {
		return agentDown(c, err)
	}
	a, err := ipam.Open(c.DataDir, nil)
	if err != nil {
		return types.NewError(types.ErrInternal, "address release", err.Error())
	}
	if err := a.Release(ipam.Owner{ID: args.ContainerID, IfName: args.IfName}); err != nil {
		return types.NewError(types.ErrInternal, "address release", err.Error())
	}
	return nil
}

func cmdCheck(args *skel.CmdArgs) error {
	c, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	cx, cancel := ctx()
	defer cancel()
	ep, err := client(c).Endpoint(cx, args.ContainerID)
	if err != nil {
		var se *api.StatusError
		if errors.As(err, &se) && se.Code == 404 {
			return types.NewError(types.ErrInternal, "the pod is not wired", "the agent has no endpoint "+args.ContainerID)
		}
		return agentDown(c, err)
	}
	if ep.Netns != args.Netns || ep.IfName != args.IfName {
		return types.NewError(types.ErrInternal, "the pod is wired elsewhere",
			fmt.Sprintf("endpoint %s is %s in %s, not %s in %s", args.ContainerID, ep.IfName, ep.Netns, args.IfName, args.Netns))
	}
	a, err := ipam.Open(c.DataDir, nil)
	if err != nil {
		return types.NewError(types.ErrInternal, "address check", err.Error())
	}
	ip, ok, err := a.Get(ipam.Owner{ID: args.ContainerID, IfName: args.IfName})
	if err != nil || !ok || ip.String() != ep.Address {
		return types.NewError(types.ErrInternal, "the pod's address is not allocated to it",
			fmt.Sprintf("endpoint has %s, allocation %s (%v)", ep.Address, ip, err))
	}
	return nil
}

// cmdGC releases every allocation (and its endpoint) the runtime no longer
// lists as a valid attachment.
func cmdGC(args *skel.CmdArgs) error {
	c, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	var gc struct {
		Valid []types.GCAttachment `json:"cni.dev/valid-attachments"`
	}
	if err := json.Unmarshal(args.StdinData, &gc); err != nil {
		return types.NewError(types.ErrDecodingFailure, "invalid GC request", err.Error())
	}
	keep := map[ipam.Owner]bool{}
	for _, v := range gc.Valid {
		keep[ipam.Owner{ID: v.ContainerID, IfName: v.IfName}] = true
	}
	cx, cancel := ctx()
	defer cancel()
	a, err := ipam.Open(c.DataDir, nil)
	if err != nil {
		return types.NewError(types.ErrInternal, "GC", err.Error())
	}
	all, err := a.Allocations()
	if err != nil {
		return types.NewError(types.ErrInternal, "GC", err.Error())
	}
	for _, owner := range all {
		if keep[owner] {
			continue
		}
		if err := client(c).DeleteEndpoint(cx, owner.ID); err != nil {
			return agentDown(c, err)
		}
		if err := a.Release(owner); err != nil {
			return types.NewError(types.ErrInternal, "GC", err.Error())
		}
	}
	return nil
}

// cmdStatus is ready when the agent answers, is ready, and knows the
// node's pod CIDRs.
func cmdStatus(args *skel.CmdArgs) error {
	c, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	cx, cancel := ctx()
	defer cancel()
	st, err := client(c).Status(cx)
	if err != nil {
		return types.NewError(types.ErrPluginNotAvailable, "the weir-agent at "+c.AgentSocket+" did not answer", err.Error())
	}
	if !st.Ready {
		return types.NewError(types.ErrPluginNotAvailable, "the weir-agent is not ready", "node "+st.Node)
	}
	if len(st.PodCIDRs) == 0 {
		return types.NewError(types.ErrPluginNotAvailable, "node "+st.Node+" has no pod CIDR yet", "")
	}
	return nil
}

func main() {
	skel.PluginMainFuncs(skel.CNIFuncs{
		Add: cmdAdd, Del: cmdDel, Check: cmdCheck, GC: cmdGC, Status: cmdStatus,
	}, version.All, "weir-cni: Weir's CNI plugin")
}
