// Package slots is the table of hooks and named tail-call slots: which
// stages exist, in which order they run, and the prog-array index each one
// has. Numbers and order are written here once, explicitly; nothing derives
// them from module registration order.
package slots

import (
	"fmt"
	"slices"
	"sort"
	"strings"
)

// Hook is a core-owned attach point whose entry program runs the hook's
// stages by tail call. The values match enum weir_hook in
// bpf/include/weir/maps.h.
type Hook uint32

// Hooks, numbered as in the BPF header.
const (
	PodEgress     Hook = 0
	PodIngress    Hook = 1
	NetdevIngress Hook = 2
	NetdevEgress  Hook = 3
	numHooks           = 4
)

// PerHook is how many slots a hook may own (WEIR_SLOTS_PER_HOOK).
const PerHook = 16

// Hooks lists every hook in numeric order.
var Hooks = []Hook{PodEgress, PodIngress, NetdevIngress, NetdevEgress}

func (h Hook) String() string {
	switch h {
	case PodEgress:
		return "pod-egress"
	case PodIngress:
		return "pod-ingress"
	case NetdevIngress:
		return "netdev-ingress"
	case NetdevEgress:
		return "netdev-egress"
	}
	return fmt.Sprintf("hook(%d)", uint32(h))
}

// Slot is one stage position of a hook.
type Slot struct {
	// Name is "<hook>/<stage>", the name modules claim.
	Name string
	Hook Hook
	// Order is the position within the hook: stages run in increasing
	// order, and an empty slot falls through to the next one.
	Order uint32
	// Group, when set, names the choice the slot embodies (e.g. the
	// forwarding mode), for error messages about competing claimants.
	Group string
}

// Index is the slot's position in the node's prog array.
func (s Slot) Index() uint32 { return uint32(s.Hook)*PerHook + s.Order }

// GroupNodePortDispatch is the group of the slots that serve NodePort,
// load-balancer and external IPs from outside: SNAT (nodeport) or DSR.
const GroupNodePortDispatch = "NodePort dispatch"

// GroupPlugin marks the slots reserved for out-of-tree plugins: in-tree
// modules never claim them, plugins claim nothing else.
const GroupPlugin = "plugin"

// table is the one place slot numbers are written.
//
// Plugin slots sit where a stage sees packets in a state worth acting on,
// between in-tree stages, so that a plugin never displaces one:
// pod-egress/plugin-early sees a pod's packets before any translation
// (service addresses as the client wrote them: rate limits, policy by
// service); pod-egress/plugin-late sees them translated, before they are
// forwarded; pod-ingress/plugin sees what is about to be delivered to a
// local pod, translated back; netdev-ingress/plugin-early sees the uplink's
// packets before decapsulation and NodePort dispatch (clients from
// outside as they arrive).
var table = []Slot{
	{Name: "pod-egress/arp", Hook: PodEgress, Order: 0},
	{Name: "pod-egress/plugin-early", Hook: PodEgress, Order: 2, Group: GroupPlugin},
	{Name: "pod-egress/lb", Hook: PodEgress, Order: 4},
	{Name: "pod-egress/plugin-late", Hook: PodEgress, Order: 10, Group: GroupPlugin},
	{Name: "pod-ingress/plugin", Hook: PodIngress, Order: 8, Group: GroupPlugin},
	{Name: "netdev-ingress/plugin-early", Hook: NetdevIngress, Order: 2, Group: GroupPlugin},
	{Name: "pod-egress/nodeport", Hook: PodEgress, Order: 6},
	{Name: "pod-egress/local", Hook: PodEgress, Order: 8},
	{Name: "pod-egress/forward", Hook: PodEgress, Order: 12, Group: "forwarding mode"},
	{Name: "pod-ingress/lb-revnat", Hook: PodIngress, Order: 4},
	{Name: "pod-ingress/deliver", Hook: PodIngress, Order: 12},
	{Name: "netdev-ingress/tunnel", Hook: NetdevIngress, Order: 4},
	{Name: "netdev-ingress/dsr-receive", Hook: NetdevIngress, Order: 5, Group: GroupNodePortDispatch},
	{Name: "netdev-ingress/nodeport", Hook: NetdevIngress, Order: 6, Group: GroupNodePortDispatch},
	{Name: "netdev-ingress/masquerade", Hook: NetdevIngress, Order: 7},
	{Name: "netdev-ingress/local", Hook: NetdevIngress, Order: 8},
	{Name: "netdev-egress/tunnel", Hook: NetdevEgress, Order: 4},
	{Name: "netdev-egress/masquerade", Hook: NetdevEgress, Order: 8},
}

// MaxTailCalls is the kernel's limit of tail calls in one chain
// (MAX_TAIL_CALL_CNT); a call that would exceed it fails.
const MaxTailCalls = 33

// Chains are the sequences of hooks one packet's stages can run through:
// local delivery (and the netdev-ingress local stage) continue in the
// pod-ingress stages; a packet from outside that nodeport sends to a pod
// of another node continues in the pod-egress forwarding stage.
var Chains = [][]Hook{
	{PodEgress, PodIngress},
	{NetdevIngress, PodIngress},
	{NetdevIngress, PodEgress},
	{NetdevEgress},
}

// ChainTailCalls is the most tail calls a chain can make, counting every
// slot position of its hooks' ranges as entered: the kernel counts failed
// calls into empty slots too (the stage loop enters filled slots only,
// so this bounds it from above).
func ChainTailCalls(chain []Hook) int {
	n := 0
	for _, h := range chain {
		first, last := Range(h)
		if last >= first {
			n += int(last - first + 1)
		}
	}
	return n
}

func init() {
	if err := check(table); err != nil {
		panic(err) // the table is code, not input: a bad table is a build defect
	}
}

func check(t []Slot) error {
	names := map[string]bool{}
	idx := map[uint32]string{}
	for _, s := range t {
		if !strings.HasPrefix(s.Name, s.Hook.String()+"/") {
			return fmt.Errorf("slot %q is not named after its hook %s", s.Name, s.Hook)
		}
		if s.Order >= PerHook {
			return fmt.Errorf("slot %q: order %d is beyond %d slots per hook", s.Name, s.Order, PerHook)
		}
		if names[s.Name] {
			return fmt.Errorf("slot %q is listed twice", s.Name)
		}
		if other, ok := idx[s.Index()]; ok {
			return fmt.Errorf("slots %q and %q share index %d", s.Name, other, s.Index())
		}
		names[s.Name] = true
		idx[s.Index()] = s.Name
	}
	return nil
}

// All returns every slot, ordered by prog-array index.
func All() []Slot {
	out := slices.Clone(table)
	sort.Slice(out, func(i, j int) bool { return out[i].Index() < out[j].Index() })
	return out
}

// Lookup returns the slot with the given name.
func Lookup(name string) (Slot, bool) {
	for _, s := range table {
		if s.Name == name {
			return s, true
		}
	}
	return Slot{}, false
}

// PluginSlots lists the slots reserved for plugins, sorted.
func PluginSlots() []string {
	var out []string
	for _, s := range table {
		if s.Group == GroupPlugin {
			out = append(out, s.Name)
		}
	}
	sort.Strings(out)
	return out
}

// Names lists every slot name, sorted, for error messages.
func Names() []string {
	out := make([]string, 0, len(table))
	for _, s := range table {
		out = append(out, s.Name)
	}
	sort.Strings(out)
	return out
}

// Range returns the first and last prog-array index the hook's entry
// program walks. A hook without slots gets an empty range (first > last).
func Range(h Hook) (first, last uint32) {
	first = uint32(h) * PerHook
	found := false
	for _, s := range table {
		if s.Hook == h && (!found || s.Index() > last) {
			last = s.Index()
			found = true
		}
	}
	if !found {
		return first + 1, first
	}
	return first, last
}

// Ranges returns Range for every hook, indexed by hook, in the shape of the
// BPF constants weir_hook_first and weir_hook_last.
func Ranges() (first, last [numHooks]uint32) {
	for _, h := range Hooks {
		first[h], last[h] = Range(h)
	}
	return first, last
}
