package socketlb

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/lbmap"
	"github.com/weirnet/weir/core/netns"
)

// terminator destroys the connected sockets socket LB sent to backends
// that left their frontend, so their owners reconnect to a live backend
// instead of waiting on a dead one. The socket iterators see one network
// namespace at a time: every namespace of a process in the node's cgroup
// is visited (the sockets socket LB translated are theirs).
type terminator struct {
	log    *slog.Logger
	cgroup string

	mu      sync.Mutex
	pending []lbmap.Departure
	wake    chan struct{}

	term     *ebpf.Map
	tcp, udp *link.Iter
}

func newTerminator(cgroup string, log *slog.Logger) *terminator {
	return &terminator{cgroup: cgroup, log: log, wake: make(chan struct{}, 1)}
}

// add queues departures; it runs in the reconciler's write path, so it
// only hands them on.
func (t *terminator) add(d []lbmap.Departure) {
	t.mu.Lock()
	t.pending = append(t.pending, d...)
	t.mu.Unlock()
	select {
	case t.wake <- struct{}{}:
	default:
	}
}

// load takes the iterator programs of the loaded object.
func (t *terminator) load(coll *ebpf.Collection) error {
	t.term = coll.Maps[datapath.MapSockTerm]
	if t.term == nil {
		return fmt.Errorf("the object has no %s map", datapath.MapSockTerm)
	}
	for name, dst := range map[string]**link.Iter{"sock_term_tcp": &t.tcp, "sock_term_udp": &t.udp} {
		prog := coll.Programs[name]
		if prog == nil {
			return fmt.Errorf("the object has no program %s", name)
		}
		it, err := link.AttachIter(link.IterOptions{Program: prog})
		if err != nil {
			return fmt.Errorf("attaching the socket iterator %s (bpf_sock_destroy needs Linux 6.5): %w", name, err)
		}
		*dst = it
	}
	return nil
}

// run terminates sockets as departures come, until ctx ends.
func (t *terminator) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.wake:
		}
		t.mu.Lock()
		batch := t.pending
		t.pending = nil
		t.mu.Unlock()
		if len(batch) == 0 {
			continue
		}
		if err := t.terminate(batch); err != nil {
			t.log.Warn("terminating sockets of departed backends", "departures", len(batch), "err", err)
		}
	}
}

func (t *terminator) close() {
	for _, it := range []*link.Iter{t.tcp, t.udp} {
		if it != nil {
			it.Close()
		}
	}
}

// terminate lists the departures for the iterators, runs them in every
// network namespace of the cgroup, and clears the list.
func (t *terminator) terminate(batch []lbmap.Departure) error {
	keys := make([]datapath.SockTermKey, len(batch))
	vals := make([]uint8, len(batch))
	for i, d := range batch {
		keys[i] = datapath.SockTermKey{
			RevNat:      d.RevNAT,
			BackendAddr: datapath.AddrToBE(d.Backend.Addr()),
			BackendPort: datapath.PortToBE(d.Backend.Port()),
			Proto:       uint8(d.Proto),
		}
		vals[i] = 1
	}
	if _, err := t.term.BatchUpdate(keys, vals, nil); err != nil {
		return fmt.Errorf("listing departures: %w", err)
	}
	defer func() {
		if _, err := t.term.BatchDelete(keys, nil); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			t.log.Warn("clearing the departures", "err", err)
		}
	}()
	spaces, err := cgroupNetns(t.cgroup)
	if err != nil {
		return err
	}
	var errs []error
	for _, path := range spaces {
		if err := t.iterateIn(path); err != nil {
			errs = append(errs, err)
		}
	}
	t.log.Debug("terminated sockets of departed backends", "departures", len(batch), "namespaces", len(spaces))
	return errors.Join(errs...)
}

// iterateIn runs both iterators over the sockets of the network namespace
// at path (an iterator sees the namespace of the thread that opens it).
func (t *terminator) iterateIn(path string) error {
	var readers []io.ReadCloser
	done := make(chan error, 1)
	// A goroutine of its own: should its thread fail to move back,
	// netns.Do leaves it locked and it ends with the goroutine instead of
	// serving others from the wrong namespace.
	go func() {
		done <- netns.Do(path, func() error {
			for _, it := range []*link.Iter{t.tcp, t.udp} {
				r, err := it.Open()
				if err != nil {
					return err
				}
				readers = append(readers, r)
			}
			return nil
		})
	}()
	err := <-done
	if errors.Is(err, os.ErrNotExist) {
		return nil // the process is gone, and with it the namespace's sockets
	}
	for _, r := range readers {
		_, rerr := io.Copy(io.Discard, r)
		r.Close()
		err = errors.Join(err, rerr)
	}
	if err != nil {
		return fmt.Errorf("iterating the sockets of %s: %w", path, err)
	}
	return nil
}

// cgroupNetns lists one /proc path per network namespace of the processes
// in the cgroup tree at root.
func cgroupNetns(root string) ([]string, error) {
	seen := map[uint64]bool{}
	var out []string
	err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			if path == root {
				return err
			}
			return nil // a cgroup removed while walking
		}
		if !d.IsDir() {
			return nil
		}
		f, err := os.Open(filepath.Join(path, "cgroup.procs"))
		if err != nil {
			return nil
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			pid, err := strconv.Atoi(sc.Text())
			if err != nil {
				continue
			}
			p := fmt.Sprintf("/proc/%d/ns/net", pid)
			var st unix.Stat_t
			if unix.Stat(p, &st) != nil || seen[st.Ino] {
				continue
			}
			seen[st.Ino] = true
			out = append(out, p)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("listing the processes of cgroup %s: %w", root, err)
	}
	return out, nil
}
