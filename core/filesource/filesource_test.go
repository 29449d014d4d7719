package filesource_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/weirnet/weir/core/filesource"
	"github.com/weirnet/weir/core/lbmap"
	"github.com/weirnet/weir/core/model"
)

// lines joins lines into a document, so that a case's line numbers are
// the 1-based positions in the list.
func lines(l ...string) string { return strings.Join(l, "\n") + "\n" }

// base is a valid one-service file; cases replace single lines of it so
// their line numbers stay those written here.
var base = []string{
	/* 1 */ "services:",
	/* 2 */ "  - name: web",
	/* 3 */ "    namespace: default",
	/* 4 */ "    clusterIP: 10.96.0.10",
	/* 5 */ "    ports:",
	/* 6 */ "      - name: http",
	/* 7 */ "        port: 80",
	/* 8 */ "        targetPort: 8080",
	/* 9 */ "        protocol: TCP",
	/* 10 */ "    backends:",
	/* 11 */ "      - ip: 10.244.1.11",
	/* 12 */ "      - ip: 10.244.1.12",
}

// with returns base with the given 1-based lines replaced.
func with(repl map[int]string) string {
	l := append([]string(nil), base...)
	for n, s := range repl {
		l[n-1] = s
	}
	return lines(l...)
}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func backends(state model.BackendState, addrs ...string) []model.Backend {
	var out []model.Backend
	for _, a := range addrs {
		out = append(out, model.Backend{Addr: ap(a), State: state})
	}
	return out
}

// describe renders services for failure messages.
func describe(svcs []*model.Service) string {
	var b strings.Builder
	for _, s := range svcs {
		fmt.Fprintf(&b, "%s affinity=%d\n", s.Name, s.AffinityTimeout)
		for _, f := range s.Frontends {
			fmt.Fprintf(&b, "  %s %s %s name=%q\n", f.Addr, f.Proto, f.Type, f.PortName)
			for _, be := range f.Backends {
				fmt.Fprintf(&b, "    %s %s node=%q\n", be.Addr, be.State, be.NodeName)
			}
		}
	}
	return b.String()
}

func checkServices(t *testing.T, got, want []*model.Service) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Errorf("services:\n%s\nwant:\n%s", describe(got), describe(want))
	}
}

func TestParseExample(t *testing.T) {
	data, err := os.ReadFile("../../examples/services.yaml")
	if err != nil {
		t.Fatal(err)
	}
	got, err := filesource.Parse("examples/services.yaml", data)
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	want := []*model.Service{
		{
			Name: model.ServiceName{Namespace: "default", Name: "web"},
			Frontends: []model.Frontend{
				{
					Addr: ap("10.96.0.10:80"), Proto: model.TCP, Type: model.ClusterIP, PortName: "http",
					Backends: backends(model.Active, "10.244.1.11:8080", "10.244.2.11:8080", "10.244.3.11:8080"),
				},
				{
					// No targetPort: the backends serve the port itself.
					Addr: ap("10.96.0.10:9000"), Proto: model.TCP, Type: model.ClusterIP, PortName: "echo",
					Backends: backends(model.Active, "10.244.1.11:9000", "10.244.2.11:9000", "10.244.3.11:9000"),
				},
			},
		},
		{
			Name: model.ServiceName{Namespace: "default", Name: "dns"},
			Frontends: []model.Frontend{
				{
					Addr: ap("10.96.0.53:53"), Proto: model.UDP, Type: model.ClusterIP, PortName: "dns",
					Backends: backends(model.Active, "10.244.1.11:5353", "10.244.2.11:5353", "10.244.3.11:5353"),
				},
			},
		},
	}
	checkServices(t, got, want)
	for _, s := range got {
		if err := s.Validate(); err != nil {
			t.Errorf("parsed service %s does not validate: %v", s.Name, err)
		}
	}
}

func TestParseDefaultsAndTerminating(t *testing.T) {
	doc := lines(
		"services:",
		"  - name: web", // no namespace: default
		"    clusterIP: 10.96.0.10",
		"    ports:",
		"      - port: 443", // the only port needs no name; TCP; targetPort = port
		"    backends:",
		"      - ip: 10.244.1.11",
		"        nodeName: node-a",
		"      - ip: 10.244.1.12",
		"        terminating: true",
		"        nodeName: node-b",
		"      - ip: 10.244.1.13",
		"        terminating: false",
		"  - name: web", // the same name in another namespace is another service
		"    namespace: other",
		"    clusterIP: 10.96.0.11",
		"    ports:",
		"      - name: dns-udp",
		"        port: 53",
		"        protocol: udp", // protocol names are case-insensitive
		"      - name: dns-tcp",
		"        port: 53", // the same port with another protocol is another frontend
		"        protocol: TCP",
		"      - name: dns-alt",
		"        port: 5353",
		"        targetPort: 0", // 0 means the port itself
		"        protocol: UDP",
	)
	got, err := filesource.Parse("svc.yaml", []byte(doc))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	want := []*model.Service{
		{
			Name: model.ServiceName{Namespace: "default", Name: "web"},
			Frontends: []model.Frontend{{
				Addr: ap("10.96.0.10:443"), Proto: model.TCP, Type: model.ClusterIP,
				Backends: []model.Backend{
					{Addr: ap("10.244.1.11:443"), State: model.Active, NodeName: "node-a"},
					{Addr: ap("10.244.1.12:443"), State: model.Terminating, NodeName: "node-b"},
					{Addr: ap("10.244.1.13:443"), State: model.Active},
				},
			}},
		},
		{
			Name: model.ServiceName{Namespace: "other", Name: "web"},
			Frontends: []model.Frontend{
				{Addr: ap("10.96.0.11:53"), Proto: model.UDP, Type: model.ClusterIP, PortName: "dns-udp"},
				{Addr: ap("10.96.0.11:53"), Proto: model.TCP, Type: model.ClusterIP, PortName: "dns-tcp"},
				{Addr: ap("10.96.0.11:5353"), Proto: model.UDP, Type: model.ClusterIP, PortName: "dns-alt"},
			},
		},
	}
	checkServices(t, got, want)
}

// Topology hints ride with each backend, as an EndpointSlice's do.
func TestParseTopologyHints(t *testing.T) {
	doc := lines(
		"services:",
		"  - name: web",
		"    clusterIP: 10.96.0.10",
		"    ports:",
		"      - port: 80",
		"    backends:",
		"      - ip: 10.244.1.11",
		"        forZones: [zone-a]",
		"      - ip: 10.244.2.11",
		"        forZones: [zone-b, zone-c]",
		"        forNodes: [node-b]",
		"      - ip: 10.244.2.12",
	)
	got, err := filesource.Parse("svc.yaml", []byte(doc))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	want := []*model.Backend{
		{Addr: ap("10.244.1.11:80"), Hints: &model.Hints{Zones: []string{"zone-a"}}},
		{Addr: ap("10.244.2.11:80"), Hints: &model.Hints{Zones: []string{"zone-b", "zone-c"}, Nodes: []string{"node-b"}}},
		{Addr: ap("10.244.2.12:80")},
	}
	bes := got[0].Frontends[0].Backends
	if len(bes) != len(want) {
		t.Fatalf("%d backends, want %d", len(bes), len(want))
	}
	for i, w := range want {
		if !bes[i].Equal(*w) {
			t.Errorf("backend %d: %+v (hints %+v), want %+v (hints %+v)", i, bes[i], bes[i].Hints, *w, w.Hints)
		}
	}
}

// NodePort and LoadBalancer services are served on their node ports,
// load-balancer IPs and external IPs too, with the ClusterIP's backends
// and the external traffic policy on every external-facing frontend.
func TestParseExternalFrontends(t *testing.T) {
	got, err := filesource.Parse("svc.yaml", []byte(lines(
		"services:",
		"  - name: web",
		"    clusterIP: 10.96.0.10",
		"    type: LoadBalancer",
		"    externalTrafficPolicy: Local",
		"    loadBalancerIPs: [198.51.100.10]",
		"    externalIPs: [203.0.113.7]",
		"    ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]",
		"    backends: [{ip: 10.244.1.11, nodeName: n1}]",
	)))
	if err != nil {
		t.Fatal(err)
	}
	var fronts []string
	for _, f := range got[0].Frontends {
		fronts = append(fronts, fmt.Sprintf("%s %s local=%v -> %v", f.Type, f.Key(), f.ExternalLocal, f.Backends[0].Addr))
	}
	want := []string{
		"ClusterIP 10.96.0.10:80/TCP local=false -> 10.244.1.11:8080",
		"ExternalIP 203.0.113.7:80/TCP local=true -> 10.244.1.11:8080",
		"LoadBalancer 198.51.100.10:80/TCP local=true -> 10.244.1.11:8080",
		"NodePort 0.0.0.0:30080/TCP local=true -> 10.244.1.11:8080",
	}
	if !slices.Equal(fronts, want) {
		t.Errorf("frontends:\n got %q\nwant %q", fronts, want)
	}
}

func TestParseEmpty(t *testing.T) {
	for _, doc := range []string{"services:\n", "services: []\n"} {
		got, err := filesource.Parse("svc.yaml", []byte(doc))
		if err != nil || len(got) != 0 {
			t.Errorf("Parse(%q) = %s, %v; want no services and no error", doc, describe(got), err)
		}
	}
	// An empty document is more likely a write caught half-way than a
	// wish to delete everything.
	for _, doc := range []string{"", "# nothing yet\n"} {
		_, err := filesource.Parse("svc.yaml", []byte(doc))
		want := `svc.yaml: the file is empty; to remove every service write "services: []"`
		if err == nil || err.Error() != want {
			t.Errorf("Parse(%q) error = %v; want %s", doc, err, want)
		}
	}
}

func TestParseErrors(t *testing.T) {
	cases := []struct {
		name string
		doc  string
		want string
	}{
		{
			name: "malformed YAML: unclosed flow list",
			doc: lines(
				"services:",
				"  - name: web",
				"    clusterIP: 10.96.0.10",
				"    ports: [80",
			),
			want: "svc.yaml:4: not valid YAML: did not find expected ',' or ']'",
		},
		{
			// The mistake is on line 3; yaml.v3 reports where the list
			// it was parsing starts (see the report).
			name: "malformed YAML: key outdented out of its list item",
			doc: lines(
				"services:",
				"  - name: web",
				"  clusterIP: 10.96.0.10",
			),
			want: "svc.yaml:2: not valid YAML: did not find expected '-' indicator",
		},
		{
			name: "empty zone hint",
			doc:  with(map[int]string{12: "      - {ip: 10.244.1.12, forZones: [zone-a, \"\"]}"}),
			want: `svc.yaml:12:46: services[0].backends[1].forZones[1]: the name is empty: give a zone (forZones) or node (forNodes) name`,
		},
		{
			name: "node hint listed twice",
			doc:  with(map[int]string{12: "      - {ip: 10.244.1.12, forNodes: [n1, n1]}"}),
			want: `svc.yaml:12:42: services[0].backends[1].forNodes[1]: n1 is already listed as forNodes[0]`,
		},
		{
			name: "unknown top-level field",
			doc:  lines("service:", "  - name: web"),
			want: `svc.yaml:1:1: unknown field "service"; allowed fields: nodes, services`,
		},
		{
			name: "unknown service field",
			doc:  with(map[int]string{4: "    clusterIp: 10.96.0.10"}),
			want: `svc.yaml:4:5: services[0]: unknown field "clusterIp"; allowed fields: backends, clusterIP, externalIPs, externalTrafficPolicy, forwardingMode, healthCheckNodePort, loadBalancerIPs, loadBalancerSourceRanges, name, namespace, ports, type`,
		},
		{
			name: "unknown port field",
			doc:  with(map[int]string{9: "        proto: TCP"}),
			want: `svc.yaml:9:9: services[0].ports[0]: unknown field "proto"; allowed fields: name, nodePort, port, protocol, targetPort`,
		},
		{
			name: "unknown backend field",
			doc:  with(map[int]string{12: "      - address: 10.244.1.12"}),
			want: `svc.yaml:12:9: services[0].backends[1]: unknown field "address"; allowed fields: forNodes, forZones, ip, nodeName, terminating`,
		},
		{
			name: "duplicate key",
			doc:  with(map[int]string{3: "    clusterIP: 10.96.0.11"}),
			want: `svc.yaml:4:5: services[0]: duplicate key "clusterIP" (first at line 3)`,
		},
		{
			name: "clusterIP octet out of range",
			doc:  with(map[int]string{4: "    clusterIP: 10.96.0.300"}),
			want: `svc.yaml:4:16: services[0].clusterIP: "10.96.0.300" is not an IPv4 address`,
		},
		{
			name: "IPv6 clusterIP",
			doc:  with(map[int]string{4: "    clusterIP: fd00::10"}),
			want: `svc.yaml:4:16: services[0].clusterIP: "fd00::10" is not an IPv4 address`,
		},
		{
			name: "IPv4-mapped IPv6 clusterIP",
			doc:  with(map[int]string{4: `    clusterIP: "::ffff:10.96.0.10"`}),
			want: `svc.yaml:4:16: services[0].clusterIP: "::ffff:10.96.0.10" is not an IPv4 address`,
		},
		{
			name: "loopback clusterIP",
			doc:  with(map[int]string{4: "    clusterIP: 127.0.0.1"}),
			want: `svc.yaml:4:16: services[0].clusterIP: 127.0.0.1 cannot be a service address (loopback and link-local addresses stay on their host)`,
		},
		{
			name: "broadcast clusterIP",
			doc:  with(map[int]string{4: "    clusterIP: 255.255.255.255"}),
			want: `svc.yaml:4:16: services[0].clusterIP: 255.255.255.255 is the broadcast address and cannot be a service address`,
		},
		{
			name: "link-local clusterIP",
			doc:  with(map[int]string{4: "    clusterIP: 169.254.1.1"}),
			want: `svc.yaml:4:16: services[0].clusterIP: 169.254.1.1 cannot be a service address (loopback and link-local addresses stay on their host)`,
		},
		{
			name: "multicast clusterIP",
			doc:  with(map[int]string{4: "    clusterIP: 224.0.0.1"}),
			want: `svc.yaml:4:16: services[0].clusterIP: 224.0.0.1 is a multicast address and cannot be a service address`,
		},
		{
			// An empty value: the message quotes "" (see the report).
			name: "empty clusterIP",
			doc:  with(map[int]string{4: "    clusterIP:"}),
			want: `svc.yaml:4:15: services[0].clusterIP: "" is not an IPv4 address`,
		},
		{
			name: "port 0",
			doc:  with(map[int]string{7: "        port: 0"}),
			want: "svc.yaml:7:15: services[0].ports[0].port: 0 is not a valid port (1 to 65535)",
		},
		{
			name: "port 70000",
			doc:  with(map[int]string{7: "        port: 70000"}),
			want: "svc.yaml:7:15: services[0].ports[0].port: 70000 is not a valid port (1 to 65535)",
		},
		{
			name: "negative port",
			doc:  with(map[int]string{7: "        port: -80"}),
			want: "svc.yaml:7:15: services[0].ports[0].port: -80 is not a valid port (1 to 65535)",
		},
		{
			name: "port is a name",
			doc:  with(map[int]string{7: "        port: http"}),
			want: `svc.yaml:7:15: services[0].ports[0].port: "http" is not an integer`,
		},
		{
			// The port is missing, yet the message says 0 (see the report);
			// the position is that of the port's entry.
			name: "port missing",
			doc:  with(map[int]string{7: "        # no port"}),
			want: "svc.yaml:6:9: services[0].ports[0].port: missing: every port needs a port number (1 to 65535)",
		},
		{
			name: "targetPort 70000",
			doc:  with(map[int]string{8: "        targetPort: 70000"}),
			want: "svc.yaml:8:21: services[0].ports[0].targetPort: 70000 is not a valid port (1 to 65535)",
		},
		{
			name: "protocol SCTP",
			doc:  with(map[int]string{9: "        protocol: SCTP"}),
			want: `svc.yaml:9:19: services[0].ports[0].protocol: SCTP is not served: the datapath translates TCP and UDP only (SCTP would need its CRC32c checksum recomputed); allowed: TCP, UDP`,
		},
		{
			name: "protocol ICMP",
			doc:  with(map[int]string{9: "        protocol: ICMP"}),
			want: `svc.yaml:9:19: services[0].ports[0].protocol: "ICMP" is not a protocol; allowed: TCP, UDP, SCTP`,
		},
		{
			name: "backend IP with three octets",
			doc:  with(map[int]string{11: "      - ip: 10.244.1"}),
			want: `svc.yaml:11:13: services[0].backends[0].ip: "10.244.1" is not an IPv4 address`,
		},
		{
			name: "IPv6 backend",
			doc:  with(map[int]string{12: "      - ip: fd00::12"}),
			want: `svc.yaml:12:13: services[0].backends[1].ip: "fd00::12" is not an IPv4 address`,
		},
		{
			name: "unspecified backend",
			doc:  with(map[int]string{12: "      - ip: 0.0.0.0"}),
			want: `svc.yaml:12:13: services[0].backends[1].ip: 0.0.0.0 cannot be a backend address`,
		},
		{
			name: "duplicate backend",
			doc:  with(map[int]string{12: "      - ip: 10.244.1.11"}),
			want: `svc.yaml:12:13: services[0].backends[1].ip: backend 10.244.1.11 is already listed as backends[0]`,
		},
		{
			name: "terminating is not a boolean",
			doc:  with(map[int]string{12: "      - {ip: 10.244.1.12, terminating: yes}"}),
			want: `svc.yaml:12:40: services[0].backends[1].terminating: "yes" is not a boolean; use true or false`,
		},
		{
			name: "service name with upper case",
			doc:  with(map[int]string{2: "  - name: Web"}),
			want: `svc.yaml:2:11: services[0].name: "Web" is not a valid service name (a DNS label: lower-case letters, digits and '-', at most 63)`,
		},
		{
			name: "service name too long",
			doc:  with(map[int]string{2: "  - name: " + strings.Repeat("a", 64)}),
			want: `svc.yaml:2:11: services[0].name: "` + strings.Repeat("a", 64) + `" is not a valid service name (a DNS label: lower-case letters, digits and '-', at most 63)`,
		},
		{
			// No name at all: the message quotes "" and points at the
			// service's first key (see the report).
			name: "service name missing",
			doc:  with(map[int]string{2: "  - # no name"}),
			want: `svc.yaml:3:5: services[0].name: missing: every service needs a name`,
		},
		{
			name: "bad namespace",
			doc:  with(map[int]string{3: "    namespace: Default"}),
			want: `svc.yaml:3:16: services[0].namespace: "Default" is not a valid namespace (a DNS label)`,
		},
		{
			name: "duplicate service name in one namespace",
			doc: lines(
				"services:",
				"  - name: web",
				"    namespace: default",
				"    clusterIP: 10.96.0.10",
				"    ports:",
				"      - port: 80",
				"  - name: web", // namespace defaults to default
				"    clusterIP: 10.96.0.11",
				"    ports:",
				"      - port: 80",
			),
			want: `svc.yaml:7:11: services[1].name: service default/web is already defined by services[0]`,
		},
		{
			name: "two services share a frontend",
			doc: lines(
				"services:",
				"  - name: web",
				"    clusterIP: 10.96.0.10",
				"    ports:",
				"      - port: 80",
				"  - name: api",
				"    clusterIP: 10.96.0.10",
				"    ports:",
				"      - name: http",
				"        port: 80",
				"        targetPort: 8080",
			),
			want: `svc.yaml:9:9: services[1].ports[0]: frontend 10.96.0.10:80/TCP is already used by services[0].ports[0] (default/web)`,
		},
		{
			name: "one service lists a frontend twice",
			doc: lines(
				"services:",
				"  - name: web",
				"    clusterIP: 10.96.0.10",
				"    ports:",
				"      - name: a",
				"        port: 80",
				"      - name: b",
				"        port: 80",
				"        targetPort: 8080",
			),
			want: `svc.yaml:7:9: services[0].ports[1]: frontend 10.96.0.10:80/TCP is already used by services[0].ports[0] (default/web)`,
		},
		{
			name: "two unnamed ports",
			doc: lines(
				"services:",
				"  - name: web",
				"    clusterIP: 10.96.0.10",
				"    ports:",
				"      - port: 80",
				"      - port: 443",
			),
			want: `svc.yaml:5:9: services[0].ports[0].name: ports of a service with several ports need names`,
		},
		{
			name: "second of two ports unnamed",
			doc: lines(
				"services:",
				"  - name: web",
				"    clusterIP: 10.96.0.10",
				"    ports:",
				"      - name: http",
				"        port: 80",
				"      - port: 443",
			),
			want: `svc.yaml:7:9: services[0].ports[1].name: ports of a service with several ports need names`,
		},
		{
			name: "duplicate port name",
			doc: lines(
				"services:",
				"  - name: web",
				"    clusterIP: 10.96.0.10",
				"    ports:",
				"      - name: http",
				"        port: 80",
				"      - name: http",
				"        port: 8080",
			),
			want: `svc.yaml:7:15: services[0].ports[1].name: port name "http" is already used by ports[0]`,
		},
		{
			name: "ports missing",
			doc: lines(
				"services:",
				"  - name: web",
				"    clusterIP: 10.96.0.10",
				"    backends:",
				"      - ip: 10.244.1.11",
			),
			want: `svc.yaml:2:5: services[0].ports: a service needs at least one port`,
		},
		{
			name: "ports empty",
			doc: lines(
				"services:",
				"  - name: web",
				"    clusterIP: 10.96.0.10",
				"    ports: []",
			),
			want: `svc.yaml:4:12: services[0].ports: a service needs at least one port`,
		},
		{
			name: "ports is not a list",
			doc: lines(
				"services:",
				"  - name: web",
				"    clusterIP: 10.96.0.10",
				"    ports: 80",
			),
			want: `svc.yaml:4:12: services[0].ports: expected a sequence, found the scalar "80"`,
		},
		{
			name: "error in a later service names its index",
			doc: lines(
				"services:",
				"  - name: web",
				"    clusterIP: 10.96.0.10",
				"    ports:",
				"      - port: 80",
				"  - name: api",
				"    clusterIP: 10.96.0.11",
				"    ports:",
				"      - port: 80",
				"        protocol: ICMP",
			),
			want: `svc.yaml:10:19: services[1].ports[0].protocol: "ICMP" is not a protocol; allowed: TCP, UDP, SCTP`,
		},
		{
			name: "unknown service type",
			doc:  lines("services:", "  - name: web", "    clusterIP: 10.96.0.10", "    type: ExternalName", "    ports: [{port: 80}]"),
			want: `svc.yaml:4:11: services[0].type: "ExternalName" is not one of ClusterIP, NodePort, LoadBalancer`,
		},
		{
			name: "node port on a ClusterIP service",
			doc:  lines("services:", "  - name: web", "    clusterIP: 10.96.0.10", "    ports: [{port: 80, nodePort: 30080}]"),
			want: `svc.yaml:4:34: services[0].ports[0].nodePort: only services of type NodePort or LoadBalancer have node ports`,
		},
		{
			name: "one node port for two services",
			doc: lines("services:",
				"  - name: web", "    clusterIP: 10.96.0.10", "    type: NodePort", "    ports: [{port: 80, nodePort: 30080}]",
				"  - name: api", "    clusterIP: 10.96.0.11", "    type: NodePort", "    ports: [{port: 80, nodePort: 30080}]"),
			want: `svc.yaml:9:13: services[1].ports[0]: frontend 0.0.0.0:30080/TCP (NodePort) is already used by services[0].ports[0] (default/web)`,
		},
		{
			name: "load-balancer IPs on a NodePort service",
			doc:  lines("services:", "  - name: web", "    clusterIP: 10.96.0.10", "    type: NodePort", "    loadBalancerIPs: [198.51.100.1]", "    ports: [{port: 80}]"),
			want: `svc.yaml:5:22: services[0].loadBalancerIPs: only services of type LoadBalancer have load-balancer IPs`,
		},
		{
			name: "external IP that is not an address",
			doc:  lines("services:", "  - name: web", "    clusterIP: 10.96.0.10", "    externalIPs: [198.51.100.1, nope]", "    ports: [{port: 80}]"),
			want: `svc.yaml:4:33: services[0].externalIPs[1]: "nope" is not an IPv4 address`,
		},
		{
			name: "health check port without externalTrafficPolicy Local",
			doc:  lines("services:", "  - name: web", "    clusterIP: 10.96.0.10", "    type: LoadBalancer", "    healthCheckNodePort: 31000", "    ports: [{port: 80}]"),
			want: `svc.yaml:5:26: services[0].healthCheckNodePort: only NodePort and LoadBalancer services with externalTrafficPolicy Local have a health check port`,
		},
		{
			name: "health check port taken by a node port",
			doc: lines("services:",
				"  - name: web", "    clusterIP: 10.96.0.10", "    type: NodePort", "    ports: [{port: 80, nodePort: 31000}]",
				"  - name: api", "    clusterIP: 10.96.0.11", "    type: LoadBalancer", "    externalTrafficPolicy: Local", "    healthCheckNodePort: 31000", "    ports: [{port: 80}]"),
			want: `svc.yaml:10:26: services[1].healthCheckNodePort: port 31000 is already used by services[0].ports[0] (default/web)`,
		},
		{
			name: "source range that is not a CIDR",
			doc:  lines("services:", "  - name: web", "    clusterIP: 10.96.0.10", "    type: LoadBalancer", "    loadBalancerSourceRanges: [10.0.0.0/8, 10.1.2.3]", "    ports: [{port: 80}]"),
			want: `svc.yaml:5:44: services[0].loadBalancerSourceRanges[1]: "10.1.2.3" is not an IPv4 CIDR such as 203.0.113.0/24`,
		},
		{
			name: "source ranges on a NodePort service",
			doc:  lines("services:", "  - name: web", "    clusterIP: 10.96.0.10", "    type: NodePort", "    loadBalancerSourceRanges: [10.0.0.0/8]", "    ports: [{port: 80}]"),
			want: `svc.yaml:5:31: services[0].loadBalancerSourceRanges: only services of type LoadBalancer have source ranges`,
		},
		{
			name: "unknown forwarding mode",
			doc:  lines("services:", "  - name: web", "    clusterIP: 10.96.0.10", "    forwardingMode: direct", "    ports: [{port: 80}]"),
			want: `svc.yaml:4:21: services[0].forwardingMode: "direct" is not one of snat, dsr, hybrid`,
		},
		{
			name: "unknown traffic policy",
			doc:  lines("services:", "  - name: web", "    clusterIP: 10.96.0.10", "    externalTrafficPolicy: Nearest", "    ports: [{port: 80}]"),
			want: `svc.yaml:4:28: services[0].externalTrafficPolicy: "Nearest" is not one of Cluster, Local`,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := filesource.Parse("svc.yaml", []byte(tc.doc))
			if err == nil {
				t.Fatalf("Parse succeeded with:\n%s\nwant error %q", describe(got), tc.want)
			}
			if err.Error() != tc.want {
				t.Errorf("error:\n got %s\nwant %s", err, tc.want)
			}
			if got != nil {
				t.Errorf("Parse returned services with its error:\n%s", describe(got))
			}
		})
	}
}

// Source tests.

const webV1 = `services:
  - name: web
    clusterIP: 10.96.0.10
    ports:
      - port: 80
        targetPort: 8080
    backends:
      - ip: 10.244.1.11
`

const webAndDNS = `services:
  - name: web
    clusterIP: 10.96.0.10
    ports:
      - port: 80
        targetPort: 8080
    backends:
      - ip: 10.244.1.11
  - name: dns
    namespace: kube-system
    clusterIP: 10.96.0.53
    ports:
      - port: 53
        protocol: UDP
    backends:
      - ip: 10.244.1.20
`

// webInvalid fails on line 5: port 0.
const webInvalid = `services:
  - name: web
    clusterIP: 10.96.0.10
    ports:
      - port: 0
`

const webOnly8081 = `services:
  - name: web
    clusterIP: 10.96.0.10
    ports:
      - port: 80
        targetPort: 8081
    backends:
      - ip: 10.244.1.11
      - ip: 10.244.1.12
        terminating: true
`

// summary renders a snapshot compactly: one line per frontend.
func summary(s *model.Snapshot) string {
	var out []string
	for _, svc := range s.Services {
		for _, f := range svc.Frontends {
			var bes []string
			for _, b := range f.Backends {
				bes = append(bes, b.Addr.String()+"/"+b.State.String())
			}
			out = append(out, fmt.Sprintf("%s %s/%s -> %s", svc.Name, f.Addr, f.Proto, strings.Join(bes, ",")))
		}
	}
	return strings.Join(out, "\n")
}

const (
	sumWebV1 = "default/web 10.96.0.10:80/TCP -> 10.244.1.11:8080/active"
	sumBoth  = "default/web 10.96.0.10:80/TCP -> 10.244.1.11:8080/active\n" +
		"kube-system/dns 10.96.0.53:53/UDP -> 10.244.1.20:53/active"
	sumWeb8081 = "default/web 10.96.0.10:80/TCP -> 10.244.1.11:8081/active,10.244.1.12:8081/terminating"
)

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// replace writes content to a temporary file next to path and renames it
// over path, as editors and config management tools do.
func replace(t *testing.T, path, content string) {
	t.Helper()
	tmp := filepath.Join(filepath.Dir(path), ".services.yaml.tmp")
	write(t, tmp, content)
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func TestLoad(t *testing.T) {
	path := filepath.Join(t.TempDir(), "services.yaml")
	write(t, path, webV1)
	store := model.NewStore()
	store.Expect(filesource.Name)
	src := filesource.New(path, store, slog.New(slog.DiscardHandler))

	if _, _, auth := store.Snapshot(); auth {
		t.Fatal("snapshot authoritative before the file source loaded")
	}
	if err := src.Load(); err != nil {
		t.Fatalf("Load: %v", err)
	}
	snap, ver, auth := store.Snapshot()
	if got := summary(snap); got != sumWebV1 || ver != 1 || !auth {
		t.Fatalf("after Load: version %d, authoritative %v, services:\n%s\nwant version 1, authoritative, services:\n%s", ver, auth, got, sumWebV1)
	}

	// The same content again is not applied again.
	if err := src.Load(); err != nil {
		t.Fatalf("Load of unchanged file: %v", err)
	}
	if s, v, _ := store.Snapshot(); s != snap || v != 1 {
		t.Errorf("unchanged file re-applied: version %d (want 1), new snapshot %v", v, s != snap)
	}

	// An invalid rewrite changes nothing and says where the error is.
	write(t, path, webInvalid)
	err := src.Load()
	want := path + ":5:15: services[0].ports[0].port: 0 is not a valid port (1 to 65535)"
	if err == nil || err.Error() != want {
		t.Errorf("Load of invalid file:\n got %v\nwant %s", err, want)
	}
	if s, v, a := store.Snapshot(); s != snap || v != 1 || !a {
		t.Errorf("invalid file changed the store: version %d (want 1), authoritative %v, services:\n%s", v, a, summary(s))
	}
	// Loading the same invalid content again does not repeat the error.
	err = src.Load()
	if want := "services file unchanged since it was rejected"; err == nil || err.Error() != want {
		t.Errorf("second Load of invalid file:\n got %v\nwant %s", err, want)
	}
	if s, v, _ := store.Snapshot(); s != snap || v != 1 {
		t.Errorf("second Load of invalid file changed the store: version %d (want 1)", v)
	}

	// A valid rewrite applies.
	write(t, path, webAndDNS)
	if err := src.Load(); err != nil {
		t.Fatalf("Load: %v", err)
	}
	snap, ver, _ = store.Snapshot()
	if got := summary(snap); got != sumBoth || ver != 2 {
		t.Errorf("after rewrite: version %d, services:\n%s\nwant version 2, services:\n%s", ver, got, sumBoth)
	}

	// The earlier mistake made again after the fix is reported again, with
	// its position.
	write(t, path, webInvalid)
	err = src.Load()
	if want := path + ":5:15: services[0].ports[0].port: 0 is not a valid port (1 to 65535)"; err == nil || err.Error() != want {
		t.Errorf("Load of the earlier invalid content:\n got %v\nwant %s", err, want)
	}
	if s, v, _ := store.Snapshot(); s != snap || v != 2 {
		t.Errorf("invalid file changed the store: version %d (want 2), services:\n%s", v, summary(s))
	}

	// Back to the first content: applied, since it is not what the store
	// holds now.
	write(t, path, webV1)
	if err := src.Load(); err != nil {
		t.Fatalf("Load: %v", err)
	}
	if s, v, _ := store.Snapshot(); summary(s) != sumWebV1 || v != 3 {
		t.Errorf("after going back: version %d, services:\n%s\nwant version 3, services:\n%s", v, summary(s), sumWebV1)
	}
}

// A file the datapath cannot hold is refused whole, before anything is
// written: the previous services keep serving, and the status says which
// content was refused and why, by its digest.
func TestLoadBeyondCapacityIsRefusedWhole(t *testing.T) {
	path := filepath.Join(t.TempDir(), "services.yaml")
	write(t, path, webV1)
	store := model.NewStore()
	store.Expect(filesource.Name)
	// web takes 2 entries (master and one slot); web and dns 4.
	store.SetAdmitter(lbmap.NewAdmission("n1", lbmap.Limits{Services: 3}))
	src := filesource.New(path, store, slog.New(slog.DiscardHandler))
	if err := src.Load(); err != nil {
		t.Fatal(err)
	}
	applied := src.Status()
	if applied.Applied != digest(webV1) || applied.Services != 1 || applied.Version != store.ServicesVersion() || applied.Error != "" {
		t.Fatalf("status after the first file: %+v", applied)
	}
	snap, ver, _ := store.Snapshot()

	write(t, path, webAndDNS)
	err := src.Load()
	want := path + ": weir_services would need 4 entries, more than the 3 it holds: raise datapath.servicesMaxEntries"
	if err == nil || err.Error() != want {
		t.Fatalf("Load:\n got %v\nwant %s", err, want)
	}
	if s, v, _ := store.Snapshot(); summary(s) != summary(snap) || v != ver {
		t.Fatalf("refused file changed the store: version %d -> %d, services:\n%s", ver, v, summary(s))
	}
	st := src.Status()
	if st.Applied != digest(webV1) || st.Rejected != digest(webAndDNS) || st.Error != want {
		t.Fatalf("status after the refusal: %+v", st)
	}
	// A file that fits clears the refusal.
	write(t, path, webV1+"  - name: small\n    clusterIP: 10.96.0.11\n    ports:\n      - port: 80\n")
	if err := src.Load(); err != nil {
		t.Fatal(err)
	}
	if st := src.Status(); st.Rejected != "" || st.Error != "" || st.Services != 2 {
		t.Fatalf("status after a file that fits: %+v", st)
	}
}

func digest(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

func TestLoadMissingFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "services.yaml")
	store := model.NewStore()
	store.Expect(filesource.Name)
	src := filesource.New(path, store, nil) // nil logger: slog.Default

	err := src.Load()
	want := "reading services file: open " + path + ": no such file or directory"
	if err == nil || err.Error() != want {
		t.Fatalf("Load:\n got %v\nwant %s", err, want)
	}
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("error %v does not match fs.ErrNotExist", err)
	}
	if s, v, a := store.Snapshot(); len(s.Services) != 0 || v != 0 || a {
		t.Errorf("store changed: version %d, authoritative %v, %d services", v, a, len(s.Services))
	}
}

func TestLoadConflictWithAnotherSource(t *testing.T) {
	path := filepath.Join(t.TempDir(), "services.yaml")
	write(t, path, webV1)
	store := model.NewStore()
	store.Expect(filesource.Name)
	api := &model.Service{
		Name: model.ServiceName{Namespace: "default", Name: "api"},
		Frontends: []model.Frontend{{
			Addr: ap("10.96.0.10:80"), Proto: model.TCP, Type: model.ClusterIP,
			Backends: []model.Backend{{Addr: ap("10.244.2.1:80")}},
		}},
	}
	if err := store.Replace("k8s", []*model.Service{api}); err != nil {
		t.Fatal(err)
	}
	src := filesource.New(path, store, slog.New(slog.DiscardHandler))

	err := src.Load()
	want := path + ": frontend 10.96.0.10:80/TCP of service default/web (source file) is already used by service default/api (source k8s)"
	if err == nil || err.Error() != want {
		t.Fatalf("Load:\n got %v\nwant %s", err, want)
	}
	snap, ver, auth := store.Snapshot()
	if got := summary(snap); got != "default/api 10.96.0.10:80/TCP -> 10.244.2.1:80/active" || ver != 1 || auth {
		t.Errorf("after refused Load: version %d, authoritative %v, services:\n%s", ver, auth, got)
	}

	// The other source gives the frontend up.
	store.Delete("k8s", api.Name)
	// The store, not the file, refused it: the next check applies it.
	if err := src.Load(); err != nil {
		t.Fatalf("Load after the conflict went away: %v", err)
	}
	if s, v, a := store.Snapshot(); summary(s) != sumWebV1 || v != 3 || !a {
		t.Errorf("after Load: version %d, authoritative %v, services:\n%s\nwant version 3, authoritative, services:\n%s", v, a, summary(s), sumWebV1)
	}
}

// An empty file (a write caught half-way, most likely) is refused; the
// services stay.
func TestLoadEmptyFileIsRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "services.yaml")
	write(t, path, webV1)
	store := model.NewStore()
	src := filesource.New(path, store, slog.New(slog.DiscardHandler))
	if err := src.Load(); err != nil {
		t.Fatal(err)
	}
	write(t, path, "")
	if err := src.Load(); err == nil || !strings.Contains(err.Error(), "the file is empty") {
		t.Fatalf("Load of empty file: %v", err)
	}
	if s, v, _ := store.Snapshot(); summary(s) != sumWebV1 || v != 1 {
		t.Errorf("after empty file: version %d (want 1), services:\n%s", v, summary(s))
	}
}

// recorder is a slog handler that keeps every record for the test to
// inspect.
type recorder struct {
	mu   sync.Mutex
	recs []record
}

type record struct {
	level slog.Level
	msg   string
	attrs map[string]slog.Value
}

type recHandler struct {
	r     *recorder
	attrs []slog.Attr
}

func (h recHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h recHandler) Handle(_ context.Context, r slog.Record) error {
	rec := record{level: r.Level, msg: r.Message, attrs: map[string]slog.Value{}}
	for _, a := range h.attrs {
		rec.attrs[a.Key] = a.Value
	}
	r.Attrs(func(a slog.Attr) bool {
		rec.attrs[a.Key] = a.Value
		return true
	})
	h.r.mu.Lock()
	h.r.recs = append(h.r.recs, rec)
	h.r.mu.Unlock()
	return nil
}

func (h recHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return recHandler{r: h.r, attrs: append(append([]slog.Attr(nil), h.attrs...), as...)}
}

func (h recHandler) WithGroup(string) slog.Handler { return h }

func (r *recorder) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.recs)
}

// find returns the first record from index from on with message msg.
func (r *recorder) find(from int, msg string) (record, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, rec := range r.recs[min(from, len(r.recs)):] {
		if rec.msg == msg {
			return rec, true
		}
	}
	return record{}, false
}

const waitFor = 5 * time.Second

// eventually polls cond until it holds or waitFor passes; each round it
// calls poke (when not nil) first.
func eventually(poke func(), cond func() bool) bool {
	deadline := time.Now().Add(waitFor)
	for {
		if poke != nil {
			poke()
		}
		// Give the watcher's 100ms debounce time to fire before poking
		// again.
		for range 10 {
			if cond() {
				return true
			}
			time.Sleep(30 * time.Millisecond)
		}
		if time.Now().After(deadline) {
			return false
		}
	}
}

func startWatch(t *testing.T, src *filesource.Source) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		src.Watch(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(waitFor):
			t.Error("Watch did not return after its context was cancelled")
		}
	})
}

func TestWatch(t *testing.T) {
	path := filepath.Join(t.TempDir(), "services.yaml")
	write(t, path, webV1)
	store := model.NewStore()
	store.Expect(filesource.Name)
	rec := &recorder{}
	src := filesource.New(path, store, slog.New(recHandler{r: rec}))
	if err := src.Load(); err != nil {
		t.Fatal(err)
	}
	startWatch(t, src)

	current := func(want string) func() bool {
		return func() bool {
			s, _, _ := store.Snapshot()
			return summary(s) == want
		}
	}

	// In-place write. The watcher may not watch the directory yet when
	// the first write happens, so the write is repeated until seen (the
	// same content again is a no-op).
	if !eventually(func() { write(t, path, webAndDNS) }, current(sumBoth)) {
		s, v, _ := store.Snapshot()
		t.Fatalf("in-place rewrite not applied within %v: version %d, services:\n%s", waitFor, v, summary(s))
	}
	if _, ok := rec.find(0, "services file applied"); !ok {
		t.Error(`no "services file applied" log record`)
	}

	// Write a temporary file and rename it over the watched one.
	replace(t, path, webOnly8081)
	if !eventually(nil, current(sumWeb8081)) {
		s, v, _ := store.Snapshot()
		t.Fatalf("renamed-over file not applied within %v: version %d, services:\n%s", waitFor, v, summary(s))
	}
	good, goodVer, _ := store.Snapshot()

	// An invalid rewrite is logged and leaves the services.
	from := rec.len()
	write(t, path, webInvalid)
	var r record
	if !eventually(nil, func() (ok bool) {
		r, ok = rec.find(from, "services file rejected; keeping the current services")
		return ok
	}) {
		t.Fatalf("invalid rewrite not rejected within %v", waitFor)
	}
	wantErr := path + ":5:15: services[0].ports[0].port: 0 is not a valid port (1 to 65535)"
	if r.level != slog.LevelError || r.attrs["err"].String() != wantErr {
		t.Errorf("rejection logged at %v with err %q; want ERROR with %q", r.level, r.attrs["err"], wantErr)
	}
	if s, v, a := store.Snapshot(); s != good || v != goodVer || !a {
		t.Errorf("invalid rewrite changed the store: version %d (want %d), authoritative %v, services:\n%s", v, goodVer, a, summary(s))
	}

	// A deleted file is logged and leaves the services.
	from = rec.len()
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if !eventually(nil, func() (ok bool) {
		r, ok = rec.find(from, "services file is missing; keeping the current services")
		return ok
	}) {
		t.Fatalf("deletion not noticed within %v", waitFor)
	}
	if r.level != slog.LevelWarn || r.attrs["file"].String() != path {
		t.Errorf("deletion logged at %v with file %q; want WARN with %q", r.level, r.attrs["file"], path)
	}
	if s, v, a := store.Snapshot(); s != good || v != goodVer || !a {
		t.Errorf("deleting the file changed the store: version %d (want %d), authoritative %v, services:\n%s", v, goodVer, a, summary(s))
	}

	// The file comes back: applied.
	replace(t, path, webV1)
	if !eventually(nil, current(sumWebV1)) {
		s, v, _ := store.Snapshot()
		t.Fatalf("re-created file not applied within %v: version %d, services:\n%s", waitFor, v, summary(s))
	}
}

func TestWatchIgnoresOtherFiles(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "services.yaml")
	write(t, path, webV1)
	store := model.NewStore()
	rec := &recorder{}
	src := filesource.New(path, store, slog.New(recHandler{r: rec}))
	if err := src.Load(); err != nil {
		t.Fatal(err)
	}
	startWatch(t, src)

	// Make sure the watcher is running: a change to the file is seen.
	if !eventually(func() { write(t, path, webAndDNS) }, func() bool {
		s, _, _ := store.Snapshot()
		return summary(s) == sumBoth
	}) {
		t.Fatalf("rewrite not applied within %v", waitFor)
	}
	_, ver, _ := store.Snapshot()
	from := rec.len()
	// Files next to it do not trigger a reload, not even invalid YAML.
	write(t, filepath.Join(dir, "other.yaml"), "not: [valid\n")
	write(t, filepath.Join(dir, "services.yaml.bak"), webV1)
	time.Sleep(500 * time.Millisecond)
	if s, v, _ := store.Snapshot(); v != ver || summary(s) != sumBoth {
		t.Errorf("a neighbouring file changed the store: version %d (want %d), services:\n%s", v, ver, summary(s))
	}
	if n := rec.len(); n != from {
		t.Errorf("a neighbouring file caused %d log records", n-from)
	}
}

func TestWatchMissingDirectory(t *testing.T) {
	path := filepath.Join(t.TempDir(), "absent", "services.yaml")
	rec := &recorder{}
	src := filesource.New(path, model.NewStore(), slog.New(recHandler{r: rec}))
	startWatch(t, src)
	var r record
	if !eventually(nil, func() (ok bool) {
		r, ok = rec.find(0, "cannot watch services file directory; checking periodically")
		return ok
	}) {
		t.Fatalf("no log record about the unwatchable directory within %v", waitFor)
	}
	err, _ := r.attrs["err"].Any().(error)
	if r.level != slog.LevelError || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("logged at %v with err %v; want ERROR with a not-exist error", r.level, r.attrs["err"])
	}
	// The cleanup checks that Watch still returns when cancelled.
}
