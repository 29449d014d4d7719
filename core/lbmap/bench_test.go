package lbmap

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/datapath/dptest"
	"github.com/weirnet/weir/core/model"
)

// scaleService is service i of a generated set: one ClusterIP frontend
// with n backends; gen varies the backends so a new generation changes
// every service.
func scaleService(i, n, gen int) *model.Service {
	f := model.Frontend{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(96 + i>>16), byte(i >> 8), byte(i)}), 80), Proto: model.TCP, Type: model.ClusterIP}
	for j := range n {
		k := i*n + j + gen
		f.Backends = append(f.Backends, model.Backend{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(128 + k>>16), byte(k >> 8), byte(k)}), 8080)})
	}
	return &model.Service{Name: model.ServiceName{Namespace: "bench", Name: fmt.Sprintf("s%d", i)}, Frontends: []model.Frontend{f}}
}

// BenchmarkReconcile times the reconciler alone on real maps: a full pass
// writing N services of 10 backends, a delta changing every one of them,
// and one changed service at N existing (the cost that must not grow
// with N). Baseline: the same single change at N = 1.
func BenchmarkReconcile(b *testing.B) {
	one := map[int]time.Duration{}
	for _, n := range []int{1, 1000, 10000, 30000} {
		b.Run(fmt.Sprintf("services=%d", n), func(b *testing.B) {
			dp := dptest.OpenWith(b, datapath.Options{CTMaxEntries: 4096, MaxEntries: map[string]uint32{
				datapath.MapServices: 400000, datapath.MapBackends: 400000, datapath.MapBackendAddrs: 400000, datapath.MapRevNAT: 65536}})
			r := NewFromDatapath(dp, nil)
			all := map[model.ServiceName]*model.Service{}
			for i := range n {
				s := scaleService(i, 10, 0)
				all[s.Name] = s
			}
			start := time.Now()
			if err := r.Apply(model.Delta{Full: true, Services: all}); err != nil {
				b.Fatal(err)
			}
			full := time.Since(start)
			next := map[model.ServiceName]*model.Service{}
			for i := range n {
				s := scaleService(i, 10, 1)
				next[s.Name] = s
			}
			start = time.Now()
			if err := r.Apply(model.Delta{Services: next}); err != nil {
				b.Fatal(err)
			}
			every := time.Since(start)
			// One service changing back and forth, 200 times.
			var single []time.Duration
			for k := range 200 {
				s := scaleService(n/2, 10, 2+k%2)
				start := time.Now()
				if err := r.Apply(model.Delta{Services: map[model.ServiceName]*model.Service{s.Name: s}}); err != nil {
					b.Fatal(err)
				}
				single = append(single, time.Since(start))
			}
			// A restarted agent: a new reconciler reads the maps and
			// compares them with the same state.
			cur := map[model.ServiceName]*model.Service{}
			for name, svc := range next {
				cur[name] = svc
			}
			last := scaleService(n/2, 10, 2+199%2)
			cur[last.Name] = last
			again := NewFromDatapath(dp, nil)
			start = time.Now()
			if err := again.Apply(model.Delta{Full: true, Services: cur}); err != nil {
				b.Fatal(err)
			}
			restart := time.Since(start)
			if st := again.Status(); st.Passes != 1 {
				b.Fatalf("restart pass not recorded: %+v", st)
			}
			b.ReportMetric(float64(restart.Microseconds())/1000, "ms-restart-pass")
			med := medianOf(single)
			one[n] = med
			b.ReportMetric(float64(full.Microseconds())/1000, "ms-full-pass")
			b.ReportMetric(float64(every.Microseconds())/1000, "ms-delta-all-changed")
			b.ReportMetric(float64(med.Microseconds()), "us-one-change-p50")
			if base, ok := one[1]; ok && base > 0 {
				b.ReportMetric(float64(med)/float64(base), "ratio-one-change-vs-1-service")
			}
		})
	}
}

func medianOf(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	for i := range s {
		for j := i + 1; j < len(s); j++ {
			if s[j] < s[i] {
				s[i], s[j] = s[j], s[i]
			}
		}
	}
	return s[len(s)/2]
}
