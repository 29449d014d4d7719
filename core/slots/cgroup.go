package slots

import (
	"slices"

	"github.com/cilium/ebpf"
)

// CgroupHook is a socket hook of the node's cgroup v2 directory: a kernel
// attach point that takes one program of ours. Unlike the tc hooks there is
// no entry program and no stage chain: a module claims the hook itself by
// name, and two modules claiming one hook is a start-up error.
type CgroupHook struct {
	// Name is "cgroup/<hook>", the name modules claim.
	Name string
	// Attach is the kernel's attach type; Program the program type it
	// takes.
	Attach  ebpf.AttachType
	Program ebpf.ProgramType
	// Does is one line for errors and listings.
	Does string
}

// cgroupHooks is the one place the socket hooks are listed.
var cgroupHooks = []CgroupHook{
	{Name: "cgroup/connect4", Attach: ebpf.AttachCGroupInet4Connect, Program: ebpf.CGroupSockAddr,
		Does: "connect() of TCP and UDP sockets"},
	{Name: "cgroup/sendmsg4", Attach: ebpf.AttachCGroupUDP4Sendmsg, Program: ebpf.CGroupSockAddr,
		Does: "sendto()/sendmsg() of unconnected UDP sockets"},
	{Name: "cgroup/recvmsg4", Attach: ebpf.AttachCGroupUDP4Recvmsg, Program: ebpf.CGroupSockAddr,
		Does: "the source address recvfrom()/recvmsg() return on UDP sockets"},
	{Name: "cgroup/getpeername4", Attach: ebpf.AttachCgroupInet4GetPeername, Program: ebpf.CGroupSockAddr,
		Does: "the peer address getpeername() returns"},
	{Name: "cgroup/post_bind4", Attach: ebpf.AttachCGroupInet4PostBind, Program: ebpf.CGroupSock,
		Does: "bind() after the kernel bound the socket"},
	{Name: "cgroup/sock_release", Attach: ebpf.AttachCgroupInetSockRelease, Program: ebpf.CGroupSock,
		Does: "a socket's release"},
}

// CgroupHooks lists every socket hook, in table order.
func CgroupHooks() []CgroupHook { return slices.Clone(cgroupHooks) }

// LookupCgroupHook returns the socket hook with the given name.
func LookupCgroupHook(name string) (CgroupHook, bool) {
	for _, h := range cgroupHooks {
		if h.Name == name {
			return h, true
		}
	}
	return CgroupHook{}, false
}

// CgroupHookNames lists every socket hook name, for error messages.
func CgroupHookNames() []string {
	out := make([]string, 0, len(cgroupHooks))
	for _, h := range cgroupHooks {
		out = append(out, h.Name)
	}
	return out
}
