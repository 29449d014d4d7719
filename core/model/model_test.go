package model_test

import (
	"net/netip"
	"testing"

	"github.com/weirnet/weir/core/model"
)

func name(s string) model.ServiceName {
	for i := range len(s) {
		if s[i] == '/' {
			return model.ServiceName{Namespace: s[:i], Name: s[i+1:]}
		}
	}
	return model.ServiceName{Namespace: "default", Name: s}
}

// fe is a ClusterIP frontend at addr ("ip:port") with backends
// ("ip:port").
func fe(addr string, proto model.Proto, bes ...string) model.Frontend {
	f := model.Frontend{Addr: netip.MustParseAddrPort(addr), Proto: proto, Type: model.ClusterIP}
	for _, b := range bes {
		f.Backends = append(f.Backends, model.Backend{Addr: netip.MustParseAddrPort(b)})
	}
	return f
}

func svc(n string, fes ...model.Frontend) *model.Service {
	return &model.Service{Name: name(n), Frontends: fes}
}

func TestParseProto(t *testing.T) {
	for in, want := range map[string]model.Proto{
		"": model.TCP, "TCP": model.TCP, "tcp": model.TCP,
		"UDP": model.UDP, "Udp": model.UDP, "SCTP": model.SCTP, "sctp": model.SCTP,
	} {
		if got, err := model.ParseProto(in); got != want || err != nil {
			t.Errorf("ParseProto(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for in, want := range map[string]string{
		"ICMP": `"ICMP" is not a protocol; allowed: TCP, UDP, SCTP`,
		"6":    `"6" is not a protocol; allowed: TCP, UDP, SCTP`,
		" TCP": `" TCP" is not a protocol; allowed: TCP, UDP, SCTP`,
	} {
		if got, err := model.ParseProto(in); err == nil || err.Error() != want || got != 0 {
			t.Errorf("ParseProto(%q) = %v, %v; want error %q", in, got, err, want)
		}
	}
}

func TestStrings(t *testing.T) {
	for _, c := range []struct{ got, want string }{
		{model.TCP.String(), "TCP"},
		{model.UDP.String(), "UDP"},
		{model.SCTP.String(), "SCTP"},
		{model.Proto(1).String(), "proto-1"},
		{model.ClusterIP.String(), "ClusterIP"},
		{model.NodePort.String(), "NodePort"},
		{model.LoadBalancer.String(), "LoadBalancer"},
		{model.ExternalIP.String(), "ExternalIP"},
		{model.FrontendType(9).String(), "type-9"},
		{model.Active.String(), "active"},
		{model.Terminating.String(), "terminating"},
		{name("kube-system/dns").String(), "kube-system/dns"},
		{fe("10.96.0.10:53", model.UDP).Key().String(), "10.96.0.10:53/UDP"},
	} {
		if c.got != c.want {
			t.Errorf("got %q, want %q", c.got, c.want)
		}
	}
}

func TestValidate(t *testing.T) {
	ok := fe("10.96.0.10:80", model.TCP, "10.244.1.11:8080")
	cases := []struct {
		name string
		svc  *model.Service
		want string // "" for valid
	}{
		{name: "valid", svc: svc("web", ok, fe("10.96.0.10:80", model.UDP), fe("10.96.0.10:443", model.UDP, "10.244.1.11:443"))},
		{name: "no frontends", svc: svc("web")},
		{name: "no name", svc: &model.Service{Frontends: []model.Frontend{ok}}, want: "service has no name"},
		{
			name: "IPv6 frontend",
			svc:  svc("web", ok, fe("[fd00::10]:80", model.TCP)),
			want: "service default/web: frontend 1: address fd00::10 is not IPv4 (only IPv4 is supported)",
		},
		{
			name: "IPv4-mapped IPv6 frontend",
			svc:  svc("web", fe("[::ffff:10.96.0.10]:80", model.TCP)),
			want: "service default/web: frontend 0: address ::ffff:10.96.0.10 is not IPv4 (only IPv4 is supported)",
		},
		{
			name: "frontend without address",
			svc:  &model.Service{Name: name("web"), Frontends: []model.Frontend{{Proto: model.TCP, Type: model.ClusterIP}}},
			want: "service default/web: frontend 0: address invalid IP is not IPv4 (only IPv4 is supported)",
		},
		{
			name: "backend listed twice",
			svc:  svc("web", fe("10.96.0.10:80", model.TCP, "10.244.1.11:8080", "10.244.1.11:8080")),
			want: "service default/web: frontend 0: 10.96.0.10:80: backend 10.244.1.11:8080 is listed twice",
		},
		{
			name: "loopback backend",
			svc:  svc("web", fe("10.96.0.10:80", model.TCP, "127.0.0.1:8080")),
			want: "service default/web: frontend 0: 10.96.0.10:80: 127.0.0.1 cannot be a backend address",
		},
		{
			name: "frontend port 0",
			svc:  svc("web", fe("10.96.0.10:0", model.TCP)),
			want: "service default/web: frontend 0: 10.96.0.10:0: port 0 is not allowed (1-65535)",
		},
		{
			name: "backend port 0",
			svc:  svc("web", fe("10.96.0.10:80", model.TCP, "10.244.1.11:8080", "10.244.1.12:0")),
			want: "service default/web: frontend 0: 10.96.0.10:80: backend 10.244.1.12: port 0 is not allowed (1-65535)",
		},
		{
			name: "IPv6 backend",
			svc:  svc("web", fe("10.96.0.10:80", model.TCP, "[fd00::12]:8080")),
			want: "service default/web: frontend 0: 10.96.0.10:80: backend address fd00::12 is not IPv4",
		},
		{
			name: "bad protocol",
			svc:  svc("web", fe("10.96.0.10:80", model.Proto(1))),
			want: "service default/web: frontend 0: 10.96.0.10:80: protocol proto-1 is not served: the datapath translates TCP and UDP only",
		},
		{
			name: "SCTP is not served",
			svc:  svc("web", fe("10.96.0.10:80", model.SCTP)),
			want: "service default/web: frontend 0: 10.96.0.10:80: SCTP is not served: the datapath translates TCP and UDP only (SCTP would need its CRC32c checksum recomputed)",
		},
		{
			name: "broadcast frontend",
			svc:  svc("web", fe("255.255.255.255:80", model.TCP)),
			want: "service default/web: frontend 0: 255.255.255.255 is the broadcast address and cannot be a service address",
		},
		{
			name: "multicast frontend",
			svc:  svc("web", fe("239.1.1.1:80", model.UDP)),
			want: "service default/web: frontend 0: 239.1.1.1 is a multicast address and cannot be a service address",
		},
		{
			name: "unset protocol",
			svc:  svc("web", fe("10.96.0.10:80", 0)),
			want: "service default/web: frontend 0: 10.96.0.10:80: protocol proto-0 is not served: the datapath translates TCP and UDP only",
		},
		{
			name: "unset type",
			svc:  &model.Service{Name: name("web"), Frontends: []model.Frontend{{Addr: netip.MustParseAddrPort("10.96.0.10:80"), Proto: model.TCP}}},
			want: "service default/web: frontend 0: 10.96.0.10:80: unknown frontend type 0",
		},
		{
			name: "duplicate frontend",
			svc:  svc("kube-system/dns", fe("10.96.0.10:53", model.UDP), ok, fe("10.96.0.10:53", model.UDP, "10.244.1.11:53")),
			want: "service kube-system/dns: frontend 10.96.0.10:53/UDP is listed twice",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.svc.Validate()
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("Validate: %v; want nil", err)
			case tc.want != "" && (err == nil || err.Error() != tc.want):
				t.Errorf("Validate:\n got %v\nwant %s", err, tc.want)
			}
		})
	}
}

func TestSnapshotFrontends(t *testing.T) {
	a := svc("default/a",
		fe("10.96.0.1:80", model.UDP),
		fe("10.96.0.10:1", model.TCP),
		fe("10.96.0.1:80", model.TCP),
	)
	b := svc("default/b",
		fe("10.96.0.2:80", model.TCP),
		fe("10.96.0.1:443", model.SCTP),
	)
	snap := &model.Snapshot{Services: []*model.Service{a, b}}
	got := snap.Frontends()
	// By address (numerically: .2 before .10), then port (numerically: 80
	// before 443), then protocol number (TCP 6 before UDP 17).
	want := []struct {
		svc *model.Service
		fe  *model.Frontend
	}{
		{a, &a.Frontends[2]}, // 10.96.0.1:80/TCP
		{a, &a.Frontends[0]}, // 10.96.0.1:80/UDP
		{b, &b.Frontends[1]}, // 10.96.0.1:443/SCTP
		{b, &b.Frontends[0]}, // 10.96.0.2:80/TCP
		{a, &a.Frontends[1]}, // 10.96.0.10:1/TCP
	}
	if len(got) != len(want) {
		t.Fatalf("got %d frontends, want %d", len(got), len(want))
	}
	for i, w := range want {
		if got[i].Service != w.svc || got[i].Frontend != w.fe {
			t.Errorf("frontends[%d] = %s %s; want %s %s (pointers into the service)",
				i, got[i].Service.Name, got[i].Frontend.Key(), w.svc.Name, w.fe.Key())
		}
	}
	if got := (&model.Snapshot{}).Frontends(); len(got) != 0 {
		t.Errorf("empty snapshot has %d frontends", len(got))
	}
}
