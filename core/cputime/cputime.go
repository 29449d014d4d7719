// Package cputime measures the CPU time of a piece of work, for work
// figures that leave out the time a goroutine waited for a core (on a
// node that is busy, wall time says more about the node than about the
// work).
package cputime

import (
	"time"

	"golang.org/x/sys/unix"
)

// Thread returns the CPU time the calling OS thread has used. A goroutine
// that measures its work with it locks itself to its thread
// (runtime.LockOSThread) for the difference of two readings to be its own.
func Thread() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
