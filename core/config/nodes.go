package config

import (
	"cmp"
	"maps"
	"slices"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/weirnet/weir/core/strictyaml"
)

// fieldPath is a field path as steps: a string is a mapping key, an int a
// list index. One value gives both the printed path and the node to point
// at, so the two cannot disagree.
type fieldPath []any

func (p fieldPath) key(k string) fieldPath { return append(slices.Clip(p), k) }
func (p fieldPath) idx(i int) fieldPath    { return append(slices.Clip(p), i) }

func (p fieldPath) String() string {
	var s string
	for _, step := range p {
		switch v := step.(type) {
		case string:
			s = strictyaml.Key(s, v)
		case int:
			s = strictyaml.Index(s, v)
		}
	}
	return s
}

// parseFieldPath reads the path a module's Validate reports
// ("backends[2].port") back into steps. It is only used to find a line, so
// anything it misreads just leads to a less precise line.
func parseFieldPath(s string) fieldPath {
	var p fieldPath
	for part := range strings.SplitSeq(s, ".") {
		name, rest, _ := strings.Cut(part, "[")
		if name != "" {
			p = append(p, name)
		}
		for rest != "" {
			num, after, _ := strings.Cut(rest, "]")
			i, err := strconv.Atoi(num)
			if err != nil {
				break
			}
			p = append(p, i)
			rest = strings.TrimPrefix(after, "[")
		}
	}
	return p
}

// locate follows p from n and returns the key node of the last step (nil
// when the last step is an index) and the value node. Where p leads
// nowhere (a field left at its default), it stops at the deepest node on
// the way, so errors still point near the right place.
func locate(n *yaml.Node, p fieldPath) (key, val *yaml.Node) {
	val = n
	for _, step := range p {
		if val == nil {
			break
		}
		var k, next *yaml.Node
		switch s := step.(type) {
		case string:
			if val.Kind == yaml.MappingNode {
				for i := 0; i+1 < len(val.Content); i += 2 {
					if val.Content[i].Value == s {
						k, next = val.Content[i], val.Content[i+1]
						break
					}
				}
			}
		case int:
			if val.Kind == yaml.SequenceNode && s >= 0 && s < len(val.Content) {
				next = val.Content[s]
			}
		}
		if next == nil {
			return nil, val
		}
		key, val = k, next
	}
	return key, val
}

// orderedKeys lists a section map's keys in file order, so the first error
// reported is the first one in the file.
func orderedKeys(m map[string]yaml.Node) []string {
	keys := slices.Collect(maps.Keys(m))
	slices.SortFunc(keys, func(a, b string) int {
		return cmp.Or(cmp.Compare(m[a].Line, m[b].Line), cmp.Compare(m[a].Column, m[b].Column), strings.Compare(a, b))
	})
	return keys
}

// merge returns over deep-merged onto base: mappings merge key by key,
// anything else in over replaces base, and a missing or null over keeps
// base. Neither input is modified, because the top-level section is merged
// into every pool.
func merge(base, over *yaml.Node) *yaml.Node {
	switch {
	case over == nil || isNull(over):
		return base
	case base == nil || isNull(base):
		return over
	case base.Kind != yaml.MappingNode || over.Kind != yaml.MappingNode:
		return over
	}
	out := *base
	out.Content = slices.Clone(base.Content)
	at := map[string]int{} // key → index of its value in out.Content
	for i := 0; i+1 < len(out.Content); i += 2 {
		at[out.Content[i].Value] = i + 1
	}
	for i := 0; i+1 < len(over.Content); i += 2 {
		k, v := over.Content[i], over.Content[i+1]
		if j, ok := at[k.Value]; ok {
			out.Content[j] = merge(out.Content[j], v)
			continue
		}
		out.Content = append(out.Content, k, v)
		at[k.Value] = len(out.Content) - 1
	}
	return &out
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}
