package lab

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/vishvananda/netlink"

	"github.com/weirnet/weir/core/netns"
	"github.com/weirnet/weir/core/proc"
)

// underlayHost is the underlay address with host number i (.i of a /24;
// the same offset in a larger underlay).
func (l *Lab) underlayHost(i int) netip.Addr {
	ip := netip.MustParsePrefix(l.Spec.Underlay).Masked().Addr()
	for range i {
		ip = ip.Next()
	}
	return ip
}

// addExternals makes the hosts outside the cluster: those on the underlay
// directly, and those beyond the router, which is made first when any host
// needs it. Nodes come later and get the router as their default gateway.
func (l *Lab) addExternals() error {
	bits := netip.MustParsePrefix(l.Spec.Underlay).Bits()
	for _, es := range l.Spec.Externals {
		if es.Subnet != "" && l.Router == "" {
			l.Router = l.Spec.Name + "-rt"
			if err := l.save(); err != nil {
				return err
			}
			path, err := l.attachHost(l.Router, "u-rt", netip.PrefixFrom(l.underlayHost(routerHost), bits))
			if err != nil {
				return fmt.Errorf("router: %w", err)
			}
			if err := netns.Do(path, func() error {
				return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644)
			}); err != nil {
				return fmt.Errorf("router: %w", err)
			}
		}
	}
	next := externalFirstHost
	for i, es := range l.Spec.Externals {
		e := &External{Name: es.Name, Netns: l.Spec.Name + "-x-" + es.Name, Serve: es.Serve}
		l.Externals = append(l.Externals, e)
		if err := l.save(); err != nil {
			return err
		}
		var err error
		if es.Subnet == "" {
			e.IP = l.underlayHost(next).String()
			next++
			err = l.plumbUnderlayExternal(e, bits, es.Routes)
		} else {
			err = l.plumbRoutedExternal(e, netip.MustParsePrefix(es.Subnet), i)
		}
		if err != nil {
			return fmt.Errorf("external host %s: %w", e.Name, err)
		}
		if err := l.serveExternal(e); err != nil {
			return fmt.Errorf("external host %s: %w", e.Name, err)
		}
	}
	return l.save()
}

func (l *Lab) plumbUnderlayExternal(e *External, bits int, routes map[string]string) error {
	path, err := l.attachHost(e.Netns, "u-x"+e.Name, netip.PrefixFrom(netip.MustParseAddr(e.IP), bits))
	if err != nil {
		return err
	}
	if l.Router != "" {
		if err := defaultRoute(path, l.underlayHost(routerHost)); err != nil {
			return err
		}
	}
	h, err := netns.Handle(path)
	if err != nil {
		return err
	}
	defer h.Close()
	for pfx, node := range routes {
		i := l.specNodeIndex(node)
		if i < 0 {
			return fmt.Errorf("route %s: no node %q", pfx, node)
		}
		r := &netlink.Route{Dst: prefixNet(netip.MustParsePrefix(pfx)), Gw: l.nodeIP(i).AsSlice()}
		if err := h.RouteAdd(r); err != nil {
			return fmt.Errorf("route %s via node %s: %w", pfx, node, err)
		}
	}
	return nil
}

func (l *Lab) specNodeIndex(name string) int {
	for i, n := range l.Spec.Nodes {
		if n.Name == name {
			return i
		}
	}
	return -1
}

// plumbRoutedExternal puts the host in a subnet of its own behind the
// router: a veth pair between the two, the router at .1, the host at .10.
func (l *Lab) plumbRoutedExternal(e *External, subnet netip.Prefix, i int) error {
	gw := subnet.Addr().Next()
	host := gw
	for range 9 {
		host = host.Next()
	}
	e.IP, e.Gateway = host.String(), gw.String()
	path, err := netns.Create(e.Netns)
	if err != nil {
		return err
	}
	rtNS, err := netns.Open(netns.Path(l.Router))
	if err != nil {
		return err
	}
	defer rtNS.Close()
	h, err := netns.Handle(path)
	if err != nil {
		return err
	}
	defer h.Close()
	rtName := fmt.Sprintf("x%d", i)
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: rtName, PeerNamespace: netlink.NsFd(int(rtNS))}
	if err := h.LinkAdd(veth); err != nil {
		return fmt.Errorf("creating link to the router: %w", err)
	}
	rh, err := netns.Handle(netns.Path(l.Router))
	if err != nil {
		return err
	}
	defer rh.Close()
	for _, side := range []struct {
		h    *netlink.Handle
		name string
		addr netip.Addr
	}{{h, "eth0", host}, {rh, rtName, gw}} {
		link, err := side.h.LinkByName(side.name)
		if err != nil {
			return err
		}
		if err := side.h.AddrAdd(link, &netlink.Addr{IPNet: prefixNet(netip.PrefixFrom(side.addr, subnet.Bits()))}); err != nil {
			return fmt.Errorf("addressing %s: %w", side.name, err)
		}
		if err := side.h.LinkSetUp(link); err != nil {
			return err
		}
	}
	lo, err := h.LinkByName("lo")
	if err != nil {
		return err
	}
	if err := h.LinkSetUp(lo); err != nil {
		return err
	}
	return defaultRoute(path, gw)
}

// defaultRoute sets the namespace's default route via gw.
func defaultRoute(nsPath string, gw netip.Addr) error {
	h, err := netns.Handle(nsPath)
	if err != nil {
		return err
	}
	defer h.Close()
	r := &netlink.Route{Dst: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}, Gw: gw.AsSlice()}
	if err := h.RouteReplace(r); err != nil {
		return fmt.Errorf("default route via %s: %w", gw, err)
	}
	return nil
}

// serveExternal starts the host's workload as a process, when the lab runs
// workloads (tests serve them in-process instead).
func (l *Lab) serveExternal(e *External) error {
	if l.Options.ServeBinary == "" || e.Serve.Empty() {
		return nil
	}
	// Outside every node's cgroup: no node's socket hooks see it.
	cg := filepath.Join(l.Cgroup, "externals")
	if err := os.MkdirAll(cg, 0o755); err != nil {
		return fmt.Errorf("creating cgroup: %w", err)
	}
	args := append([]string{"lab", "serve", "--name", e.Name}, workloadArgs(e.Serve)...)
	pid, err := proc.Start(proc.Spec{Path: l.Options.ServeBinary, Args: args, Netns: e.NetnsPath(),
		LogFile: filepath.Join(l.Dir, "external-"+e.Name+".log"), Cgroup: cg})
	if err != nil {
		return err
	}
	e.ServerPID = pid
	return nil
}
