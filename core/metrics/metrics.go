// Package metrics serves the agent's Prometheus metrics, /healthz and
// /readyz. Counters the datapath keeps (packets and drops by hook and
// reason) and what the agent reports of itself (map fill, collector,
// reconciler, modules, plugins) are read when Prometheus scrapes, so the
// figures are never older than the scrape; the reconciler's pass times
// go into a histogram as they happen.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/weirnet/weir/core/api"
	"github.com/weirnet/weir/core/datapath"
)

// Sources are where the figures come from.
type Sources struct {
	// Status is the agent's status, as `weir status` gets it.
	Status func() api.Status
	// Packets reads the datapath's counters.
	Packets func() ([]datapath.MetricRow, error)
	// Healthy says whether the agent runs (its base started), and Ready
	// whether its datapath is programmed from synced sources: probes ask
	// often, so neither builds the whole status.
	Healthy, Ready func() bool
}

// Server serves the metrics and probes on one address.
type Server struct {
	addr string
	log  *slog.Logger
	srv  *http.Server
	ln   net.Listener
	// Reconcile is the histogram of the service reconciler's passes.
	Reconcile *prometheus.HistogramVec
}

// New builds the server; nothing listens until Start.
func New(addr string, src Sources, log *slog.Logger) *Server {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reconcile := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "weir_reconcile_duration_seconds",
		Help: "Time the service reconciler took to write one pass (a batch of changes, or every service when full) to the maps.",
		// 10 µs to ~10 s.
		Buckets: prometheus.ExponentialBuckets(10e-6, 4, 11),
	}, []string{"full"})
	reg.MustRegister(reconcile, &collector{src: src})
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		if src.Healthy != nil && !src.Healthy() {
			http.Error(w, "not started", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !src.Ready() {
			http.Error(w, "not ready: the datapath is not yet programmed from synced sources", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	return &Server{addr: addr, log: log, Reconcile: reconcile,
		srv: &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}}
}

// ObservePass records one reconciler pass.
func (s *Server) ObservePass(took time.Duration, full bool) {
	s.Reconcile.WithLabelValues(fmt.Sprint(full)).Observe(took.Seconds())
}

// Start listens; an address in use is an error that says so.
func (s *Server) Start() error {
	ln, err := net.Listen("tcp", s.addr)
	if err != nil {
		return fmt.Errorf("serving metrics on %s (--metrics-addr; empty turns them off): %w", s.addr, err)
	}
	s.ln = ln
	go func() {
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("metrics server", "err", err)
		}
	}()
	return nil
}

// Addr is where the server listens (after Start).
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Stop ends the server.
func (s *Server) Stop(ctx context.Context) error { return s.srv.Shutdown(ctx) }

// collector turns the agent's reports into metrics at scrape time.
type collector struct{ src Sources }

var (
	descPackets = prometheus.NewDesc("weir_datapath_packets_total",
		"Packets the datapath's hooks handled, by hook and outcome (reason \"passed\", or why it was dropped or rejected).", []string{"hook", "reason"}, nil)
	descBytes = prometheus.NewDesc("weir_datapath_bytes_total",
		"Bytes of those packets.", []string{"hook", "reason"}, nil)
	descMapEntries = prometheus.NewDesc("weir_map_entries", "Entries in a shared BPF map.", []string{"map"}, nil)
	descMapMax     = prometheus.NewDesc("weir_map_max_entries", "Size of a shared BPF map.", []string{"map"}, nil)
	descCTPasses   = prometheus.NewDesc("weir_conntrack_gc_passes_total", "Passes of the conntrack collector.", nil, nil)
	descCTDeleted  = prometheus.NewDesc("weir_conntrack_gc_deleted_last", "Entries the collector's last pass deleted.", nil, nil)
	descCTPressure = prometheus.NewDesc("weir_conntrack_pressure", "1 when the conntrack map is under pressure (collected more often).", nil, nil)
	descPasses     = prometheus.NewDesc("weir_reconcile_passes_total", "Passes of the service reconciler.", []string{"full"}, nil)
	descChanged    = prometheus.NewDesc("weir_reconcile_services_changed_total", "Service changes the reconciler wrote.", nil, nil)
	descFailing    = prometheus.NewDesc("weir_reconcile_failing", "1 while the reconciler's last pass failed (it retries).", nil, nil)
	descModule     = prometheus.NewDesc("weir_module_enabled", "1 for each module the node's set runs.", []string{"module", "pool"}, nil)
	descPluginUp   = prometheus.NewDesc("weir_plugin_up", "1 while a plugin the node runs has its process.", []string{"plugin", "version"}, nil)
	descPluginRst  = prometheus.NewDesc("weir_plugin_restarts_total", "Times the agent started a plugin's process again after it died.", []string{"plugin"}, nil)
	descReady      = prometheus.NewDesc("weir_ready", "1 once the datapath is programmed from synced sources.", nil, nil)
	descKubeSynced = prometheus.NewDesc("weir_kubernetes_synced", "1 once the Kubernetes caches synced.", nil, nil)
	descServices   = prometheus.NewDesc("weir_kubernetes_services", "Services the Kubernetes source hands on.", nil, nil)
)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descPackets, descBytes, descMapEntries, descMapMax, descCTPasses, descCTDeleted, descCTPressure,
		descPasses, descChanged, descFailing, descModule, descPluginUp, descPluginRst, descReady, descKubeSynced, descServices} {
		ch <- d
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	if rows, err := c.src.Packets(); err == nil {
		for _, r := range rows {
			ch <- prometheus.MustNewConstMetric(descPackets, prometheus.CounterValue, float64(r.Packets), r.Hook, r.Reason)
			ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(r.Bytes), r.Hook, r.Reason)
		}
	} else {
		ch <- prometheus.NewInvalidMetric(descPackets, err)
	}
	st := c.src.Status()
	ch <- prometheus.MustNewConstMetric(descReady, prometheus.GaugeValue, b2f(st.Ready))
	for _, m := range st.Maps {
		ch <- prometheus.MustNewConstMetric(descMapEntries, prometheus.GaugeValue, float64(m.Entries), m.Name)
		ch <- prometheus.MustNewConstMetric(descMapMax, prometheus.GaugeValue, float64(m.MaxEntries), m.Name)
	}
	if ct := st.Conntrack; ct != nil {
		ch <- prometheus.MustNewConstMetric(descCTPasses, prometheus.CounterValue, float64(ct.Passes))
		ch <- prometheus.MustNewConstMetric(descCTDeleted, prometheus.GaugeValue, float64(ct.Deleted))
		ch <- prometheus.MustNewConstMetric(descCTPressure, prometheus.GaugeValue, b2f(ct.Pressure))
	}
	if s := st.Services; s != nil {
		ch <- prometheus.MustNewConstMetric(descPasses, prometheus.CounterValue, float64(s.Full), "true")
		ch <- prometheus.MustNewConstMetric(descPasses, prometheus.CounterValue, float64(s.Passes-s.Full), "false")
		ch <- prometheus.MustNewConstMetric(descChanged, prometheus.CounterValue, float64(s.Services))
		ch <- prometheus.MustNewConstMetric(descFailing, prometheus.GaugeValue, b2f(s.Error != ""))
	}
	for _, m := range st.Modules {
		ch <- prometheus.MustNewConstMetric(descModule, prometheus.GaugeValue, 1, m, st.Pool)
	}
	for _, p := range st.Plugins {
		if p.Enabled {
			ch <- prometheus.MustNewConstMetric(descPluginUp, prometheus.GaugeValue, b2f(p.PID != 0), p.Name, p.Version)
		}
		ch <- prometheus.MustNewConstMetric(descPluginRst, prometheus.CounterValue, float64(p.Restarts), p.Name)
	}
	if k := st.Kubernetes; k != nil {
		ch <- prometheus.MustNewConstMetric(descKubeSynced, prometheus.GaugeValue, b2f(k.Synced))
		ch <- prometheus.MustNewConstMetric(descServices, prometheus.GaugeValue, float64(k.Services))
	}
}
