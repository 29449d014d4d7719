package nodeport

import (
	"bytes"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/weirnet/weir/core/model"
)

// A NodePort outside nodePortRange is not served from outside, and the
// agent says so once per change, not on every delta.
func TestNodePortsOutsideTheRangeAreReported(t *testing.T) {
	s := DefaultSettings()
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	m := &Module{s: s, log: slog.New(slog.NewTextHandler(&buf, nil))}
	c := m.outOfRange()
	name := model.ServiceName{Namespace: "default", Name: "web"}
	svc := func(port uint16) *model.Service {
		return &model.Service{Name: name, Frontends: []model.Frontend{
			{Addr: netip.AddrPortFrom(netip.IPv4Unspecified(), port), Proto: model.TCP, Type: model.NodePort},
			{Addr: netip.MustParseAddrPort("10.96.0.10:80"), Proto: model.TCP, Type: model.ClusterIP},
		}}
	}
	apply := func(s *model.Service) {
		if err := c.apply(model.Delta{Services: map[model.ServiceName]*model.Service{name: s}}); err != nil {
			t.Fatal(err)
		}
	}
	apply(svc(30080))
	if buf.Len() != 0 {
		t.Fatalf("a NodePort inside the range was reported: %s", buf.String())
	}
	apply(svc(40000))
	apply(svc(40000))
	if n := strings.Count(buf.String(), "not served from outside"); n != 1 || !strings.Contains(buf.String(), "0.0.0.0:40000/TCP") ||
		!strings.Contains(buf.String(), "nodePortRange=30000-32767") {
		t.Fatalf("reported %d times:\n%s", n, buf.String())
	}
}

func TestSettings(t *testing.T) {
	cases := map[string]struct {
		s    Settings
		want string
	}{
		"defaults":           {*DefaultSettings(), ""},
		"range not parsed":   {Settings{NodePortRange: "30000", SNATPortRange: DefaultSNATPortRange}, `nodePortRange: "30000" is not a port range such as 30000-32767`},
		"port 0":             {Settings{NodePortRange: DefaultNodePortRange, SNATPortRange: "0-100"}, `snatPortRange: "0-100" is not a port range such as 30000-32767 (ports 1 to 65535)`},
		"address not IPv4":   {Settings{NodePortRange: DefaultNodePortRange, SNATPortRange: DefaultSNATPortRange, Addresses: []string{"192.0.2.1", "2001:db8::1"}}, `addresses[1]: "2001:db8::1" is not a unicast IPv4 address`},
		"too many addresses": {Settings{NodePortRange: DefaultNodePortRange, SNATPortRange: DefaultSNATPortRange, Addresses: strings.Split("1.1.1.1,1.1.1.2,1.1.1.3,1.1.1.4,1.1.1.5,1.1.1.6,1.1.1.7,1.1.1.8,1.1.1.9", ",")}, "addresses: 9 addresses; at most 8"},
	}
	for name, c := range cases {
		err := c.s.Validate()
		got := ""
		if err != nil {
			got = err.Error()
		}
		if got != c.want {
			t.Errorf("%s: %q, want %q", name, got, c.want)
		}
	}
}
