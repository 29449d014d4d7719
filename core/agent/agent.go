// Package agent composes a node's agent with go.uber.org/fx: core services
// (datapath, desired-state store, API, reconciler, sources) plus the modules
// the node's configuration and pool select. Slots are numbered by core's
// table and modules start in requirement order; nothing depends on the order
// in which fx hands over its value groups.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"go.uber.org/fx"
	"go.uber.org/fx/fxevent"

	"github.com/weirnet/weir/core/api"
	"github.com/weirnet/weir/core/config"
	"github.com/weirnet/weir/core/ctgc"
	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/filesource"
	"github.com/weirnet/weir/core/ipcache"
	"github.com/weirnet/weir/core/k8ssource"
	"github.com/weirnet/weir/core/lbmap"
	"github.com/weirnet/weir/core/metrics"
	"github.com/weirnet/weir/core/model"
	"github.com/weirnet/weir/core/module"
	"github.com/weirnet/weir/core/mounts"
	"github.com/weirnet/weir/core/node"
	"github.com/weirnet/weir/core/pluginhost"
	"github.com/weirnet/weir/core/slots"
)

// Options are the agent's command-line settings.
type Options struct {
	ConfigPath   string
	NodeName     string
	NodeLabels   map[string]string
	PinDir       string
	StateDir     string
	ServicesFile string
	APISocket    string
	Cgroup       string
	// Kubeconfig is the Kubernetes client configuration; empty uses the
	// in-cluster configuration when there is one, and otherwise the agent
	// runs standalone.
	Kubeconfig string
	// Standalone never talks to Kubernetes, whatever the environment
	// says (an in-cluster service account inherited by a test or lab).
	Standalone bool
	// PodCIDRs are the node's pod ranges in standalone mode; with
	// Kubernetes they come from the Node.
	PodCIDRs []string
	// NodeIP is the node's address toward other nodes (default: the
	// Node's InternalIP, else the uplink's first address); Uplink names
	// the device (default: the one holding NodeIP, else the default
	// route's).
	NodeIP string
	Uplink string
	// MetricsAddr is where Prometheus metrics, /healthz and /readyz are
	// served (empty: not served).
	MetricsAddr string
	Logger      *slog.Logger
	// OnSettled, when set, is called once every source synced and the
	// service maps hold their first full state (the end of the start).
	OnSettled func()
}

// Validate checks the options that have no sensible default.
func (o *Options) Validate() error {
	var errs []error
	if o.ConfigPath == "" {
		errs = append(errs, errors.New("--config is required"))
	}
	if o.NodeName == "" {
		errs = append(errs, errors.New("--node-name is required"))
	}
	if o.PinDir == "" {
		errs = append(errs, errors.New("--pin-dir is required"))
	}
	if o.StateDir == "" {
		errs = append(errs, errors.New("--state-dir is required"))
	}
	if o.APISocket == "" {
		errs = append(errs, errors.New("--api-socket is required"))
	}
	return errors.Join(errs...)
}

// Agent is a composed agent.
type Agent struct {
	App       *fx.App
	Effective *config.Effective
	// Restart receives a reason when the node's labels or the
	// configuration file select another module set or other settings: the
	// caller stops the app and starts the agent again.
	Restart <-chan string
}

// New loads the configuration, learns the node's labels (from its Node
// when Kubernetes is configured), resolves the node's pool and builds the
// agent. Configuration errors come back before anything is touched.
func New(opts Options, cat module.Catalog) (*Agent, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	// Plugins first: the modules they bring are part of the catalog the
	// configuration is checked against.
	decls, err := config.ReadPlugins(opts.ConfigPath)
	if err != nil {
		return nil, err
	}
	plugins, err := pluginhost.StartAll(decls, opts.Logger)
	if err != nil {
		return nil, err
	}
	composed := false
	defer func() {
		if !composed {
			for _, p := range plugins {
				p.Kill()
			}
		}
	}()
	if len(plugins) > 0 {
		var extra []module.Factory
		for _, p := range plugins {
			extra = append(extra, p.Factory())
		}
		if cat, err = module.Extend(cat, extra...); err != nil {
			return nil, err
		}
	}
	cfg, err := config.Load(opts.ConfigPath, cat)
	if err != nil {
		return nil, err
	}
	client, err := kubeClient(opts.Kubeconfig, opts.Standalone)
	if err != nil {
		return nil, err
	}
	facts := &nodeFacts{Labels: opts.NodeLabels, PodCIDRs: opts.PodCIDRs}
	if client != nil {
		routeKlog(opts.Logger)
		var from string
		facts, from = readNode(context.Background(), client, &opts)
		opts.Logger.Info("node labels", "from", from, "labels", facts.Labels)
	}
	eff, err := cfg.Resolve(facts.Labels)
	if err != nil {
		return nil, err
	}
	info := &node.Info{
		Name: opts.NodeName, Labels: facts.Labels, Pool: eff.Pool,
		PinDir: opts.PinDir, StateDir: opts.StateDir, Cgroup: opts.Cgroup,
	}
	if info.Uplink, err = findUplink(&opts, facts); err != nil {
		// Only forwarding between nodes needs it; those modules say so.
		opts.Logger.Warn("no uplink toward other nodes", "err", err)
	} else {
		opts.Logger.Info("uplink", "device", info.Uplink.Name, "ip", info.Uplink.IP, "mtu", info.Uplink.MTU)
	}
	ns := &nodeState{}
	ns.set(facts)
	rs := newRestarter()
	ls := &layers{}
	w := &watcher{cfg: cfg, running: eff, node: ns, restart: rs, log: opts.Logger, catalog: cat, path: opts.ConfigPath, plugins: decls, live: ls}
	log := opts.Logger
	var kube fx.Option = fx.Options()
	if client != nil {
		kube = fx.Options(fx.Supply(client), fx.Provide(newKubeSource), fx.Invoke(startKube))
	}
	app := fx.New(
		appOptions(log),
		fx.Supply(info, log, eff, &opts, &installed{}, ns, w, &reports{plugins: plugins}),
		fx.Invoke(func(lc fx.Lifecycle) {
			lc.Append(fx.StopHook(func() {
				for _, p := range plugins {
					p.Kill()
				}
			}))
		}),
		fx.Provide(newDatapath, model.NewStore, newAPI, newCTGC),
		// Invoke order is start order: datapath and the module set's
		// layer, then the API (so no request reaches a module before it
		// started), then the sources of services.
		fx.Invoke(func(p layerParams) { startLayers(ls, p) }),
		// Topology hints choose backends by the node's zone.
		fx.Invoke(func(store *model.Store, info *node.Info) { store.SetZone(info.Labels[model.ZoneLabel]) }),
		fx.Invoke(serveAPI),
		fx.Invoke(startSources),
		kube,
		fx.Invoke(watchConfig),
		fx.Invoke(settleMemory),
	)
	if err := app.Err(); err != nil {
		return nil, fmt.Errorf("composing the agent: %w", err)
	}
	composed = true
	return &Agent{App: app, Effective: eff, Restart: rs.ch}, nil
}

// appOptions are what the base's and every layer's fx app share: fx's
// log at debug level, and start and stop bounds.
func appOptions(log *slog.Logger) fx.Option {
	return fx.Options(
		fx.WithLogger(func() fxevent.Logger {
			l := &fxevent.SlogLogger{Logger: log.With("component", "fx")}
			l.UseLogLevel(slog.LevelDebug)
			return l
		}),
		// Loading BPF objects runs the verifier inside OnStart.
		fx.StartTimeout(2*time.Minute),
		fx.StopTimeout(30*time.Second),
	)
}

// newDatapath loads nothing until the agent starts: composing an agent
// (fx.New) never touches the node.
func newDatapath(lc fx.Lifecycle, info *node.Info, eff *config.Effective, log *slog.Logger) (*datapath.Datapath, error) {
	cgroup := info.Cgroup
	if cgroup == "" {
		// Socket hooks default to every socket of the machine; only a
		// module that claims one needs it, and says so if it is missing.
		cgroup, _ = mounts.Cgroup2Root()
	}
	dp, err := datapath.New(datapath.Options{PinDir: info.PinDir, Cgroup: cgroup, MaxEntries: eff.Datapath.MaxEntries(), Logger: log})
	if err != nil {
		return nil, err
	}
	lc.Append(fx.Hook{OnStart: func(context.Context) error { return dp.Load() }, OnStop: func(context.Context) error { return dp.Close() }})
	return dp, nil
}

// newCTGC collects expired conntrack entries from start to stop.
func newCTGC(lc fx.Lifecycle, dp *datapath.Datapath, eff *config.Effective, log *slog.Logger) (*ctgc.GC, error) {
	interval, lo, hi, field, err := eff.Datapath.GCIntervals()
	if err != nil {
		return nil, fmt.Errorf("datapath.%s: %w", field, err)
	}
	g := ctgc.New(ctgc.Options{Map: dp.CT, NAT: dp.NAT, NATStats: dp.NATStats, Interval: interval, MinInterval: lo, MaxInterval: hi, Log: log.With("component", "ctgc")})
	background(lc, g.Run)
	background(lc, func(ctx context.Context) { g.WatchNAT(ctx, time.Second) })
	return g, nil
}

func newAPI(opts *Options, log *slog.Logger) *api.Server {
	return api.NewServer(opts.APISocket, log.With("component", "api"))
}

// newReconciler is constructed only when a module asks for it (lb today):
// nodes that translate no services leave the service maps alone.
func newReconciler(lc fx.Lifecycle, dp *datapath.Datapath, store *model.Store, info *node.Info, eff *config.Effective, rep *reports, log *slog.Logger) *lbmap.Reconciler {
	r := lbmap.NewFromDatapath(dp, log.With("component", "lbmap"))
	r.SetNode(info.Name)
	r.OnPass(rep.observePass)
	// Set when the layer starts, cleared when it stops: a module set
	// applied live builds its reconciler while the previous one runs.
	d := eff.Datapath
	lc.Append(fx.Hook{
		OnStart: func(context.Context) error {
			rep.set(func(rp *reports) { rp.lb = r })
			// Updates that would not fit the maps are refused by the
			// store, before anything is written: the previous state
			// keeps serving.
			store.SetAdmitter(lbmap.NewAdmission(info.Name, lbmap.Limits{
				Services: int(d.ServicesMaxEntries), Backends: int(d.BackendsMaxEntries), RevNAT: int(d.RevNATMaxEntries)}))
			return nil
		},
		OnStop: func(context.Context) error {
			store.SetAdmitter(nil)
			rep.set(func(rp *reports) {
				if rp.lb == r {
					rp.lb = nil
				}
			})
			return nil
		},
	})
	background(lc, func(ctx context.Context) { r.Run(ctx, store) })
	return r
}

// background runs fn from start to stop of the agent: its context ends at
// stop, which waits for fn to return.
func background(lc fx.Lifecycle, fn func(ctx context.Context)) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	lc.Append(fx.Hook{
		OnStart: func(context.Context) error {
			wg.Go(func() { fn(ctx) })
			return nil
		},
		OnStop: func(context.Context) error {
			cancel()
			wg.Wait()
			return nil
		},
	})
}

// findUplink resolves the node's address and uplink from the flags, then
// the Node's InternalIP.
func findUplink(opts *Options, facts *nodeFacts) (node.Uplink, error) {
	ipText := opts.NodeIP
	if ipText == "" {
		ipText = facts.IP
	}
	var ip netip.Addr
	if ipText != "" {
		var err error
		if ip, err = netip.ParseAddr(ipText); err != nil || !ip.Is4() {
			return node.Uplink{}, fmt.Errorf("node address %q is not IPv4", ipText)
		}
	}
	return node.FindUplink(opts.Uplink, ip)
}

// newIPCache is constructed only when a forwarding module asks for it.
// Whether a peer is reached through the tunnel depends on its pool, which
// its labels decide under the same configuration.
type ipcacheParams struct {
	fx.In
	LC        fx.Lifecycle
	DP        *datapath.Datapath
	Store     *model.Store
	Info      *node.Info
	Eff       *config.Effective
	W         *watcher
	Log       *slog.Logger
	Overheads []module.MTUOverhead `group:"mtu-overhead"`
}

func newIPCache(p ipcacheParams) *ipcache.Reconciler {
	lc, dp, store, info, eff, w, log := p.LC, p.DP, p.Store, p.Info, p.Eff, p.W, p.Log
	selfKey := module.EncapsulationKey(eff.Settings)
	tunnelMTU := 0
	if selfKey != "" && info.Uplink.MTU > 0 {
		tunnelMTU = info.Uplink.MTU
		for _, o := range p.Overheads {
			tunnelMTU = min(tunnelMTU, info.Uplink.MTU-int(o))
		}
	}
	r := ipcache.New(ipcache.Options{
		Map:       func() ipcache.Map { return dp.IPCache() },
		Self:      info.Name,
		SelfKey:   selfKey,
		PeerKey:   w.encapsulationOf,
		Uplink:    info.Uplink,
		Routes:    true,
		TunnelMTU: tunnelMTU,
		Log:       log.With("component", "ipcache"),
	})
	lc.Append(fx.StopHook(w.OnConfig(r.Refresh)))
	background(lc, func(ctx context.Context) { r.Run(ctx, store) })
	return r
}

// reports are the parts of the agent that say what they did, for its
// status; each registers itself once built (a node without lb has no
// reconciler).
type reports struct {
	mu      sync.Mutex
	lb      *lbmap.Reconciler
	file    *filesource.Source
	kube    *k8ssource.Source
	plugins []*pluginhost.Plugin
	// observe hears of every reconciler pass (the metrics' histogram).
	observe func(took time.Duration, full bool)
}

// observePass forwards a reconciler pass to the metrics, when served.
func (r *reports) observePass(took time.Duration, full bool) {
	r.mu.Lock()
	f := r.observe
	r.mu.Unlock()
	if f != nil {
		f(took, full)
	}
}

func (r *reports) set(f func(*reports)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	f(r)
}

// fill adds what the parts report to a status.
func (r *reports) fill(st *api.Status) {
	r.mu.Lock()
	lb, file, kube := r.lb, r.file, r.kube
	r.mu.Unlock()
	if lb != nil {
		s := lb.Status()
		st.Services = &s
		st.Maps = append(st.Maps, s.Maps...)
	}
	if file != nil {
		f := file.Status()
		st.File = &f
	}
	if kube != nil {
		k := kube.Stats()
		st.Kubernetes = &k
	}
}

// installed is set once the datapath and modules run.
type installed struct{ ok atomic.Bool }

type composeParams struct {
	fx.In
	LC      fx.Lifecycle
	Done    *installed
	Info    *node.Info
	DP      *datapath.Datapath
	Eff     *config.Effective
	Log     *slog.Logger
	Comp    *composition
	Modules []module.Module `group:"modules"`
}

// composition is a layer's BPF: loaded and verified by prepare (before
// the running layer stops, when a module set is applied live), put into
// the slots when the layer starts.
type composition struct {
	prepare  func() error
	prepared *datapath.Prepared
	// specs are the objects the modules gave, by module, and inst what
	// was installed from them: a module set applied live reuses the
	// loaded objects of modules whose spec did not change (no second
	// verification).
	specs map[string]*ebpf.CollectionSpec
	inst  *datapath.Installation
	// prev is the running set's composition while this one prepares.
	prev *composition
}

// reusable is the running set's loaded object for a module whose spec is
// the same as spec, or nil.
func (c *composition) reusable(module string, spec *ebpf.CollectionSpec) *ebpf.Collection {
	if c.prev == nil || c.prev.inst == nil {
		return nil
	}
	old, coll := c.prev.specs[module], c.prev.inst.Collections[module]
	if old == nil || coll == nil || !datapath.SameSpec(old, spec) {
		return nil
	}
	return coll
}

// release drops prepared objects that were not installed.
func (c *composition) release() {
	if c.prepared != nil {
		c.prepared.Close()
		c.prepared = nil
	}
}

func compose(p composeParams) error {
	byName := map[string]module.Module{}
	for _, m := range p.Modules {
		byName[m.Name()] = m
	}
	// Start order comes from the configuration (requirements first).
	var ordered []module.Module
	for _, f := range p.Eff.Modules {
		m, ok := byName[f.Name]
		if !ok {
			return fmt.Errorf("module %s was enabled but provided no instance", f.Name)
		}
		ordered = append(ordered, m)
	}
	done := p.Done
	var inst *datapath.Installation
	var started []module.Module
	p.Comp.prepare = func() error {
		var objs []datapath.Object
		specs := map[string]*ebpf.CollectionSpec{}
		for i, m := range ordered {
			spec, err := m.Object()
			if err != nil {
				return fmt.Errorf("module %s: reading its BPF object: %w", m.Name(), err)
			}
			if spec == nil {
				continue
			}
			specs[m.Name()] = spec
			claims := map[string]string{}
			for _, c := range p.Eff.Modules[i].Slots {
				claims[c.Slot] = c.Program
			}
			hooks := map[string]string{}
			for _, c := range p.Eff.Modules[i].Cgroup {
				hooks[c.Hook] = c.Program
			}
			objs = append(objs, datapath.Object{Module: m.Name(), Spec: spec, Slots: claims, Cgroup: hooks, Plugin: p.Eff.Modules[i].Plugin,
				Reuse: p.Comp.reusable(m.Name(), spec)})
		}
		pr, err := p.DP.Prepare(objs)
		if err != nil {
			return err
		}
		// Reused objects now belong to this set: the running one must
		// not release them when it stops.
		var reused []string
		for _, o := range objs {
			if o.Reuse != nil {
				delete(p.Comp.prev.inst.Collections, o.Module)
				reused = append(reused, o.Module)
			}
		}
		if len(reused) > 0 {
			p.Log.Info("loaded objects kept from the running module set (their specs did not change)", "modules", reused)
		}
		p.Comp.prepared, p.Comp.specs, p.Comp.prev = pr, specs, nil
		return nil
	}
	p.LC.Append(fx.Hook{
		OnStart: func(ctx context.Context) error {
			if p.Comp.prepared == nil {
				if err := p.Comp.prepare(); err != nil {
					return err
				}
			}
			var err error
			inst, err = p.DP.Fill(p.Comp.prepared)
			p.Comp.prepared = nil
			if err != nil {
				return err
			}
			p.Comp.inst = inst
			// The new stages run (for hooks that moved); what old ones
			// wrote meanwhile follows before the hooks move.
			p.DP.CatchUp()
			if err := attachUplink(p.DP, p.Info, p.Eff); err != nil {
				return err
			}
			for _, m := range ordered {
				if l, ok := m.(module.Loaded); ok && inst.Collections[m.Name()] != nil {
					if err := l.Loaded(inst.Collections[m.Name()]); err != nil {
						return fmt.Errorf("module %s: %w", m.Name(), err)
					}
				}
			}
			for _, m := range ordered {
				st, ok := m.(module.Starter)
				if !ok {
					continue
				}
				if err := st.Start(ctx); err != nil {
					for _, s := range slices.Backward(started) {
						if sp, ok := s.(module.Stopper); ok {
							_ = sp.Stop(ctx)
						}
					}
					return fmt.Errorf("starting module %s: %w", m.Name(), err)
				}
				started = append(started, m)
			}
			// Every hook runs this agent's entry programs now: a load
			// that replaced maps can let the old ones go.
			if err := p.DP.FinishMigration(); err != nil {
				p.Log.Warn("releasing the datapath of the previous agent", "err", err)
			}
			done.ok.Store(true)
			names := make([]string, len(ordered))
			for i, m := range ordered {
				names[i] = m.Name()
			}
			p.Log.Info("datapath installed", "modules", names, "pool", p.Eff.Pool, "pin_dir", p.DP.PinDir())
			return nil
		},
		OnStop: func(ctx context.Context) error {
			var errs []error
			for _, m := range slices.Backward(started) {
				sp, ok := m.(module.Stopper)
				if !ok {
					continue
				}
				if err := sp.Stop(ctx); err != nil {
					errs = append(errs, fmt.Errorf("stopping module %s: %w", m.Name(), err))
				}
			}
			if inst != nil {
				inst.Close()
			}
			return errors.Join(errs...)
		},
	})
	return nil
}

// attachUplink runs the netdev-ingress entry on the uplink when a module
// has a stage there, and removes it otherwise.
func attachUplink(dp *datapath.Datapath, info *node.Info, eff *config.Effective) error {
	if !info.Uplink.Valid() {
		return nil
	}
	for _, h := range []slots.Hook{slots.NetdevIngress, slots.NetdevEgress} {
		claimed := false
		for _, f := range eff.Modules {
			for _, c := range f.Slots {
				if s, _ := slots.Lookup(c.Slot); s.Hook == h {
					claimed = true
				}
			}
		}
		var err error
		if claimed {
			err = dp.Attach(info.Uplink.Index, info.Uplink.Name, h)
		} else {
			err = dp.Detach(info.Uplink.Name, h)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

type serveParams struct {
	fx.In
	LC        fx.Lifecycle
	API       *api.Server
	Info      *node.Info
	Eff       *config.Effective
	Store     *model.Store
	Installed *installed
	Node      *nodeState
	GC        *ctgc.GC
	DP        *datapath.Datapath
	Reports   *reports
	W         *watcher
	Opts      *Options
	Log       *slog.Logger
}

func serveAPI(p serveParams) error {
	p.API.Handle("GET /v1/status", func(w http.ResponseWriter, _ *http.Request) {
		api.WriteJSON(w, http.StatusOK, statusOf(p))
	})
	p.LC.Append(fx.Hook{OnStart: func(context.Context) error { return p.API.Start() }, OnStop: p.API.Stop})
	if p.Opts.MetricsAddr == "" {
		return nil
	}
	var started atomic.Bool
	ms := metrics.New(p.Opts.MetricsAddr, metrics.Sources{
		Status: func() api.Status { return statusOf(p) },
		Packets: func() ([]datapath.MetricRow, error) {
			m, err := p.DP.Map(datapath.MapMetrics)
			if err != nil || m == nil {
				return nil, fmt.Errorf("the datapath is not loaded")
			}
			return datapath.ReadMetrics(m)
		},
		Healthy: started.Load,
		Ready:   p.ready,
	}, p.Log.With("component", "metrics"))
	p.Reports.set(func(r *reports) { r.observe = ms.ObservePass })
	p.LC.Append(fx.Hook{
		OnStart: func(context.Context) error {
			if err := ms.Start(); err != nil {
				return err
			}
			started.Store(true)
			return nil
		},
		OnStop: ms.Stop,
	})
	return nil
}

// ready says whether the datapath is programmed from synced sources.
func (p serveParams) ready() bool { return p.Installed.ok.Load() && p.Store.Ready() }

// statusOf is the agent's status, for weir status and the metrics.
func statusOf(p serveParams) api.Status {
	_, cidrs := p.Node.get()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	eff := p.W.effective()
	slotsOf := map[string][]string{}
	for _, f := range eff.Modules {
		for _, c := range f.Slots {
			slotsOf[f.Name] = append(slotsOf[f.Name], c.Slot)
		}
		for _, c := range f.Cgroup {
			slotsOf[f.Name] = append(slotsOf[f.Name], c.Hook)
		}
	}
	st := api.Status{
		Node: p.Info.Name, Pool: eff.Pool, Modules: moduleNames(eff), Slots: slotsOf, PinDir: p.Info.PinDir,
		Ready: p.ready(), PodCIDRs: cidrs, HeapBytes: ms.HeapInuse,
	}
	if gc := p.GC.Stats(); gc.Passes > 0 {
		st.Conntrack = &gc
	}
	p.Reports.fill(&st)
	for _, pl := range p.Reports.plugins {
		st.Plugins = append(st.Plugins, pl.Status(slices.Contains(st.Modules, pl.Decl.Name)))
	}
	if p.Installed.ok.Load() {
		st.Maps = append(st.Maps, countedMaps(p.DP, st.Conntrack)...)
		for _, h := range slots.CgroupHooks() {
			if prog, err := p.DP.CgroupAttached(h.Name); err == nil && prog != "" {
				if st.CgroupHooks == nil {
					st.CgroupHooks, st.Cgroup = map[string]string{}, p.DP.Cgroup()
				}
				st.CgroupHooks[h.Name] = prog
			}
		}
	}
	return st
}

// countedMaps says how full the maps the reconcilers do not count are:
// conntrack from the collector's last pass, the others counted now (they
// are small, or bounded).
func countedMaps(dp *datapath.Datapath, ct *ctgc.Stats) []lbmap.MapFill {
	var out []lbmap.MapFill
	for _, name := range []string{datapath.MapCT, datapath.MapNAT, datapath.MapAffinity, datapath.MapFrags, datapath.MapEndpoints, datapath.MapIPCache} {
		m, err := dp.Map(name)
		if err != nil || m == nil {
			continue
		}
		f := lbmap.MapFill{Name: name, MaxEntries: int(m.MaxEntries())}
		if name == datapath.MapCT && ct != nil {
			f.Entries = ct.Entries
		} else if name == datapath.MapNAT && ct != nil && ct.NAT != nil {
			f.Entries = ct.NAT.Entries
		} else if n, err := datapath.CountEntries(m); err == nil {
			f.Entries = n
		}
		out = append(out, f)
	}
	return out
}

type sourceParams struct {
	fx.In
	LC      fx.Lifecycle
	Opts    *Options
	Store   *model.Store
	Log     *slog.Logger
	Reports *reports
}

func startSources(p sourceParams) error {
	if p.Opts.ServicesFile == "" {
		return nil
	}
	src := filesource.New(p.Opts.ServicesFile, p.Store, p.Log.With("source", "file"))
	p.Reports.set(func(r *reports) { r.file = src })
	p.Store.Expect(filesource.Name)
	background(p.LC, func(ctx context.Context) {
		if err := src.Load(); err != nil {
			// A bad file at start leaves the maps as the previous agent
			// left them; the watcher applies the file once it is fixed.
			p.Log.Error("services file rejected; keeping the services already in the datapath", "file", p.Opts.ServicesFile, "err", err)
		}
		src.Watch(ctx)
	})
	return nil
}
