// Package ipam allocates pod addresses from a node's pod CIDRs. Every
// allocation is a file named after the address (holding its owner), created
// under an exclusive lock, so concurrent CNI invocations and restarts never
// hand out one address twice.
package ipam

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// Owner identifies an allocation: the CNI container ID and interface.
type Owner struct {
	ID     string
	IfName string
}

func (o Owner) encode() string { return o.ID + "\n" + o.IfName + "\n" }

func decode(s string) (Owner, bool) {
	parts := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(parts) != 2 || parts[0] == "" {
		return Owner{}, false
	}
	return Owner{ID: parts[0], IfName: parts[1]}, true
}

// Allocator hands out addresses from ranges, keeping its state in dir.
type Allocator struct {
	dir    string
	ranges []netip.Prefix
}

// Open prepares an allocator over the ranges (IPv4 networks), with its
// state in dir. Without ranges it can only look up and release.
func Open(dir string, ranges []netip.Prefix) (*Allocator, error) {
	for _, r := range ranges {
		if !r.Addr().Is4() || r.Masked() != r || r.Bits() > 30 {
			return nil, fmt.Errorf("ipam: %s is not an IPv4 network of /30 or larger", r)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("ipam: creating %s: %w", dir, err)
	}
	return &Allocator{dir: dir, ranges: ranges}, nil
}

// lock serializes allocators across processes (each CNI call is one).
func (a *Allocator) lock() (func(), error) {
	f, err := os.OpenFile(filepath.Join(a.dir, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("ipam: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("ipam: locking: %w", err)
	}
	return func() { _ = unix.Flock(int(f.Fd()), unix.LOCK_UN); f.Close() }, nil
}

func (a *Allocator) path(ip netip.Addr) string { return filepath.Join(a.dir, ip.String()) }

// Allocations returns every address with its owner.
func (a *Allocator) Allocations() (map[netip.Addr]Owner, error) {
	entries, err := os.ReadDir(a.dir)
	if err != nil {
		return nil, fmt.Errorf("ipam: %w", err)
	}
	out := map[netip.Addr]Owner{}
	for _, e := range entries {
		ip, err := netip.ParseAddr(e.Name())
		if err != nil {
			continue
		}
		data, err := os.ReadFile(filepath.Join(a.dir, e.Name()))
		if err != nil {
			return nil, fmt.Errorf("ipam: %w", err)
		}
		if o, ok := decode(string(data)); ok {
			out[ip] = o
		}
	}
	return out, nil
}

// Allocate returns the owner's address, allocating one when it has none.
// Addresses are handed out round-robin after the last one given, so a
// released address is not reused at once. The network and broadcast
// addresses of each range are never used.
func (a *Allocator) Allocate(o Owner) (netip.Addr, error) {
	if len(a.ranges) == 0 {
		return netip.Addr{}, errors.New("ipam: no pod CIDR to allocate from")
	}
	unlock, err := a.lock()
	if err != nil {
		return netip.Addr{}, err
	}
	defer unlock()
	all, err := a.Allocations()
	if err != nil {
		return netip.Addr{}, err
	}
	for ip, owner := range all {
		if owner == o {
			return ip, nil
		}
	}
	last := a.lastReserved()
	for _, r := range a.order(last) {
		for ip := range candidates(r, last) {
			if _, used := all[ip]; used {
				continue
			}
			f, err := os.OpenFile(a.path(ip), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
			if errors.Is(err, os.ErrExist) {
				continue
			}
			if err != nil {
				return netip.Addr{}, fmt.Errorf("ipam: %w", err)
			}
			_, werr := f.WriteString(o.encode())
			if cerr := f.Close(); werr == nil {
				werr = cerr
			}
			if werr != nil {
				_ = os.Remove(a.path(ip))
				return netip.Addr{}, fmt.Errorf("ipam: recording %s: %w", ip, werr)
			}
			_ = os.WriteFile(filepath.Join(a.dir, "last-reserved"), []byte(ip.String()), 0o600)
			return ip, nil
		}
	}
	var names []string
	for _, r := range a.ranges {
		names = append(names, r.String())
	}
	return netip.Addr{}, fmt.Errorf("ipam: no free address left in %s (%d allocated)", strings.Join(names, ", "), len(all))
}

func (a *Allocator) lastReserved() netip.Addr {
	data, err := os.ReadFile(filepath.Join(a.dir, "last-reserved"))
	if err != nil {
		return netip.Addr{}
	}
	ip, _ := netip.ParseAddr(strings.TrimSpace(string(data)))
	return ip
}

// order starts with the range holding the last reserved address.
func (a *Allocator) order(last netip.Addr) []netip.Prefix {
	out := slices.Clone(a.ranges)
	for i, r := range out {
		if r.Contains(last) {
			return append(out[i:], out[:i]...)
		}
	}
	return out
}

// candidates yields the usable addresses of r, starting after last when
// last is inside r, wrapping around.
func candidates(r netip.Prefix, last netip.Addr) func(func(netip.Addr) bool) {
	first := r.Addr().Next()
	bcast := lastAddr(r)
	start := first
	if r.Contains(last) && last.Next().Compare(bcast) < 0 {
		start = last.Next()
	}
	return func(yield func(netip.Addr) bool) {
		for ip := start; ip.Compare(bcast) < 0; ip = ip.Next() {
			if !yield(ip) {
				return
			}
		}
		for ip := first; ip.Compare(start) < 0; ip = ip.Next() {
			if !yield(ip) {
				return
			}
		}
	}
}

func lastAddr(r netip.Prefix) netip.Addr {
	b := r.Addr().As4()
	host := uint32(1)<<(32-r.Bits()) - 1
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v |= host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// Get returns the owner's address, if it has one.
func (a *Allocator) Get(o Owner) (netip.Addr, bool, error) {
	all, err := a.Allocations()
	if err != nil {
		return netip.Addr{}, false, err
	}
	for ip, owner := range all {
		if owner == o {
			return ip, true, nil
		}
	}
	return netip.Addr{}, false, nil
}

// Release frees the owner's address; an owner without one is not an error.
func (a *Allocator) Release(o Owner) error {
	unlock, err := a.lock()
	if err != nil {
		return err
	}
	defer unlock()
	all, err := a.Allocations()
	if err != nil {
		return err
	}
	for ip, owner := range all {
		if owner == o {
			if err := os.Remove(a.path(ip)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("ipam: releasing %s: %w", ip, err)
			}
		}
	}
	return nil
}
