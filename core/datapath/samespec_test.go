package datapath_test

import (
	"testing"

	"github.com/cilium/ebpf"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/node"
	"github.com/weirnet/weir/modules/tunnel"
)

// Two loads of one object with the same constants are the same spec (a
// module set applied live keeps its loaded object); another constant
// makes another object.
func TestSameSpec(t *testing.T) {
	load := func(port int) *ebpf.CollectionSpec {
		t.Helper()
		s := tunnel.DefaultSettings()
		s.Port = port
		if err := s.Validate(); err != nil {
			t.Fatal(err)
		}
		spec, err := tunnel.ObjectSpec(s, node.Uplink{Name: "lo", Index: 1, MTU: 65536, IP: bSelf})
		if err != nil {
			t.Fatal(err)
		}
		return spec
	}
	if !datapath.SameSpec(load(8472), load(8472)) {
		t.Fatal("two loads of the same object differ")
	}
	if datapath.SameSpec(load(8472), load(4789)) {
		t.Fatal("objects with different constants look the same")
	}
}
