// Package netns creates, enters and removes named network namespaces (the
// /run/netns/<name> convention of iproute2, so `ip netns` sees them too).
package netns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"

	"github.com/vishvananda/netlink"
	vns "github.com/vishvananda/netns"
)

// Dir is where named namespaces are bind-mounted.
const Dir = "/run/netns"

// Path returns the bind-mount path of a named namespace.
func Path(name string) string { return filepath.Join(Dir, name) }

// Create makes a named network namespace and returns its path. The calling
// goroutine's thread is returned to its own namespace afterwards.
func Create(name string) (string, error) {
	if name == "" || len(name) > 64 || filepath.Base(name) != name {
		return "", fmt.Errorf("invalid namespace name %q", name)
	}
	if _, err := os.Stat(Path(name)); err == nil {
		return "", fmt.Errorf("network namespace %s already exists", name)
	}
	if err := os.MkdirAll(Dir, 0o755); err != nil {
		return "", fmt.Errorf("creating %s: %w", Dir, err)
	}
	runtime.LockOSThread()
	orig, err := vns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return "", fmt.Errorf("reading current namespace: %w", err)
	}
	defer orig.Close()
	ns, err := vns.NewNamed(name)
	if err != nil {
		// NewNamed may have switched before failing; go back first.
		if vns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		return "", fmt.Errorf("creating network namespace %s: %w", name, err)
	}
	ns.Close()
	if err := vns.Set(orig); err != nil {
		// Leave the thread locked: Go retires it rather than reuse a
		// thread stuck in the wrong namespace.
		return "", fmt.Errorf("returning to the original namespace: %w", err)
	}
	runtime.UnlockOSThread()
	return Path(name), nil
}

// Delete removes a named namespace; a missing one is not an error.
func Delete(name string) error {
	if _, err := os.Stat(Path(name)); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err := vns.DeleteNamed(name); err != nil {
		return fmt.Errorf("deleting network namespace %s: %w", name, err)
	}
	return nil
}

// Do runs fn with the calling goroutine's thread in the namespace at path.
// Sockets fn creates stay in that namespace after Do returns.
func Do(path string, fn func() error) error {
	target, err := vns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("opening network namespace %s: %w", path, err)
	}
	defer target.Close()
	runtime.LockOSThread()
	orig, err := vns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("reading current namespace: %w", err)
	}
	defer orig.Close()
	if err := vns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("entering network namespace %s: %w", path, err)
	}
	fnErr := fn()
	if err := vns.Set(orig); err != nil {
		return errors.Join(fnErr, fmt.Errorf("leaving network namespace %s: %w", path, err))
	}
	runtime.UnlockOSThread()
	return fnErr
}

// Handle returns a netlink handle operating in the namespace at path,
// without moving any thread.
func Handle(path string) (*netlink.Handle, error) {
	ns, err := vns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("opening network namespace %s: %w", path, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("netlink in namespace %s: %w", path, err)
	}
	return h, nil
}

// Open returns a handle to the namespace at path, for APIs that take one.
func Open(path string) (vns.NsHandle, error) {
	return vns.GetFromPath(path)
}

// Dial opens a connection whose socket lives in the namespace at path.
func Dial(ctx context.Context, path, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := Do(path, func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}
