package datapath_test

import (
	"net/netip"
	"testing"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/datapath/dptest"
	"github.com/weirnet/weir/core/lbmap"
	"github.com/weirnet/weir/core/model"
)

// `weir service list` says which frontends this node serves: NodePort,
// LoadBalancer and external-IP frontends are reached from pods (lb
// translates them), and from outside once a NodePort dispatch module
// fills its slot.
func TestServiceListSaysWhatIsServed(t *testing.T) {
	dp := dptest.Open(t)
	be := []model.Backend{{Addr: netip.MustParseAddrPort("10.244.1.11:8080")}}
	svc := &model.Service{Name: model.ServiceName{Namespace: "default", Name: "web"}, Frontends: []model.Frontend{
		{Addr: netip.MustParseAddrPort("10.96.0.10:80"), Proto: model.TCP, Type: model.ClusterIP, Backends: be},
		{Addr: netip.MustParseAddrPort("0.0.0.0:30080"), Proto: model.TCP, Type: model.NodePort, Backends: be},
		{Addr: netip.MustParseAddrPort("192.0.2.10:80"), Proto: model.TCP, Type: model.LoadBalancer, Backends: be},
		{Addr: netip.MustParseAddrPort("192.0.2.11:80"), Proto: model.TCP, Type: model.ExternalIP, Backends: be},
	}}
	if err := lbmap.NewFromDatapath(dp, nil).ApplySnapshot(&model.Snapshot{Services: []*model.Service{svc}}); err != nil {
		t.Fatal(err)
	}
	p, err := datapath.OpenPinned(dp.PinDir())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	rows, err := p.Services()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"ClusterIP": datapath.ServedYes, "NodePort": datapath.ServedPodsOnly,
		"LoadBalancer": datapath.ServedPodsOnly, "ExternalIP": datapath.ServedPodsOnly,
	}
	if len(rows) != 4 {
		t.Fatalf("%d rows: %+v", len(rows), rows)
	}
	for _, r := range rows {
		if r.Served != want[r.Type] {
			t.Errorf("%s %v: served %q, want %q", r.Type, r.Frontend, r.Served, want[r.Type])
		}
	}
	dptest.Install(t, dp, dptest.StageObject(t, map[string]string{"netdev-ingress/nodeport": "stage_pass"}))
	if rows, err = p.Services(); err != nil {
		t.Fatal(err)
	}
	for _, r := range rows {
		if r.Served != datapath.ServedYes {
			t.Errorf("with a NodePort dispatch module: %s %v served %q", r.Type, r.Frontend, r.Served)
		}
	}
}
