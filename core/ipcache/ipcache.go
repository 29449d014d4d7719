// Package ipcache keeps the node's view of where addresses live: the
// weir_ipcache LPM map (every node's pod CIDRs and address, and whether a
// peer is reached through the tunnel), and kernel routes to the pod CIDRs of
// peers reached natively.
package ipcache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/model"
	"github.com/weirnet/weir/core/node"
)

// RouteProtocol marks the kernel routes Weir installs (rtnetlink protocol
// field), so that stale ones can be told from anybody else's.
const RouteProtocol = 87

// Map is the part of *ebpf.Map the reconciler uses.
type Map interface {
	Put(key, value any) error
	Delete(key any) error
	Iterate() *ebpf.MapIterator
}

// Options configure a reconciler.
type Options struct {
	// Map returns the ipcache map (called when first needed).
	Map func() Map
	// Self is this node's name.
	Self string
	// SelfKey is this node's encapsulation key ("" when it does not
	// tunnel); PeerKey gives a peer's from its labels. A peer is
	// encapsulated to when both keys are equal and not empty.
	SelfKey string
	PeerKey func(labels map[string]string) string
	Uplink  node.Uplink
	// Routes installs kernel routes to peers' pod CIDRs via their
	// address, when the peer is on the uplink's subnet: for the node's own
	// traffic to pods there (native routing forwards pods' traffic by the
	// same routes; the tunnel encapsulates the node's on the uplink).
	Routes bool
	// TunnelMTU is the MTU of the routes to peers reached through the
	// tunnel: the uplink's less the encapsulation.
	TunnelMTU int
	Log       *slog.Logger
}

// Reconciler writes the ipcache and routes.
type Reconciler struct {
	o       Options
	kick    chan struct{}
	m       Map
	applied map[datapath.IPCacheKey]datapath.IPCacheEntry
}

// New returns a reconciler; it reads the map on its first Apply.
func New(o Options) *Reconciler {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	return &Reconciler{o: o, kick: make(chan struct{}, 1)}
}

func key(p netip.Prefix) datapath.IPCacheKey {
	return datapath.IPCacheKey{Prefixlen: uint32(p.Bits()), Addr: datapath.AddrToBE(p.Addr())}
}

// Desired computes the ipcache entries for a set of nodes.
func (r *Reconciler) Desired(nodes []*model.Node) map[datapath.IPCacheKey]datapath.IPCacheEntry {
	out := map[datapath.IPCacheKey]datapath.IPCacheEntry{}
	for _, n := range nodes {
		local := n.Name == r.o.Self
		flags := uint16(datapath.IPCacheRemotePod)
		nodeFlags := uint16(datapath.IPCacheNode)
		if local {
			flags = datapath.IPCacheLocalPod
		} else if r.o.SelfKey != "" && r.o.PeerKey != nil && r.o.PeerKey(n.Labels) == r.o.SelfKey {
			// Pods reach a tunnel peer's own address through the tunnel
			// too: a pod's address never travels the underlay bare (a
			// remote NodePort backend's replies, a pod calling a
			// kubelet).
			flags |= datapath.IPCacheEncap
			nodeFlags |= datapath.IPCacheEncap
		}
		ip := datapath.AddrToBE(n.IP)
		for _, c := range n.PodCIDRs {
			out[key(c)] = datapath.IPCacheEntry{NodeIp: ip, Flags: flags}
		}
		out[key(netip.PrefixFrom(n.IP, 32))] = datapath.IPCacheEntry{NodeIp: ip, Flags: nodeFlags}
	}
	return out
}

func (r *Reconciler) restore() error {
	r.m = r.o.Map()
	r.applied = map[datapath.IPCacheKey]datapath.IPCacheEntry{}
	var (
		k datapath.IPCacheKey
		v datapath.IPCacheEntry
	)
	it := r.m.Iterate()
	for it.Next(&k, &v) {
		r.applied[k] = v
	}
	return it.Err()
}

// Apply makes the ipcache and the routes match nodes. New and changed
// entries go in before stale ones go out.
func (r *Reconciler) Apply(nodes []*model.Node) error {
	if r.applied == nil {
		if err := r.restore(); err != nil {
			r.applied = nil
			return fmt.Errorf("reading the ipcache: %w", err)
		}
	}
	want := r.Desired(nodes)
	for k, v := range want {
		if cur, ok := r.applied[k]; ok && cur == v {
			continue
		}
		if err := r.m.Put(k, v); err != nil {
			return fmt.Errorf("writing ipcache entry %s/%d: %w", datapath.AddrFromBE(k.Addr), k.Prefixlen, err)
		}
		r.applied[k] = v
	}
	for k := range r.applied {
		if _, ok := want[k]; ok {
			continue
		}
		if err := r.m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("deleting ipcache entry %s/%d: %w", datapath.AddrFromBE(k.Addr), k.Prefixlen, err)
		}
		delete(r.applied, k)
	}
	if r.o.Routes && r.o.Uplink.Valid() {
		return r.routes(nodes, want)
	}
	return nil
}

// routes keeps a route "podCIDR via peer dev uplink" for every remote peer
// reached natively on the uplink's subnet; others rely on the underlay
// routing pod CIDRs (the default route).
func (r *Reconciler) routes(nodes []*model.Node, want map[datapath.IPCacheKey]datapath.IPCacheEntry) error {
	link, err := netlink.LinkByIndex(r.o.Uplink.Index)
	if err != nil {
		return fmt.Errorf("uplink %s: %w", r.o.Uplink.Name, err)
	}
	addrs, err := netlink.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("addresses of %s: %w", r.o.Uplink.Name, err)
	}
	onLink := func(ip netip.Addr) bool {
		return slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return a.IPNet.Contains(ip.AsSlice()) })
	}
	type hop struct {
		via netip.Addr
		mtu int
	}
	desired := map[netip.Prefix]hop{}
	for _, n := range nodes {
		if n.Name == r.o.Self || !onLink(n.IP) {
			continue
		}
		for _, c := range n.PodCIDRs {
			if want[key(c)].Flags&datapath.IPCacheEncap == 0 {
				desired[c] = hop{via: n.IP}
			} else if r.o.TunnelMTU > 0 {
				desired[c] = hop{via: n.IP, mtu: r.o.TunnelMTU}
			}
		}
	}
	existing, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Protocol: RouteProtocol}, netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return fmt.Errorf("listing routes: %w", err)
	}
	for dst, h := range desired {
		rt := &netlink.Route{LinkIndex: r.o.Uplink.Index, Dst: prefixNet(dst), Gw: h.via.AsSlice(), Protocol: RouteProtocol, MTU: h.mtu}
		if err := netlink.RouteReplace(rt); err != nil {
			return fmt.Errorf("route to %s via %s: %w", dst, h.via, err)
		}
	}
	for _, rt := range existing {
		if rt.Dst == nil {
			continue
		}
		p, ok := netip.AddrFromSlice(rt.Dst.IP.To4())
		bits, _ := rt.Dst.Mask.Size()
		if ok {
			if _, keep := desired[netip.PrefixFrom(p, bits)]; keep {
				continue
			}
		}
		if err := netlink.RouteDel(&rt); err != nil {
			r.o.Log.Warn("removing a stale route", "dst", rt.Dst.String(), "err", err)
		}
	}
	return nil
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}
}

// Refresh writes the ipcache again from the current nodes: how peers are
// reached (PeerKey) may have changed with the configuration.
func (r *Reconciler) Refresh() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// Run applies the store's nodes whenever they change, once the store is
// authoritative, retrying failures with backoff until ctx ends.
func (r *Reconciler) Run(ctx context.Context, store *model.Store) {
	model.FollowNodes(ctx, store, r.kick, r.o.Log, "writing the ipcache", func(nodes []*model.Node) error {
		err := r.Apply(nodes)
		if err != nil {
			r.applied = nil // read the map again before the next try
		}
		return err
	})
}
