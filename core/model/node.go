package model

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
)

// Node is a node of the cluster: where its pods live, and its labels
// (which decide its pool, hence how peers reach it).
type Node struct {
	Name     string
	IP       netip.Addr
	PodCIDRs []netip.Prefix
	Labels   map[string]string
}

// Validate checks one node.
func (n *Node) Validate() error {
	if n.Name == "" {
		return fmt.Errorf("node has no name")
	}
	if !n.IP.Is4() {
		return fmt.Errorf("node %s: address %s is not IPv4", n.Name, n.IP)
	}
	for _, p := range n.PodCIDRs {
		if !p.Addr().Is4() || p.Masked() != p {
			return fmt.Errorf("node %s: pod CIDR %s is not an IPv4 network", n.Name, p)
		}
	}
	return nil
}

// checkNodes validates a set of nodes: valid each, names unique, pod CIDRs
// and addresses not shared.
func checkNodes(nodes []*Node) error {
	byName := map[string]bool{}
	ips := map[netip.Addr]string{}
	type owned struct {
		p    netip.Prefix
		name string
	}
	var cidrs []owned
	for _, n := range nodes {
		if err := n.Validate(); err != nil {
			return err
		}
		if byName[n.Name] {
			return fmt.Errorf("node %s is defined twice", n.Name)
		}
		byName[n.Name] = true
		if other, ok := ips[n.IP]; ok {
			return fmt.Errorf("nodes %s and %s share address %s", other, n.Name, n.IP)
		}
		ips[n.IP] = n.Name
		for _, p := range n.PodCIDRs {
			for _, o := range cidrs {
				if o.p.Overlaps(p) {
					return fmt.Errorf("pod CIDR %s of node %s overlaps %s of node %s", p, n.Name, o.p, o.name)
				}
			}
			cidrs = append(cidrs, owned{p, n.Name})
		}
	}
	return nil
}

// ReplaceNodes sets every node of a source. An invalid set is refused as a
// whole.
func (s *Store) ReplaceNodes(source string, nodes []*Node) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var all []*Node
	for src, ns := range s.nodes {
		if src != source {
			all = append(all, ns...)
		}
	}
	all = append(all, nodes...)
	if err := checkNodes(all); err != nil {
		return err
	}
	if slices.EqualFunc(s.nodes[source], nodes, sameNode) {
		return nil
	}
	s.nodes[source] = slices.Clone(nodes)
	slices.SortFunc(all, func(a, b *Node) int { return strings.Compare(a.Name, b.Name) })
	s.allNodes = all
	s.version++
	s.nodesVersion++
	s.notify(false, true)
	return nil
}

func sameNode(a, b *Node) bool {
	return a.Name == b.Name && a.IP == b.IP && slices.Equal(a.PodCIDRs, b.PodCIDRs) && maps.Equal(a.Labels, b.Labels)
}

// Nodes returns every node, sorted by name, the store's version, and
// whether the store is authoritative (as Snapshot).
func (s *Store) Nodes() ([]*Node, uint64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.nodesStateLocked()
}

func (s *Store) nodesStateLocked() ([]*Node, uint64, bool) {
	return s.allNodes, s.nodesVersion, s.authoritative()
}

// NodeNamed returns the node of that name in the snapshot, or nil.
func (s *Snapshot) NodeNamed(name string) *Node {
	i, ok := slices.BinarySearchFunc(s.Nodes, name, func(n *Node, name string) int { return cmp.Compare(n.Name, name) })
	if !ok {
		return nil
	}
	return s.Nodes[i]
}
