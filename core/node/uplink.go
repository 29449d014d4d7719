package node

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// Uplink is the node's device toward the other nodes.
type Uplink struct {
	Name  string
	Index int
	MTU   int
	// IP is the node's address on it: the tunnel endpoint peers use.
	IP netip.Addr
}

// Valid reports whether an uplink was found.
func (u Uplink) Valid() bool { return u.Index > 0 }

// FindUplink finds the uplink in the caller's network namespace: the
// device named name; else the device holding ip; else the device of the
// default route. ip, when not given, becomes the device's first IPv4
// address.
func FindUplink(name string, ip netip.Addr) (Uplink, error) {
	var link netlink.Link
	var err error
	switch {
	case name != "":
		if link, err = netlink.LinkByName(name); err != nil {
			return Uplink{}, fmt.Errorf("uplink %q: %w", name, err)
		}
	case ip.IsValid():
		if link, err = linkWithAddr(ip); err != nil {
			return Uplink{}, err
		}
	default:
		if link, err = defaultRouteLink(); err != nil {
			return Uplink{}, err
		}
	}
	u := Uplink{Name: link.Attrs().Name, Index: link.Attrs().Index, MTU: link.Attrs().MTU, IP: ip}
	if !u.IP.IsValid() {
		addrs, err := netlink.AddrList(link, netlink.FAMILY_V4)
		if err != nil {
			return Uplink{}, fmt.Errorf("addresses of %s: %w", u.Name, err)
		}
		for _, a := range addrs {
			if v, ok := netip.AddrFromSlice(a.IP.To4()); ok {
				u.IP = v
				break
			}
		}
		if !u.IP.IsValid() {
			return Uplink{}, fmt.Errorf("uplink %s has no IPv4 address; give the node's address (--node-ip)", u.Name)
		}
	}
	return u, nil
}

func linkWithAddr(ip netip.Addr) (netlink.Link, error) {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("listing addresses: %w", err)
	}
	for _, a := range addrs {
		if v, ok := netip.AddrFromSlice(a.IP.To4()); ok && v == ip {
			return netlink.LinkByIndex(a.LinkIndex)
		}
	}
	return nil, fmt.Errorf("no device holds the node address %s; name the uplink (--uplink)", ip)
}

func defaultRouteLink() (netlink.Link, error) {
	routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("listing routes: %w", err)
	}
	for _, r := range routes {
		if (r.Dst == nil || r.Dst.IP.IsUnspecified()) && r.LinkIndex > 0 {
			return netlink.LinkByIndex(r.LinkIndex)
		}
	}
	return nil, errors.New("no default route to find the uplink by; give --uplink or --node-ip")
}
