package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"
	"go.uber.org/fx"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"

	"github.com/weirnet/weir/core/config"
	"github.com/weirnet/weir/core/k8ssource"
	"github.com/weirnet/weir/core/kube"
	"github.com/weirnet/weir/core/model"
	"github.com/weirnet/weir/core/module"
	"github.com/weirnet/weir/core/node"
)

// kubeClient builds the agent's Kubernetes client, or returns nil to run
// standalone (see kube.Config).
func kubeClient(kubeconfig string, standalone bool) (*kube.Client, error) {
	cfg, err := kube.Config(kubeconfig, standalone)
	if err != nil || cfg == nil {
		return nil, err
	}
	return kube.New(cfg)
}

// routeKlog sends client-go's logs through slog.
func routeKlog(log *slog.Logger) {
	klog.SetSlogLogger(log.With("component", "client-go"))
}

// nodeFacts is what the agent remembers of its Node between runs, so that
// an agent starting while the API is unreachable composes the same modules.
type nodeFacts struct {
	Labels   map[string]string `json:"labels"`
	PodCIDRs []string          `json:"podCIDRs"`
	// IP is the Node's IPv4 InternalIP.
	IP string `json:"ip,omitempty"`
}

func factsFile(stateDir string) string { return filepath.Join(stateDir, "node.json") }

func loadFacts(stateDir string) (*nodeFacts, error) {
	data, err := os.ReadFile(factsFile(stateDir))
	if err != nil {
		return nil, err
	}
	var f nodeFacts
	return &f, json.Unmarshal(data, &f)
}

func saveFacts(stateDir string, f *nodeFacts) error {
	data, err := json.Marshal(f)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return err
	}
	tmp := factsFile(stateDir) + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, factsFile(stateDir))
}

func factsOf(n *corev1.Node) *nodeFacts {
	f := &nodeFacts{Labels: maps.Clone(n.Labels), PodCIDRs: n.Spec.PodCIDRs}
	if len(f.PodCIDRs) == 0 && n.Spec.PodCIDR != "" {
		f.PodCIDRs = []string{n.Spec.PodCIDR}
	}
	if m := k8ssource.ConvertNode(n); m != nil {
		f.IP = m.IP.String()
	}
	return f
}

// readNode fetches the agent's Node to learn its labels before composing
// the modules. When the API does not answer in time, the facts of the last
// run are used (the watcher restarts the agent if they turn out stale).
func readNode(ctx context.Context, client *kube.Client, opts *Options) (*nodeFacts, string) {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	var err error
	for backoff := 250 * time.Millisecond; ; backoff = min(2*backoff, 4*time.Second) {
		var n *corev1.Node
		n, err = client.Node(ctx, opts.NodeName)
		if err == nil {
			f := factsOf(n)
			if serr := saveFacts(opts.StateDir, f); serr != nil {
				opts.Logger.Warn("saving node facts", "err", serr)
			}
			return f, "Node " + opts.NodeName
		}
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
			continue
		}
		break
	}
	opts.Logger.Error("reading this node's Node object failed", "node", opts.NodeName, "err", err)
	if f, lerr := loadFacts(opts.StateDir); lerr == nil {
		return f, "labels saved by the previous run"
	}
	return &nodeFacts{Labels: opts.NodeLabels, PodCIDRs: opts.PodCIDRs}, "--node-labels"
}

// restarter asks the agent's main loop to restart it: the module set or
// settings for this node changed. The datapath stays up meanwhile.
type restarter struct {
	once sync.Once
	ch   chan string
}

func newRestarter() *restarter { return &restarter{ch: make(chan string, 1)} }

func (r *restarter) request(reason string) {
	r.once.Do(func() { r.ch <- reason })
}

// sameEffective reports whether two resolutions run the same agent.
func sameEffective(a, b *config.Effective) bool {
	if a.Pool != b.Pool || a.Datapath != b.Datapath || len(a.Modules) != len(b.Modules) {
		return false
	}
	for i := range a.Modules {
		if a.Modules[i].Name != b.Modules[i].Name {
			return false
		}
	}
	return reflect.DeepEqual(a.Settings, b.Settings)
}

func moduleNames(e *config.Effective) []string {
	out := make([]string, len(e.Modules))
	for i, f := range e.Modules {
		out[i] = f.Name
	}
	return out
}

// nodeState is what the agent currently knows of its node.
type nodeState struct {
	mu       sync.Mutex
	labels   map[string]string
	podCIDRs []string
}

func (n *nodeState) set(f *nodeFacts) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.labels, n.podCIDRs = f.Labels, f.PodCIDRs
}

func (n *nodeState) get() (map[string]string, []string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.labels, n.podCIDRs
}

type kubeParams struct {
	fx.In
	LC      fx.Lifecycle
	Source  *k8ssource.Source
	Opts    *Options
	Log     *slog.Logger
	Node    *nodeState
	Watch   *watcher
	Reports *reports
	Store   *model.Store
}

// newKubeSource builds the Kubernetes source; it also tells modules which
// pods exist on the node.
func newKubeSource(client *kube.Client, opts *Options, store *model.Store, log *slog.Logger) (*k8ssource.Source, node.Pods) {
	src := k8ssource.New(client, opts.NodeName, store, log.With("source", "kubernetes"))
	return src, src
}

// startKube runs the Kubernetes source and follows this node's Node: a
// change of labels that selects another pool, other modules or settings
// restarts the agent.
func startKube(p kubeParams) {
	src := p.Source
	p.Reports.set(func(r *reports) { r.kube = src })
	src.OnNode(func(n *corev1.Node) {
		f := factsOf(n)
		p.Node.set(f)
		// A new zone is served like any change: every service again.
		p.Store.SetZone(f.Labels[model.ZoneLabel])
		if err := saveFacts(p.Opts.StateDir, f); err != nil {
			p.Log.Warn("saving node facts", "err", err)
		}
		p.Watch.check("the labels of Node " + n.Name + " changed")
	})
	background(p.LC, src.Run)
}

// watcher re-resolves the configuration for the node's current labels and
// requests a restart when the result differs from what runs.
type watcher struct {
	mu sync.Mutex
	// applyMu serialises checks: one module set is applied at a time.
	applyMu sync.Mutex
	cfg     *config.Config
	running *config.Effective
	node    *nodeState
	restart *restarter
	log     *slog.Logger
	catalog module.Catalog
	path    string
	// plugins are the plugins the running agent declared (and started).
	plugins []config.Plugin
	// live replaces the module set in the running agent.
	live *layers
	// onConfig run after each accepted configuration change.
	onConfig map[int]func()
	nextID   int
}

// encapsulationOf is the encapsulation key of a node with these labels
// under the current configuration ("" when it does not tunnel).
func (w *watcher) encapsulationOf(labels map[string]string) string {
	w.mu.Lock()
	cfg := w.cfg
	w.mu.Unlock()
	eff, err := cfg.Resolve(labels)
	if err != nil {
		return ""
	}
	return module.EncapsulationKey(eff.Settings)
}

// check re-resolves the configuration for the node's labels and applies
// what changed: live when only the module set or settings did, through
// the restart path otherwise (or when the live change failed part-way).
func (w *watcher) check(why string) {
	w.applyMu.Lock()
	defer w.applyMu.Unlock()
	w.mu.Lock()
	labels, _ := w.node.get()
	eff, err := w.cfg.Resolve(labels)
	running := w.running
	w.mu.Unlock()
	if err != nil {
		w.log.Error("resolving the configuration", "err", err)
		return
	}
	if sameEffective(running, eff) {
		return
	}
	args := []any{"pool", eff.Pool, "modules", moduleNames(eff), "was_pool", running.Pool, "was_modules", moduleNames(running)}
	ok, reason := liveApplicable(running, eff)
	if !ok || w.live == nil {
		w.log.Info(why+"; restarting with the new module set: "+reason, args...)
		w.restart.request(why)
		return
	}
	w.log.Info(why+"; applying the new module set live", args...)
	err = w.live.replace(eff)
	var kept *errKeptRunning
	switch {
	case err == nil:
		w.mu.Lock()
		w.running = eff
		w.mu.Unlock()
	case errors.As(err, &kept):
		w.log.Error("the new module set was refused; the running one goes on", "err", err)
	default:
		w.log.Error("applying the module set live failed; restarting", "err", err)
		w.restart.request(why)
	}
}

// effective is the module set that runs.
func (w *watcher) effective() *config.Effective {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.running
}

// reload reads the configuration file again after it changed; a file with
// errors is reported and the running agent stays as it is.
func (w *watcher) reload() {
	// Plugins are started before the configuration is checked against
	// what they bring: another set of them takes the restart path.
	if decls, err := config.ReadPlugins(w.path); err == nil && !reflect.DeepEqual(decls, w.plugins) && (len(decls) > 0 || len(w.plugins) > 0) {
		w.log.Info("the plugins declared in " + w.path + " changed; restarting to start them")
		w.restart.request("the plugins declared changed")
		return
	}
	cfg, err := config.Load(w.path, w.catalog)
	if err != nil {
		w.log.Error("configuration file rejected; the agent keeps running as it is", "err", err)
		return
	}
	w.mu.Lock()
	w.cfg = cfg
	refresh := slices.Collect(maps.Values(w.onConfig))
	w.mu.Unlock()
	w.check("the configuration file " + w.path + " changed")
	// This node may run on as it is while another pool changed how it
	// is reached: what depends on the peers' pools follows.
	for _, f := range refresh {
		f()
	}
}

// OnConfig registers f to run after every accepted configuration change,
// until the returned func is called.
func (w *watcher) OnConfig(f func()) (remove func()) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.onConfig == nil {
		w.onConfig = map[int]func(){}
	}
	id := w.nextID
	w.nextID++
	w.onConfig[id] = f
	return func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		delete(w.onConfig, id)
	}
}

// watchConfig follows the configuration file (its directory, so that
// replacing the file or a ConfigMap symlink swap is seen).
func watchConfig(lc fx.Lifecycle, w *watcher) error {
	fw, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watching the configuration: %w", err)
	}
	if err := fw.Add(filepath.Dir(w.path)); err != nil {
		fw.Close()
		return fmt.Errorf("watching the configuration: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	base := filepath.Base(w.path)
	lc.Append(fx.Hook{
		OnStart: func(context.Context) error {
			wg.Go(func() {
				var debounce <-chan time.Time
				for {
					select {
					case <-ctx.Done():
						return
					case ev := <-fw.Events:
						if n := filepath.Base(ev.Name); n == base || n == "..data" {
							debounce = time.After(200 * time.Millisecond)
						}
					case <-fw.Errors:
					case <-debounce:
						debounce = nil
						w.reload()
					}
				}
			})
			return nil
		},
		OnStop: func(context.Context) error {
			cancel()
			wg.Wait()
			return fw.Close()
		},
	})
	return nil
}
