// Package portrange is a range of ports as settings write it ("min-max"),
// shared by the modules that serve or hand out ports on the node's
// addresses, so that config can check their ranges against each other.
package portrange

import (
	"fmt"
	"strconv"
	"strings"
)

// Range is an inclusive range of ports.
type Range struct{ Min, Max uint16 }

func (r Range) String() string { return fmt.Sprintf("%d-%d", r.Min, r.Max) }

// Overlaps reports whether two ranges share a port.
func (r Range) Overlaps(o Range) bool { return r.Min <= o.Max && o.Min <= r.Max }

// Contains reports whether p is in the range.
func (r Range) Contains(p uint16) bool { return p >= r.Min && p <= r.Max }

// Size is how many ports the range holds.
func (r Range) Size() int { return int(r.Max) - int(r.Min) + 1 }

// Parse reads "min-max" (ports 1 to 65535, min ≤ max).
func Parse(s string) (Range, error) {
	lo, hi, ok := strings.Cut(s, "-")
	if !ok {
		return Range{}, fmt.Errorf("%q is not a port range such as 30000-32767", s)
	}
	a, err1 := strconv.ParseUint(strings.TrimSpace(lo), 10, 16)
	b, err2 := strconv.ParseUint(strings.TrimSpace(hi), 10, 16)
	if err1 != nil || err2 != nil || a == 0 || b == 0 {
		return Range{}, fmt.Errorf("%q is not a port range such as 30000-32767 (ports 1 to 65535)", s)
	}
	if a > b {
		return Range{}, fmt.Errorf("%q starts above its end", s)
	}
	return Range{uint16(a), uint16(b)}, nil
}

// Use is what a module does with a range of ports on the node's addresses.
type Use int

// Uses of a range.
const (
	// Serve: the node answers on these ports (NodePorts).
	Serve Use = iota
	// Translate: translated flows get their source port from here
	// (SNAT). Two such ranges may overlap (the NAT map keeps every tuple
	// unique); a served range must not, or a reply to a translated flow
	// would be taken for a request to a service.
	Translate
)

// Named is a module's range as its settings name it.
type Named struct {
	// Field is the setting's name in the module's section.
	Field string
	Use   Use
	Range Range
}

// Holder is implemented by the settings of modules that serve or hand
// out ports on the node's addresses.
type Holder interface {
	PortRanges() []Named
}

// Clash is two ranges that may not overlap.
type Clash struct {
	A, B       Named
	ModA, ModB string
}

// Clashes lists the served ranges that overlap a translating one, over the
// settings of the modules one node runs (module name -> ranges), in the
// order of names.
func Clashes(names []string, ranges map[string][]Named) []Clash {
	var out []Clash
	for i, ma := range names {
		for _, mb := range names[i:] {
			for _, a := range ranges[ma] {
				for _, b := range ranges[mb] {
					if ma == mb && a.Field >= b.Field {
						continue // each pair of one module's ranges once
					}
					if a.Use == b.Use || !a.Range.Overlaps(b.Range) {
						continue
					}
					out = append(out, Clash{A: a, B: b, ModA: ma, ModB: mb})
				}
			}
		}
	}
	return out
}
