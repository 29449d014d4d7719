package datapath

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/weirnet/weir/core/model"
	"github.com/weirnet/weir/core/slots"
)

// Pinned reads a node's pinned maps without loading anything: what the CLI
// uses, agent running or not.
type Pinned struct {
	dir  string
	maps map[string]*ebpf.Map
}

// OpenPinned opens the maps pinned in a node's directory read-only.
func OpenPinned(dir string) (*Pinned, error) {
	if _, err := os.Stat(filepath.Join(dir, MapServices)); err != nil {
		return nil, fmt.Errorf("%s holds no Weir datapath: %w", dir, err)
	}
	return &Pinned{dir: dir, maps: map[string]*ebpf.Map{}}, nil
}

// Close releases the opened maps.
func (p *Pinned) Close() {
	for _, m := range p.maps {
		m.Close()
	}
}

func (p *Pinned) m(name string) (*ebpf.Map, error) {
	if m, ok := p.maps[name]; ok {
		return m, nil
	}
	m, err := ebpf.LoadPinnedMap(filepath.Join(p.dir, name), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return nil, fmt.Errorf("opening pinned map %s: %w", name, err)
	}
	p.maps[name] = m
	return m, nil
}

// LBEntry is one entry of the services map.
type LBEntry struct {
	Frontend netip.AddrPort `json:"frontend"`
	Proto    string         `json:"proto"`
	Scope    string         `json:"scope"`
	Slot     uint16         `json:"slot"`
	// Master entries (slot 0).
	Count  uint16 `json:"count,omitempty"`
	RevNAT uint32 `json:"revNAT"`
	Type   string `json:"type,omitempty"`
	// Flags2 are the master's WEIR_SVC_F2_* bits; Selected why its slots
	// hold their backends (see ServiceRow.Selected).
	Flags2   uint8  `json:"flags2,omitempty"`
	Selected string `json:"selected,omitempty"`
	// Backend slots.
	BackendID uint32          `json:"backendID,omitempty"`
	Backend   *netip.AddrPort `json:"backend,omitempty"`
	State     string          `json:"state,omitempty"`
}

// BackendRow is a backend of a service.
type BackendRow struct {
	ID    uint32         `json:"id"`
	Addr  netip.AddrPort `json:"address"`
	State string         `json:"state"`
}

// ServiceRow is a frontend with its backends.
type ServiceRow struct {
	ID       uint32         `json:"id"`
	Frontend netip.AddrPort `json:"frontend"`
	Proto    string         `json:"proto"`
	Type     string         `json:"type"`
	Scope    string         `json:"scope"`
	// Served says who reaches the frontend on this node: "yes" (a
	// ClusterIP from pods; any other type once a NodePort dispatch
	// module serves traffic from outside), "from pods only" (NodePort,
	// LoadBalancer and external IPs without one: in-cluster traffic is
	// translated, traffic from outside is not).
	Served string `json:"served"`
	// Traffic is which traffic the entry serves: "any", or with an
	// externalTrafficPolicy Local frontend split in two, "from outside"
	// (the external scope) and "in-cluster" (the internal scope).
	Traffic string `json:"traffic"`
	// Selected says why Backends are these: "all" (every ready endpoint,
	// or every serving-terminating one when none is ready), "local" (the
	// node's own: a traffic policy Local), "zone" or "node" (topology
	// hints for the node's zone, or for the node).
	Selected string       `json:"selected"`
	Backends []BackendRow `json:"backends"`
}

// Traffic an entry serves.
const (
	TrafficAny       = "any"
	TrafficOutside   = "from outside"
	TrafficInCluster = "in-cluster"
)

// Reach of frontends the north-south modules would serve.
const (
	ServedYes      = "yes"
	ServedPodsOnly = "from pods only (no NodePort dispatch module on this node)"
)

// served says who reaches a frontend of type typ on this node, given
// whether a NodePort dispatch stage is filled.
func served(typ string, dispatch bool) string {
	if typ == "ClusterIP" || dispatch {
		return ServedYes
	}
	return ServedPodsOnly
}

// dispatching reports whether a slot of the NodePort dispatch group holds
// a program.
func (p *Pinned) dispatching() (bool, error) {
	m, err := p.m(MapSlotMask)
	if err != nil {
		return false, err
	}
	for _, s := range slots.All() {
		if s.Group != slots.GroupNodePortDispatch {
			continue
		}
		var mask uint32
		if err := m.Lookup(uint32(s.Hook), &mask); err != nil {
			return false, fmt.Errorf("reading the slot mask: %w", err)
		}
		if mask&(1<<s.Order) != 0 {
			return true, nil
		}
	}
	return false, nil
}

func typeName(t uint8) string {
	switch t {
	case SvcClusterIP:
		return "ClusterIP"
	case SvcNodePort:
		return "NodePort"
	case SvcLoadBalancer:
		return "LoadBalancer"
	case SvcExternalIP:
		return "ExternalIP"
	}
	return fmt.Sprintf("type-%d", t)
}

// SelectionName names a master entry's selection (enum
// weir_svc_selection, numbered as model.Selection).
func SelectionName(s uint32) string {
	if s > 0xff {
		return fmt.Sprintf("selection-%d", s)
	}
	return model.Selection(s).String()
}

func scopeName(s uint8) string {
	if s == ScopeInternal {
		return "internal"
	}
	return "external"
}

func stateName(s uint8) string {
	switch s {
	case BackendActive:
		return "active"
	case BackendTerminating:
		return "terminating"
	case BackendQuarantined:
		return "quarantined"
	}
	return fmt.Sprintf("state-%d", s)
}

func (p *Pinned) backends() (map[uint32]Backend, error) {
	m, err := p.m(MapBackends)
	if err != nil {
		return nil, err
	}
	out := map[uint32]Backend{}
	var (
		id uint32
		be Backend
	)
	it := m.Iterate()
	for it.Next(&id, &be) {
		out[id] = be
	}
	return out, it.Err()
}

func backendAddr(be Backend) netip.AddrPort {
	return netip.AddrPortFrom(AddrFromBE(be.Addr), PortFromBE(be.Port))
}

// LB lists every entry of the services map, masters first within a
// frontend.
func (p *Pinned) LB() ([]LBEntry, error) {
	m, err := p.m(MapServices)
	if err != nil {
		return nil, err
	}
	bes, err := p.backends()
	if err != nil {
		return nil, err
	}
	var out []LBEntry
	var (
		k ServiceKey
		v ServiceValue
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		e := LBEntry{
			Frontend: netip.AddrPortFrom(AddrFromBE(k.Addr), PortFromBE(k.Port)),
			Proto:    ProtoName(k.Proto), Scope: scopeName(k.Scope), Slot: k.Slot, RevNAT: v.RevNat,
		}
		if k.Slot == 0 {
			e.Count, e.Type, e.Flags2, e.Selected = v.Count, typeName(v.Type), v.Flags2, SelectionName(v.BackendId)
		} else {
			e.BackendID = v.BackendId
			if be, ok := bes[v.BackendId]; ok {
				a := backendAddr(be)
				e.Backend, e.State = &a, stateName(be.State)
			}
		}
		out = append(out, e)
	}
	if err := it.Err(); err != nil {
		return nil, err
	}
	slices.SortFunc(out, func(a, b LBEntry) int {
		return cmp.Or(a.Frontend.Addr().Compare(b.Frontend.Addr()), cmp.Compare(a.Frontend.Port(), b.Frontend.Port()),
			strings.Compare(a.Proto, b.Proto), strings.Compare(a.Scope, b.Scope), cmp.Compare(a.Slot, b.Slot))
	})
	return out, nil
}

// Services groups the services map into frontends with their backends.
// Entries come sorted with each master before its slots; slots beyond the
// master's count are leftovers of an interrupted write, not backends.
func (p *Pinned) Services() ([]ServiceRow, error) {
	entries, err := p.LB()
	if err != nil {
		return nil, err
	}
	dispatch, err := p.dispatching()
	if err != nil {
		return nil, err
	}
	var out []ServiceRow
	count := 0
	for _, e := range entries {
		if e.Slot == 0 {
			traffic := TrafficAny
			switch {
			case e.Scope == scopeName(ScopeInternal):
				traffic = TrafficInCluster
			case e.Flags2&SvcFlagTwoScopes != 0:
				traffic = TrafficOutside
			}
			out = append(out, ServiceRow{ID: e.RevNAT, Frontend: e.Frontend, Proto: e.Proto, Type: e.Type, Scope: e.Scope, Served: served(e.Type, dispatch),
				Traffic: traffic, Selected: e.Selected, Backends: []BackendRow{}})
			count = int(e.Count)
			continue
		}
		n := len(out)
		if n == 0 || out[n-1].Frontend != e.Frontend || out[n-1].Proto != e.Proto || out[n-1].Scope != e.Scope {
			continue // slots without a master: never visible to packets
		}
		if int(e.Slot) <= count && e.Backend != nil {
			out[n-1].Backends = append(out[n-1].Backends, BackendRow{ID: e.BackendID, Addr: *e.Backend, State: e.State})
		}
	}
	return out, nil
}

// CTRow is one conntrack entry: packets matching Src -> Dst leave as
// NatSrc -> NatDst.
type CTRow struct {
	// Dir is "orig" (the tuple the flow's first packet had) or "reply"
	// (the tuple its replies carry on the wire).
	Dir       string         `json:"dir"`
	Src       netip.AddrPort `json:"src"`
	Dst       netip.AddrPort `json:"dst"`
	NatSrc    netip.AddrPort `json:"natSrc"`
	NatDst    netip.AddrPort `json:"natDst"`
	Proto     string         `json:"proto"`
	BackendID uint32         `json:"backendID,omitempty"`
	RevNAT    uint32         `json:"revNAT,omitempty"`
	// State is the flow's: syn, established, half-closed, time-wait,
	// reset (TCP); new, replied (UDP).
	State     string `json:"state"`
	Flags     string `json:"flags"`
	ExpiresIn int64  `json:"expiresInSeconds"`
	Packets   uint64 `json:"packets"`
	Bytes     uint64 `json:"bytes"`
}

// BootSeconds is the boot clock in seconds, the clock of CT lifetimes.
func BootSeconds() (int64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0, err
	}
	return ts.Sec, nil
}

func ctFlags(f uint16) string {
	var s []string
	for _, b := range []struct {
		bit  uint16
		name string
	}{{CTFlagSeenReply, "SEEN_REPLY"}, {CTFlagEstablished, "ESTABLISHED"}, {CTFlagFINOrig, "FIN_ORIG"}, {CTFlagFINReply, "FIN_REPLY"},
		{CTFlagRST, "RST"}, {CTFlagRSTReply, "RST_REPLY"}, {CTFlagRemapped, "REMAPPED"}, {CTFlagNodePort, "NODEPORT"},
		{CTFlagSNAT, "SNAT"}, {CTFlagHairpin, "HAIRPIN"}, {CTFlagDSR, "DSR"}} {
		if f&b.bit != 0 {
			s = append(s, b.name)
		}
	}
	return strings.Join(s, ",")
}

// CTState names a flow's state from its flags, as ct.h reads them.
func CTState(proto uint8, f uint16) string {
	if proto != 6 {
		if f&CTFlagSeenReply != 0 {
			return "replied"
		}
		return "new"
	}
	const fins = CTFlagFINOrig | CTFlagFINReply
	switch {
	case f&CTFlagRST != 0:
		return "reset"
	case f&fins == fins:
		return "time-wait"
	case f&fins != 0:
		return "half-closed"
	case f&CTFlagEstablished != 0:
		return "established"
	}
	return "syn"
}

// CT lists the conntrack entries that have not expired.
func (p *Pinned) CT() ([]CTRow, error) {
	m, err := p.m(MapCT)
	if err != nil {
		return nil, err
	}
	now, err := BootSeconds()
	if err != nil {
		return nil, err
	}
	var out []CTRow
	var (
		k CTKey
		v CTEntry
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		left := int64(v.Lifetime) - now
		if left <= 0 {
			continue
		}
		dir := "orig"
		if v.Dir == CTReply {
			dir = "reply"
		}
		out = append(out, CTRow{
			Dir: dir, Proto: ProtoName(k.Proto),
			Src:       netip.AddrPortFrom(AddrFromBE(k.Saddr), PortFromBE(k.Sport)),
			Dst:       netip.AddrPortFrom(AddrFromBE(k.Daddr), PortFromBE(k.Dport)),
			NatSrc:    netip.AddrPortFrom(AddrFromBE(v.NatSaddr), PortFromBE(v.NatSport)),
			NatDst:    netip.AddrPortFrom(AddrFromBE(v.NatDaddr), PortFromBE(v.NatDport)),
			BackendID: v.BackendId, RevNAT: v.RevNat, State: CTState(k.Proto, v.Flags), Flags: ctFlags(v.Flags), ExpiresIn: left,
			Packets: v.Packets, Bytes: v.Bytes,
		})
	}
	if err := it.Err(); err != nil {
		return nil, err
	}
	slices.SortFunc(out, func(a, b CTRow) int {
		return cmp.Or(strings.Compare(a.Dir, b.Dir), a.Src.Addr().Compare(b.Src.Addr()), cmp.Compare(a.Src.Port(), b.Src.Port()),
			a.Dst.Addr().Compare(b.Dst.Addr()), cmp.Compare(a.Dst.Port(), b.Dst.Port()))
	})
	return out, nil
}

// NATRow is one weir_nat entry: for "out", packets of the tuple leave
// with To as their source; for "in", replies to the tuple get To as their
// destination.
type NATRow struct {
	Dir   string         `json:"dir"`
	Proto string         `json:"proto"`
	Src   netip.AddrPort `json:"src"`
	Dst   netip.AddrPort `json:"dst"`
	To    netip.AddrPort `json:"to"`
	Owner string         `json:"owner"`
	// Age is seconds since the entry was made.
	Age int64 `json:"age"`
}

// NATOwnerName names the use that made a NAT entry.
func NATOwnerName(o uint8) string {
	switch o {
	case NATNodePort:
		return "nodeport"
	case NATMasquerade:
		return "masquerade"
	}
	return fmt.Sprintf("owner-%d", o)
}

// NAT lists the source NAT entries, both directions of every flow.
func (p *Pinned) NAT() ([]NATRow, error) {
	m, err := p.m(MapNAT)
	if err != nil {
		return nil, err
	}
	now, err := BootSeconds()
	if err != nil {
		return nil, err
	}
	var (
		out []NATRow
		k   NATKey
		v   NATEntry
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		dir := "out"
		if k.Dir == NATIn {
			dir = "in"
		}
		out = append(out, NATRow{
			Dir: dir, Proto: ProtoName(k.Proto),
			Src:   netip.AddrPortFrom(AddrFromBE(k.Saddr), PortFromBE(k.Sport)),
			Dst:   netip.AddrPortFrom(AddrFromBE(k.Daddr), PortFromBE(k.Dport)),
			To:    netip.AddrPortFrom(AddrFromBE(v.Addr), PortFromBE(v.Port)),
			Owner: NATOwnerName(v.Owner), Age: now - int64(v.Created),
		})
	}
	if err := it.Err(); err != nil {
		return nil, err
	}
	slices.SortFunc(out, func(a, b NATRow) int {
		return cmp.Or(strings.Compare(b.Dir, a.Dir), a.Src.Addr().Compare(b.Src.Addr()), cmp.Compare(a.Src.Port(), b.Src.Port()),
			a.Dst.Addr().Compare(b.Dst.Addr()), cmp.Compare(a.Dst.Port(), b.Dst.Port()))
	})
	return out, nil
}

// MetricRow is a counter of packets by hook and reason.
type MetricRow struct {
	Hook    string `json:"hook"`
	Reason  string `json:"reason"`
	Code    uint8  `json:"code"`
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// Metrics sums the per-CPU counters; zero rows are left out.
func (p *Pinned) Metrics() ([]MetricRow, error) {
	m, err := p.m(MapMetrics)
	if err != nil {
		return nil, err
	}
	return ReadMetrics(m)
}

// ReadMetrics sums the per-CPU packet counters of a metrics map (the
// node's weir_metrics) by hook and reason; zero rows are left out.
func ReadMetrics(m *ebpf.Map) ([]MetricRow, error) {
	var out []MetricRow
	for _, h := range slots.Hooks {
		for r := range NumReasons {
			var per []Metric
			if err := m.Lookup(uint32(h)*NumReasons+r, &per); err != nil {
				if errors.Is(err, ebpf.ErrKeyNotExist) {
					continue
				}
				return nil, err
			}
			row := MetricRow{Hook: h.String(), Reason: Reason(r).String(), Code: uint8(r)}
			for _, c := range per {
				row.Packets += c.Packets
				row.Bytes += c.Bytes
			}
			if row.Packets > 0 {
				out = append(out, row)
			}
		}
	}
	return out, nil
}

// EndpointRow is one local endpoint.
type EndpointRow struct {
	Addr    netip.Addr `json:"address"`
	Ifindex uint32     `json:"ifindex"`
	MAC     string     `json:"mac"`
	NodeMAC string     `json:"nodeMAC"`
}

// Endpoints lists the endpoints map.
func (p *Pinned) Endpoints() ([]EndpointRow, error) {
	m, err := p.m(MapEndpoints)
	if err != nil {
		return nil, err
	}
	var out []EndpointRow
	var (
		k EndpointKey
		v Endpoint
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		out = append(out, EndpointRow{Addr: AddrFromBE(k.Addr), Ifindex: v.Ifindex,
			MAC: macString(v.Mac), NodeMAC: macString(v.NodeMac)})
	}
	slices.SortFunc(out, func(a, b EndpointRow) int { return a.Addr.Compare(b.Addr) })
	return out, it.Err()
}

func macString(m [6]uint8) string {
	return fmt.Sprintf("%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5])
}

// IPCacheRow is one ipcache entry.
type IPCacheRow struct {
	Prefix netip.Prefix `json:"prefix"`
	NodeIP netip.Addr   `json:"nodeIP"`
	Kind   string       `json:"kind"`
	// Via says how this node reaches it: local, tunnel, native.
	Via string `json:"via"`
}

// IPCache lists the ipcache, most specific prefixes last.
func (p *Pinned) IPCache() ([]IPCacheRow, error) {
	m, err := p.m(MapIPCache)
	if err != nil {
		return nil, err
	}
	var out []IPCacheRow
	var (
		k IPCacheKey
		v IPCacheEntry
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		r := IPCacheRow{Prefix: netip.PrefixFrom(AddrFromBE(k.Addr), int(k.Prefixlen)), NodeIP: AddrFromBE(v.NodeIp), Via: "native"}
		switch {
		case v.Flags&IPCacheLocalPod != 0:
			r.Kind, r.Via = "local pods", "local"
		case v.Flags&IPCacheRemotePod != 0:
			r.Kind = "remote pods"
		case v.Flags&IPCacheNode != 0:
			r.Kind = "node"
		}
		if v.Flags&IPCacheEncap != 0 {
			r.Via = "tunnel"
		}
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b IPCacheRow) int {
		return cmp.Or(a.Prefix.Addr().Compare(b.Prefix.Addr()), cmp.Compare(a.Prefix.Bits(), b.Prefix.Bits()))
	})
	return out, it.Err()
}

// CountEntries counts a map's entries (for hash maps: what takes room,
// expired conntrack entries included).
func CountEntries(m *ebpf.Map) (int, error) {
	info, err := m.Info()
	if err != nil {
		return 0, err
	}
	k := make([]byte, info.KeySize)
	v := make([]byte, info.ValueSize)
	n := 0
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	return n, it.Err()
}

// PluginMapRow is one map a plugin owns, as pinned for it.
type PluginMapRow struct {
	Plugin  string `json:"plugin"`
	Map     string `json:"map"`
	Type    string `json:"type"`
	Entries int    `json:"entries"`
	// Counters, for per-CPU arrays of 64-bit values (a plugin's
	// counters), are each index's sum over CPUs.
	Counters []uint64 `json:"counters,omitempty"`
}

// PluginMaps lists the maps of every plugin that ran on the node.
func (p *Pinned) PluginMaps() ([]PluginMapRow, error) {
	dirs, err := filepath.Glob(filepath.Join(p.dir, "plugins", "*"))
	if err != nil {
		return nil, err
	}
	var out []PluginMapRow
	for _, dir := range dirs {
		files, err := filepath.Glob(filepath.Join(dir, "*"))
		if err != nil {
			return nil, err
		}
		for _, f := range files {
			m, err := ebpf.LoadPinnedMap(f, &ebpf.LoadPinOptions{ReadOnly: true})
			if err != nil {
				return nil, fmt.Errorf("opening pinned map %s: %w", f, err)
			}
			row := PluginMapRow{Plugin: filepath.Base(dir), Map: filepath.Base(f), Type: m.Type().String()}
			if m.Type() == ebpf.PerCPUArray && m.ValueSize() == 8 {
				for i := range m.MaxEntries() {
					var per []uint64
					if err := m.Lookup(i, &per); err != nil {
						m.Close()
						return nil, fmt.Errorf("reading %s: %w", f, err)
					}
					var sum uint64
					for _, v := range per {
						sum += v
					}
					row.Counters = append(row.Counters, sum)
				}
				row.Entries = int(m.MaxEntries())
			} else if row.Entries, err = CountEntries(m); err != nil {
				m.Close()
				return nil, fmt.Errorf("reading %s: %w", f, err)
			}
			m.Close()
			out = append(out, row)
		}
	}
	return out, nil
}
