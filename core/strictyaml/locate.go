package strictyaml

import (
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// Locate finds the node at path (as built by Key and Index) below root, so
// that a validation error found after decoding can point at its line. It
// returns the deepest node it could reach (the value of the last key that
// exists), or nil when root is nil.
func Locate(root *yaml.Node, path string) *yaml.Node {
	n, _ := find(root, path)
	return n
}

// Present reports whether the document has a value at path: it tells a
// field left out from one written with a zero value.
func Present(root *yaml.Node, path string) bool {
	n, complete := find(root, path)
	return n != nil && complete
}

func find(root *yaml.Node, path string) (*yaml.Node, bool) {
	n := root
	for path != "" && n != nil {
		var seg string
		idx := -1
		switch {
		case strings.HasPrefix(path, `["`):
			// A quoted key: ["node.weir.dev/pool"].
			end := strings.Index(path, `"]`)
			for end > 0 && path[end-1] == '\\' {
				next := strings.Index(path[end+2:], `"]`)
				if next < 0 {
					end = -1
					break
				}
				end += 2 + next
			}
			if end < 0 {
				return n, false
			}
			s, err := strconv.Unquote(path[1 : end+1])
			if err != nil {
				return n, false
			}
			seg, path = s, path[end+2:]
		case strings.HasPrefix(path, "["):
			end := strings.IndexByte(path, ']')
			if end < 0 {
				return n, false
			}
			i, err := strconv.Atoi(path[1:end])
			if err != nil {
				return n, false
			}
			idx, path = i, path[end+1:]
		default:
			path = strings.TrimPrefix(path, ".")
			end := strings.IndexAny(path, ".[")
			if end < 0 {
				end = len(path)
			}
			seg, path = path[:end], path[end:]
		}
		next := child(n, seg, idx)
		if next == nil {
			return n, false
		}
		n = next
	}
	return n, true
}

func child(n *yaml.Node, key string, idx int) *yaml.Node {
	if idx >= 0 {
		if n.Kind == yaml.SequenceNode && idx < len(n.Content) {
			return n.Content[idx]
		}
		return nil
	}
	if n.Kind != yaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == key {
			return n.Content[i+1]
		}
	}
	return nil
}
