package dptest

import (
	"runtime"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// RunTimed is BPF_PROG_TEST_RUN with one repeat, returning the verdict,
// the kernel's measure of the run and the packet in out (cilium/ebpf gives
// either the time or the packet, and a benchmark must check what it
// times).
func RunTimed(prog *ebpf.Program, in, out []byte) (uint32, time.Duration, error) {
	attr := struct {
		progFD, retval, sizeIn, sizeOut uint32
		dataIn, dataOut                 uint64
		repeat, duration                uint32
		ctxSizeIn, ctxSizeOut           uint32
		ctxIn, ctxOut                   uint64
		flags, cpu, batchSize           uint32
		_                               uint32
	}{
		progFD: uint32(prog.FD()), sizeIn: uint32(len(in)), sizeOut: uint32(len(out)),
		dataIn: uint64(uintptr(unsafe.Pointer(&in[0]))), dataOut: uint64(uintptr(unsafe.Pointer(&out[0]))), repeat: 1,
	}
	const bpfProgTestRun = 10
	_, _, errno := unix.Syscall(unix.SYS_BPF, bpfProgTestRun, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	runtime.KeepAlive(in)
	runtime.KeepAlive(out)
	if errno != 0 {
		return 0, 0, errno
	}
	return attr.retval, time.Duration(attr.duration), nil
}
