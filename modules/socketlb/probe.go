package socketlb

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/features"
)

// MinKernel is the oldest Linux that has everything socketlb uses; Probe
// names what is missing on an older one.
const MinKernel = "6.5"

// Probe checks the kernel for what socketlb needs, before anything is
// loaded, and names the first feature missing and the Linux that brought
// it.
func Probe() error {
	for _, h := range []struct {
		typ  ebpf.ProgramType
		fn   asm.BuiltinFunc
		what string
	}{
		{ebpf.CGroupSockAddr, asm.FnGetSocketCookie, "bpf_get_socket_cookie in socket address programs (Linux 5.7)"},
		{ebpf.CGroupSockAddr, asm.FnGetNetnsCookie, "bpf_get_netns_cookie in socket address programs (Linux 5.7)"},
		{ebpf.CGroupSockAddr, asm.FnSkStorageGet, "socket-local storage in socket address programs (Linux 5.9)"},
		{ebpf.CGroupSockAddr, asm.FnSetRetval, "bpf_set_retval in cgroup programs (Linux 5.18)"},
	} {
		if err := features.HaveProgramHelper(h.typ, h.fn); err != nil {
			return fmt.Errorf("socketlb needs %s: %w", h.what, err)
		}
	}
	if err := features.HaveMapType(ebpf.SkStorage); err != nil {
		return fmt.Errorf("socketlb needs socket-local storage maps (Linux 5.2): %w", err)
	}
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		return fmt.Errorf("socketlb needs the kernel's BTF (/sys/kernel/btf/vmlinux) to find bpf_sock_destroy: %w", err)
	}
	var fn *btf.Func
	if err := spec.TypeByName("bpf_sock_destroy", &fn); err != nil {
		if errors.Is(err, btf.ErrNotFound) {
			return fmt.Errorf("socketlb needs the bpf_sock_destroy kfunc (Linux 6.5) to end connections to departed backends; this kernel lacks it")
		}
		return fmt.Errorf("looking up bpf_sock_destroy in the kernel's BTF: %w", err)
	}
	return nil
}
