package lab

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// The agent serves Prometheus metrics, /healthz and /readyz on
// --metrics-addr (:9876 in its node's network namespace here): a scrape
// parsed with Prometheus's own text parser has the datapath's packet
// counters, the modules, the map fill `weir status` reports, and the
// reconciler's pass times.
func TestMetricsAndProbes(t *testing.T) {
	l := up(t, oneNode())
	apply(t, l, webServices, 3)
	n := l.Nodes[0]
	get(t, l.Pod("client"), "http://10.96.0.10/", 20)

	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return Dial(ctx, n.NetnsPath(), network, addr)
		},
		DisableKeepAlives: true,
	}}
	fetch := func(path string) (int, string) {
		t.Helper()
		resp, err := hc.Get("http://127.0.0.1:9876" + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	for _, p := range []string{"/healthz", "/readyz"} {
		if code, body := fetch(p); code != http.StatusOK || strings.TrimSpace(body) != "ok" {
			t.Fatalf("%s: %d %q", p, code, body)
		}
	}

	code, body := fetch("/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d", code)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parsing the scrape: %v", err)
	}
	value := func(name string, labels map[string]string) (float64, bool) {
		f := fams[name]
		if f == nil {
			return 0, false
		}
	metrics:
		for _, m := range f.Metric {
			for k, v := range labels {
				if !hasLabel(m, k, v) {
					continue metrics
				}
			}
			switch {
			case m.Counter != nil:
				return m.Counter.GetValue(), true
			case m.Gauge != nil:
				return m.Gauge.GetValue(), true
			case m.Histogram != nil:
				return float64(m.Histogram.GetSampleCount()), true
			}
		}
		return 0, false
	}
	// Every packet of the 20 requests was delivered to a pod through
	// pod-ingress (pod-egress redirects what it translates).
	if v, ok := value("weir_datapath_packets_total", map[string]string{"hook": "pod-ingress", "reason": "passed"}); !ok || v < 20 {
		t.Errorf("pod-ingress packets delivered: %v (found %v), want the requests' at least", v, ok)
	}
	if v, ok := value("weir_module_enabled", map[string]string{"module": "lb"}); !ok || v != 1 {
		t.Errorf("weir_module_enabled{module=lb} = %v (found %v)", v, ok)
	}
	if v, ok := value("weir_ready", nil); !ok || v != 1 {
		t.Errorf("weir_ready = %v (found %v)", v, ok)
	}
	if v, ok := value("weir_reconcile_duration_seconds", map[string]string{"full": "true"}); !ok || v < 1 {
		t.Errorf("full reconciler passes in the histogram: %v (found %v)", v, ok)
	}
	st, err := n.Client().Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range st.Maps {
		if m.Name != "weir_services" {
			continue
		}
		if v, ok := value("weir_map_entries", map[string]string{"map": m.Name}); !ok || int(v) != m.Entries {
			t.Errorf("weir_map_entries{map=%s} = %v (found %v), status says %d", m.Name, v, ok, m.Entries)
		}
	}
}

func hasLabel(m *dto.Metric, name, value string) bool {
	for _, l := range m.Label {
		if l.GetName() == name && l.GetValue() == value {
			return true
		}
	}
	return false
}
