package nodeport

import (
	"net/netip"
	"testing"

	"github.com/weirnet/weir/core/datapath/dptest"
)

// Every member of the NodePort dispatch group, in every mode, passes the
// verifier with each of its programs (one object, load-time constants
// choosing the paths: the verifier explores each choice apart).
func TestDispatchProgramsLoad(t *testing.T) {
	for _, c := range []struct {
		d      Dispatch
		mode   string
		maglev bool
	}{{SNAT, ModeSNAT, false}, {SNAT, ModeSNAT, true}, {DSROption, ModeDSR, false}, {DSROption, ModeHybrid, true},
		{DSRIPIP, ModeDSR, true}, {DSRIPIP, ModeHybrid, false}} {
		s := DefaultSettingsFor(c.d)
		s.Mode, s.Maglev = c.mode, c.maglev
		if err := s.Validate(); err != nil {
			t.Fatal(err)
		}
		spec, err := ObjectSpec(s, netip.MustParseAddr("192.0.2.1"), []netip.Addr{netip.MustParseAddr("192.0.2.1")})
		if err != nil {
			t.Fatal(err)
		}
		dp := dptest.Open(t)
		for name := range spec.Programs {
			one := spec.Copy()
			for other := range one.Programs {
				if other != name {
					delete(one.Programs, other)
				}
			}
			coll, err := dp.LoadObject("nodeport", one)
			if err != nil {
				t.Errorf("dispatch %d mode %s: program %s: %v", c.d, c.mode, name, shortErr(err))
				continue
			}
			coll.Close()
		}
	}
}

func shortErr(err error) string {
	s := err.Error()
	if len(s) > 600 {
		return s[:300] + " ... " + s[len(s)-300:]
	}
	return s
}
