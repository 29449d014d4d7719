package model

import "slices"

// ZoneLabel is the Node label that names the node's zone; topology hints
// for zones are matched against it.
const ZoneLabel = "topology.kubernetes.io/zone"

// Selection says why a scope of a frontend uses the backends it uses.
// The numbers are enum weir_svc_selection's: the datapath's master entry
// carries them for operators.
type Selection uint8

// Selections, as kube-proxy chooses endpoints (pkg/proxy/topology.go).
const (
	// SelectAll: every ready endpoint of the cluster (or every
	// serving-terminating one when none is ready).
	SelectAll Selection = 0
	// SelectLocal: the node's own endpoints (a traffic policy Local).
	SelectLocal Selection = 1
	// SelectZone: the endpoints hinted for the node's zone.
	SelectZone Selection = 2
	// SelectNode: the endpoints hinted for the node itself
	// (trafficDistribution PreferSameNode).
	SelectNode Selection = 3
)

func (s Selection) String() string {
	switch s {
	case SelectAll:
		return "all"
	case SelectLocal:
		return "local"
	case SelectZone:
		return "zone"
	case SelectNode:
		return "node"
	}
	return "unknown"
}

// Topology is where the node that serves a frontend sits.
type Topology struct {
	Node, Zone string
	// IgnoreHints chooses as if no backend had hints: the widest choice,
	// for bounds that must hold in every zone.
	IgnoreHints bool
}

// ClusterBackends are the backends that take new cluster-wide flows
// (traffic policy Cluster) on a node at t, and why, exactly as kube-proxy
// 1.34 categorises endpoints: when every ready backend carries node hints
// and one is hinted for this node, those; otherwise, when every ready
// backend carries zone hints and one is hinted for this node's zone,
// those; otherwise every ready backend. With no ready backend anywhere,
// the serving-terminating ones take new flows, whatever the hints.
func (f *Frontend) ClusterBackends(t Topology) ([]Backend, Selection) {
	sel := topologyOf(f.Backends, t)
	var out []Backend
	for _, b := range f.Backends {
		if b.State == Active && b.availableFor(sel, t) {
			out = append(out, b)
		}
	}
	if len(out) == 0 {
		// Not for want of a ready backend in this zone: the selection
		// above only narrows when one is there, so none is ready at all.
		return terminating(f.Backends, func(Backend) bool { return true }), SelectAll
	}
	return out, sel
}

// LocalBackends are the backends on node t.Node that take new flows under
// a traffic policy Local: the ready ones, or the serving-terminating ones
// when none is ready. Hints do not apply.
func (f *Frontend) LocalBackends(t Topology) []Backend {
	var out []Backend
	for _, b := range f.Backends {
		if b.State == Active && b.NodeName == t.Node {
			out = append(out, b)
		}
	}
	if len(out) == 0 {
		return terminating(f.Backends, func(b Backend) bool { return b.NodeName == t.Node })
	}
	return out
}

func terminating(bes []Backend, keep func(Backend) bool) []Backend {
	var out []Backend
	for _, b := range bes {
		if b.State == Terminating && keep(b) {
			out = append(out, b)
		}
	}
	return out
}

// topologyOf decides, from the ready backends' hints, whether hints narrow
// the choice on a node at t (kube-proxy's topologyModeFromHints, with the
// PreferSameTrafficDistribution gate on, its 1.34 default).
func topologyOf(bes []Backend, t Topology) Selection {
	allNode, allZone := true, true
	forNode, forZone := false, false
	ready := 0
	for _, b := range bes {
		if b.State != Active {
			continue
		}
		ready++
		h := b.Hints
		if h == nil || len(h.Nodes) == 0 {
			allNode = false
		} else if slices.Contains(h.Nodes, t.Node) {
			forNode = true
		}
		if h == nil || len(h.Zones) == 0 {
			allZone = false
		} else if slices.Contains(h.Zones, t.Zone) {
			forZone = true
		}
	}
	switch {
	case ready == 0 || t.IgnoreHints:
		return SelectAll
	case allNode && forNode:
		return SelectNode
	case allZone && forZone:
		return SelectZone
	}
	return SelectAll
}

func (b Backend) availableFor(sel Selection, t Topology) bool {
	switch sel {
	case SelectNode:
		return slices.Contains(b.Hints.Nodes, t.Node)
	case SelectZone:
		return slices.Contains(b.Hints.Zones, t.Zone)
	}
	return true
}

// HasHints reports whether any backend of the frontend carries hints.
func (f *Frontend) HasHints() bool {
	return slices.ContainsFunc(f.Backends, func(b Backend) bool { return b.Hints != nil })
}
