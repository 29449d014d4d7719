// Package cptest starts a real control plane for a test.
package cptest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"k8s.io/client-go/kubernetes"

	"github.com/weirnet/weir/core/lab/controlplane"
	"github.com/weirnet/weir/core/netns"
	"github.com/weirnet/weir/core/proc"
)

// Start runs a control plane in a namespace of its own, with its
// address on the namespace's loopback, and stops it when the test ends.
func Start(t testing.TB) *controlplane.ControlPlane {
	t.Helper()
	var b [3]byte
	_, _ = rand.Read(b[:])
	name := "wt-cp-" + hex.EncodeToString(b[:])
	path, err := netns.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = netns.Delete(name) })
	addr := netip.MustParseAddr("192.168.100.2")
	h, err := netns.Handle(path)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	lo, _ := h.LinkByName("lo")
	if err := h.AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: addr.AsSlice(), Mask: net.CIDRMask(32, 32)}}); err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "cp")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cp, err := controlplane.Start(ctx, controlplane.Options{Dir: dir, Netns: path, Address: addr})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		pids := cp.PIDs
		if err := cp.Stop(); err != nil {
			t.Errorf("stop: %v", err)
		}
		for _, p := range pids {
			if proc.Alive(p) {
				t.Errorf("control-plane process %d still running", p)
			}
		}
	})
	return cp
}

// Client returns a clientset for the control plane.
func Client(t testing.TB, cp *controlplane.ControlPlane) kubernetes.Interface {
	t.Helper()
	c, err := kubernetes.NewForConfig(cp.RestConfig())
	if err != nil {
		t.Fatal(err)
	}
	return c
}
