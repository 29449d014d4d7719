package module_test

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/fx"

	"github.com/weirnet/weir/core/module"
	"github.com/weirnet/weir/core/slots"
)

func provide(module.Settings) fx.Option { return fx.Options() }

func claim(slot, prog string) module.SlotClaim { return module.SlotClaim{Slot: slot, Program: prog} }

func factory(d module.Descriptor) module.Factory {
	return module.Factory{Descriptor: d, Provide: provide}
}

func wantErr(t *testing.T, err error, want string) {
	t.Helper()
	if err == nil || err.Error() != want {
		t.Errorf("error:\n got %v\nwant %s", err, want)
	}
}

func TestDescriptorValidate(t *testing.T) {
	allSlots := strings.Join(slots.Names(), ", ")
	if !strings.Contains(allSlots, "pod-egress/lb") {
		t.Fatalf("slot list %q lacks pod-egress/lb", allSlots)
	}
	cases := []struct {
		name string
		d    module.Descriptor
		want string // "" for valid
	}{
		{name: "no slots", d: module.Descriptor{Name: "metrics"}},
		{
			name: "valid",
			d: module.Descriptor{
				Name: "lb", Requires: []string{"endpoints"}, Excludes: []string{"kube-proxy"},
				Slots: []module.SlotClaim{claim("pod-egress/lb", "lb_egress"), claim("pod-ingress/lb-revnat", "lb_revnat")},
			},
		},
		{name: "empty name", d: module.Descriptor{}, want: `module name "" is not a plain word`},
		{name: "name with a space", d: module.Descriptor{Name: "load balancer"}, want: `module name "load balancer" is not a plain word`},
		{name: "name with a slash", d: module.Descriptor{Name: "lb/v2"}, want: `module name "lb/v2" is not a plain word`},
		{
			name: "unknown slot",
			d:    module.Descriptor{Name: "lb", Slots: []module.SlotClaim{claim("pod-egress/balance", "lb_egress")}},
			want: `module lb claims unknown slot "pod-egress/balance"; slots: ` + allSlots,
		},
		{
			name: "hook name alone is no slot",
			d:    module.Descriptor{Name: "lb", Slots: []module.SlotClaim{claim("pod-egress", "lb_egress")}},
			want: `module lb claims unknown slot "pod-egress"; slots: ` + allSlots,
		},
		{
			name: "slot claimed twice",
			d: module.Descriptor{Name: "lb", Slots: []module.SlotClaim{
				claim("pod-egress/lb", "lb_egress"), claim("pod-ingress/lb-revnat", "lb_revnat"), claim("pod-egress/lb", "lb_egress2"),
			}},
			want: "module lb claims slot pod-egress/lb twice",
		},
		{
			name: "claim without program",
			d:    module.Descriptor{Name: "lb", Slots: []module.SlotClaim{claim("pod-egress/lb", "")}},
			want: "module lb claims slot pod-egress/lb without naming a program",
		},
		{
			name: "unknown cgroup hook",
			d:    module.Descriptor{Name: "socketlb", Cgroup: []module.CgroupClaim{{Hook: "cgroup/connect6", Program: "sock_connect6"}}},
			want: `module socketlb claims unknown cgroup hook "cgroup/connect6"; cgroup hooks: ` + strings.Join(slots.CgroupHookNames(), ", "),
		},
		{
			name: "cgroup hook claimed twice",
			d: module.Descriptor{Name: "socketlb", Cgroup: []module.CgroupClaim{
				{Hook: "cgroup/connect4", Program: "a"}, {Hook: "cgroup/connect4", Program: "b"},
			}},
			want: "module socketlb claims cgroup hook cgroup/connect4 twice",
		},
		{
			name: "cgroup claim without program",
			d:    module.Descriptor{Name: "socketlb", Cgroup: []module.CgroupClaim{{Hook: "cgroup/sendmsg4"}}},
			want: "module socketlb claims cgroup hook cgroup/sendmsg4 without naming a program",
		},
		{
			name: "requires itself",
			d:    module.Descriptor{Name: "lb", Requires: []string{"endpoints", "lb"}},
			want: "module lb requires or excludes itself",
		},
		{
			name: "excludes itself",
			d:    module.Descriptor{Name: "lb", Excludes: []string{"lb"}},
			want: "module lb requires or excludes itself",
		},
		{
			name: "requires and excludes",
			d:    module.Descriptor{Name: "lb", Requires: []string{"routing", "endpoints"}, Excludes: []string{"endpoints"}},
			want: "module lb both requires and excludes endpoints",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.d.Validate()
			if tc.want == "" {
				if err != nil {
					t.Errorf("Validate: %v; want nil", err)
				}
				return
			}
			wantErr(t, err, tc.want)
		})
	}
}

func TestNewRegistry(t *testing.T) {
	ep := factory(module.Descriptor{Name: "endpoints", Slots: []module.SlotClaim{claim("pod-ingress/deliver", "deliver")}})
	lb := factory(module.Descriptor{Name: "lb", Requires: []string{"endpoints"}, Slots: []module.SlotClaim{claim("pod-egress/lb", "lb_egress")}})
	arp := factory(module.Descriptor{Name: "arp"})

	r, err := module.NewRegistry(lb, ep, arp)
	if err != nil {
		t.Fatalf("NewRegistry: %v", err)
	}
	names := r.Names()
	if got := strings.Join(names, " "); got != "arp endpoints lb" {
		t.Errorf("Names = %q; want sorted %q", got, "arp endpoints lb")
	}
	names[0] = "changed"
	if got := strings.Join(r.Names(), " "); got != "arp endpoints lb" {
		t.Errorf("changing the returned names changed the registry: %q", got)
	}
	if f, ok := r.Lookup("lb"); !ok || f.Name != "lb" || f.Requires[0] != "endpoints" || f.Provide == nil {
		t.Errorf("Lookup(lb) = %+v, %v", f.Descriptor, ok)
	}
	if _, ok := r.Lookup("LB"); ok {
		t.Error("Lookup is not case-sensitive")
	}
	if r, err := module.NewRegistry(); err != nil || len(r.Names()) != 0 {
		t.Errorf("empty registry: %v, %v", r.Names(), err)
	}

	_, err = module.NewRegistry(ep, lb, factory(module.Descriptor{Name: "lb"}))
	wantErr(t, err, "module lb is registered twice")

	_, err = module.NewRegistry(ep, module.Factory{Descriptor: module.Descriptor{Name: "lb"}})
	wantErr(t, err, "module lb has no Provide")

	_, err = module.NewRegistry(ep, factory(module.Descriptor{Name: "lb", Requires: []string{"lb"}}))
	wantErr(t, err, "module lb requires or excludes itself")
}

// catalog is the registry the Check tests use.
func catalog(t *testing.T) *module.Registry {
	t.Helper()
	r, err := module.NewRegistry(
		factory(module.Descriptor{Name: "endpoints", Slots: []module.SlotClaim{claim("pod-ingress/deliver", "deliver")}}),
		factory(module.Descriptor{Name: "lb", Requires: []string{"endpoints"}, Slots: []module.SlotClaim{
			claim("pod-egress/lb", "lb_egress"), claim("pod-ingress/lb-revnat", "lb_revnat"),
		}}),
		factory(module.Descriptor{Name: "native", Slots: []module.SlotClaim{claim("pod-egress/forward", "native_fwd")}}),
		factory(module.Descriptor{Name: "tunnel", Requires: []string{"endpoints"}, Slots: []module.SlotClaim{claim("pod-egress/forward", "tunnel_fwd")}}),
		factory(module.Descriptor{Name: "firewall", Excludes: []string{"bypass"}}),
		factory(module.Descriptor{Name: "bypass"}),
		factory(module.Descriptor{Name: "socketlb", Cgroup: []module.CgroupClaim{{Hook: "cgroup/connect4", Program: "sock4_connect"}}}),
		factory(module.Descriptor{Name: "sockfilter", Cgroup: []module.CgroupClaim{
			{Hook: "cgroup/post_bind4", Program: "bind_check"}, {Hook: "cgroup/connect4", Program: "connect_check"},
		}}),
	)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// enable builds an enabled set from names, with fields modules[i].
func enable(names ...string) []module.Enabled {
	var out []module.Enabled
	for i, n := range names {
		out = append(out, module.Enabled{Name: n, Field: "modules[" + strconv.Itoa(i) + "]"})
	}
	return out
}

func order(facs []module.Factory) string {
	var out []string
	for _, f := range facs {
		out = append(out, f.Name)
	}
	return strings.Join(out, " ")
}

func TestCheckErrors(t *testing.T) {
	cat := catalog(t)
	cases := []struct {
		name  string
		where string
		set   []module.Enabled
		want  string
	}{
		{
			name:  "unknown module",
			where: "modules",
			set:   enable("endpoints", "lb", "loadbalancer"),
			want:  `modules[2]: unknown module "loadbalancer"; known modules: bypass, endpoints, firewall, lb, native, socketlb, sockfilter, tunnel`,
		},
		{
			name:  "module enabled twice",
			where: "modules",
			set:   enable("endpoints", "lb", "endpoints"),
			want:  `modules[2]: module "endpoints" is already enabled by modules[0]`,
		},
		{
			name:  "missing requirement",
			where: "modules",
			set:   enable("native", "lb"),
			want:  `modules: module "lb" (modules[1]) requires module "endpoints", which is not enabled`,
		},
		{
			name:  "missing requirement in a node pool",
			where: `nodePools[1] ("edge")`,
			set: []module.Enabled{
				{Name: "native", Field: "nodePools[1].modules.enable[0]"},
				{Name: "lb", Field: "nodePools[1].modules.enable[1]"},
			},
			want: `nodePools[1] ("edge"): module "lb" (nodePools[1].modules.enable[1]) requires module "endpoints", which is not enabled`,
		},
		{
			name:  "exclusion, excluding module first",
			where: "modules",
			set:   enable("firewall", "endpoints", "bypass"),
			want:  `modules: modules "firewall" (modules[0]) and "bypass" (modules[2]) exclude each other; enable only one`,
		},
		{
			// Only firewall declares the exclusion; enabling bypass first
			// is caught all the same.
			name:  "exclusion, excluded module first",
			where: "modules",
			set:   enable("bypass", "endpoints", "firewall"),
			want:  `modules: modules "firewall" (modules[2]) and "bypass" (modules[0]) exclude each other; enable only one`,
		},
		{
			name:  "two modules claim one slot",
			where: "modules",
			set:   enable("tunnel", "endpoints", "native"),
			want:  `modules: modules "native" (modules[2]) and "tunnel" (modules[0]) both claim slot pod-egress/forward (forwarding mode); enable only one`,
		},
		{
			name:  "two modules claim one slot, other order",
			where: `nodePools[0] ("gpu")`,
			set:   enable("native", "endpoints", "tunnel"),
			want:  `nodePools[0] ("gpu"): modules "native" (modules[0]) and "tunnel" (modules[2]) both claim slot pod-egress/forward (forwarding mode); enable only one`,
		},
		{
			name:  "two modules claim one cgroup hook",
			where: "modules",
			set:   enable("socketlb", "endpoints", "sockfilter"),
			want:  `modules: modules "socketlb" (modules[0]) and "sockfilter" (modules[2]) both claim cgroup hook cgroup/connect4; enable only one`,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			facs, err := module.Check(cat, tc.where, tc.set)
			wantErr(t, err, tc.want)
			if facs != nil {
				t.Errorf("Check returned modules %q with its error", order(facs))
			}
		})
	}
}

func TestCheckStartOrder(t *testing.T) {
	cat := catalog(t)
	cases := []struct {
		set  []string
		want string
	}{
		{set: nil, want: ""},
		{set: []string{"lb", "native", "endpoints", "bypass"}, want: "bypass endpoints lb native"},
		{set: []string{"tunnel", "lb", "endpoints"}, want: "endpoints lb tunnel"},
	}
	for _, tc := range cases {
		facs, err := module.Check(cat, "modules", enable(tc.set...))
		if err != nil {
			t.Errorf("Check(%q): %v", tc.set, err)
			continue
		}
		if got := order(facs); got != tc.want {
			t.Errorf("Check(%q) order %q; want %q", tc.set, got, tc.want)
		}
		for _, f := range facs {
			if f.Provide == nil {
				t.Errorf("Check(%q) returned %s without its Provide", tc.set, f.Name)
			}
		}
	}

	// Requirements come before name order: "agent" needs "store", which
	// sorts after it, and "zz" needs "api".
	r, err := module.NewRegistry(
		factory(module.Descriptor{Name: "agent", Requires: []string{"store"}}),
		factory(module.Descriptor{Name: "api"}),
		factory(module.Descriptor{Name: "store"}),
		factory(module.Descriptor{Name: "zz", Requires: []string{"api"}}),
		factory(module.Descriptor{Name: "c", Requires: []string{"b"}}),
		factory(module.Descriptor{Name: "b", Requires: []string{"a"}}),
		factory(module.Descriptor{Name: "a"}),
	)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		set  []string
		want string
	}{
		// Each module after its requirements; among the modules free to
		// start, the first by name.
		{set: []string{"zz", "store", "api", "agent"}, want: "api store agent zz"},
		{set: []string{"a", "b", "c"}, want: "a b c"},
		{set: []string{"c", "b", "a"}, want: "a b c"},
		{set: []string{"c", "zz", "b", "api", "a"}, want: "a api b c zz"},
	} {
		facs, err := module.Check(r, "modules", enable(tc.set...))
		if err != nil {
			t.Errorf("Check(%q): %v", tc.set, err)
			continue
		}
		if got := order(facs); got != tc.want {
			t.Errorf("Check(%q) order %q; want %q", tc.set, got, tc.want)
		}
	}
}

func TestCheckRequirementCycle(t *testing.T) {
	r, err := module.NewRegistry(
		factory(module.Descriptor{Name: "ping", Requires: []string{"pong"}}),
		factory(module.Descriptor{Name: "pong", Requires: []string{"ping"}}),
		factory(module.Descriptor{Name: "solo"}),
		factory(module.Descriptor{Name: "zed", Requires: []string{"ping"}}),
		factory(module.Descriptor{Name: "after", Requires: []string{"ping"}}),
	)
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		facs []module.Factory
		err  error
	}
	check := func(set ...string) result {
		t.Helper()
		done := make(chan result, 1)
		go func() {
			facs, err := module.Check(r, "modules", enable(set...))
			done <- result{facs, err}
		}()
		select {
		case res := <-done:
			return res
		case <-time.After(5 * time.Second):
			t.Fatalf("Check(%q) did not return: the requirement cycle hangs it", set)
			return result{}
		}
	}

	// The cycle's modules cannot be ordered: they keep name order, after
	// the modules that can be.
	res := check("solo", "pong", "zed", "ping")
	if res.err != nil {
		t.Fatalf("Check: %v", res.err)
	}
	if got, want := order(res.facs), "solo ping pong zed"; got != want {
		t.Errorf("order %q; want %q", got, want)
	}

	// "after" requires "ping" and is not part of the cycle: it starts after
	// "ping" (and, by name, before "pong", which it does not need).
	res = check("solo", "pong", "after", "ping")
	if res.err != nil {
		t.Fatalf("Check: %v", res.err)
	}
	if got, want := order(res.facs), "solo ping after pong"; got != want {
		t.Errorf("order %q; want %q", got, want)
	}
}

func TestNewRegistryRejectsUnknownRequirement(t *testing.T) {
	none := func(module.Settings) fx.Option { return fx.Options() }
	_, err := module.NewRegistry(
		module.Factory{Descriptor: module.Descriptor{Name: "endpoints"}, Provide: none},
		module.Factory{Descriptor: module.Descriptor{Name: "lb", Requires: []string{"endpoint"}}, Provide: none},
	)
	want := `module lb names module "endpoint" in its requires or excludes, which is not registered; registered: endpoints, lb`
	if err == nil || err.Error() != want {
		t.Fatalf("NewRegistry: %v\nwant %s", err, want)
	}
}
