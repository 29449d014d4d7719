package endpoints

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/weirnet/weir/core/netns"
)

// hostIfName derives the host-side interface name from the endpoint ID:
// stable across agent restarts, unique per sandbox, within IFNAMSIZ.
func hostIfName(id string) string {
	sum := sha256.Sum256([]byte(id))
	return "lxc" + hex.EncodeToString(sum[:])[:11]
}

// wired is what plumbing a pod produced.
type wired struct {
	hostIndex int
	hostMAC   net.HardwareAddr
	podMAC    net.HardwareAddr
}

// plumb creates the veth pair (the pod end directly inside the pod's
// namespace), addresses the pod end, and routes the pod through the
// link-local gateway, which only BPF answers. The host end gets no address.
func plumb(hostName string, podNetns, ifName string, addr, gateway netip.Addr, mtu int) (*wired, error) {
	ns, err := netns.Open(podNetns)
	if err != nil {
		return nil, fmt.Errorf("opening pod network namespace %s: %w", podNetns, err)
	}
	defer ns.Close()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: hostName, MTU: mtu},
		PeerName:      ifName,
		PeerMTU:       uint32(mtu),
		PeerNamespace: netlink.NsFd(int(ns)),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		return nil, fmt.Errorf("creating veth %s <-> %s in %s: %w", hostName, ifName, podNetns, err)
	}
	w, err := configure(hostName, podNetns, ifName, addr, gateway)
	if err != nil {
		if l, lerr := netlink.LinkByName(hostName); lerr == nil {
			_ = netlink.LinkDel(l)
		}
		return nil, err
	}
	return w, nil
}

func configure(hostName, podNetns, ifName string, addr, gateway netip.Addr) (*wired, error) {
	host, err := netlink.LinkByName(hostName)
	if err != nil {
		return nil, fmt.Errorf("finding %s: %w", hostName, err)
	}
	// The host end is a pure BPF attach point: no IPv6 link-local chatter.
	_ = os.WriteFile(filepath.Join("/proc/sys/net/ipv6/conf", hostName, "disable_ipv6"), []byte("1"), 0o644)
	if err := netlink.LinkSetUp(host); err != nil {
		return nil, fmt.Errorf("setting %s up: %w", hostName, err)
	}

	h, err := netns.Handle(podNetns)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	pod, err := h.LinkByName(ifName)
	if err != nil {
		return nil, fmt.Errorf("finding %s in the pod: %w", ifName, err)
	}
	if lo, err := h.LinkByName("lo"); err == nil {
		_ = h.LinkSetUp(lo)
	}
	ipnet := &net.IPNet{IP: addr.AsSlice(), Mask: net.CIDRMask(32, 32)}
	if err := h.AddrAdd(pod, &netlink.Addr{IPNet: ipnet}); err != nil && !errors.Is(err, unix.EEXIST) {
		return nil, fmt.Errorf("adding %s to %s in the pod: %w", addr, ifName, err)
	}
	// The datapath is IPv4-only for now: without this the pod's IPv6
	// neighbour discovery would only show up as drops.
	if err := netns.Do(podNetns, func() error {
		return os.WriteFile(filepath.Join("/proc/sys/net/ipv6/conf", ifName, "disable_ipv6"), []byte("1"), 0o644)
	}); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("disabling IPv6 on %s in the pod: %w", ifName, err)
	}
	if err := h.LinkSetUp(pod); err != nil {
		return nil, fmt.Errorf("setting %s up in the pod: %w", ifName, err)
	}
	gw := gateway.AsSlice()
	if err := h.RouteReplace(&netlink.Route{LinkIndex: pod.Attrs().Index, Dst: &net.IPNet{IP: gw, Mask: net.CIDRMask(32, 32)}, Scope: netlink.SCOPE_LINK}); err != nil {
		return nil, fmt.Errorf("adding the gateway route in the pod: %w", err)
	}
	if err := h.RouteReplace(&netlink.Route{LinkIndex: pod.Attrs().Index, Dst: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}, Gw: gw}); err != nil {
		return nil, fmt.Errorf("adding the default route in the pod: %w", err)
	}
	if err := hostRoute(host.Attrs().Index, addr); err != nil {
		return nil, err
	}
	return &wired{hostIndex: host.Attrs().Index, hostMAC: host.Attrs().HardwareAddr, podMAC: pod.Attrs().HardwareAddr}, nil
}

// hostRoute lets the node's own stack reach the pod through its veth.
func hostRoute(ifindex int, addr netip.Addr) error {
	r := &netlink.Route{LinkIndex: ifindex, Dst: &net.IPNet{IP: addr.AsSlice(), Mask: net.CIDRMask(32, 32)}, Scope: netlink.SCOPE_LINK}
	if err := netlink.RouteReplace(r); err != nil {
		return fmt.Errorf("adding the node route to %s: %w", addr, err)
	}
	return nil
}

// unplumb deletes the host end (the kernel removes the pod end with it) and
// the node route. Missing pieces are not errors.
func unplumb(hostName string, addr netip.Addr) error {
	l, err := netlink.LinkByName(hostName)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("finding %s: %w", hostName, err)
	}
	_ = netlink.RouteDel(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: &net.IPNet{IP: addr.AsSlice(), Mask: net.CIDRMask(32, 32)}, Scope: netlink.SCOPE_LINK})
	if err := netlink.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("deleting %s: %w", hostName, err)
	}
	return nil
}
