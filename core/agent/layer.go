package agent

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"reflect"
	"sync"
	"time"

	"go.uber.org/fx"

	"github.com/weirnet/weir/core/api"
	"github.com/weirnet/weir/core/config"
	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/model"
	"github.com/weirnet/weir/core/node"
)

// The agent is two parts. The base lives as long as the process: the
// datapath and its pinned maps, the store and the sources that fill it,
// the API, the collector. A layer is what a module set decides: the
// modules, the reconcilers they ask for, and the composition of their BPF
// into the slots. A change of the node's labels or of the configuration
// that selects another module set or other settings is applied by
// replacing the layer, in the running process:
//
//  1. the new layer is built and its BPF objects loaded and verified (the
//     running layer is untouched: a failure here changes nothing);
//  2. the running layer's control plane stops (its programs stay in their
//     slots and keep forwarding);
//  3. the new programs replace the old slot by slot, each atomically,
//     slots nobody claims any more are emptied, and the new control plane
//     starts.
//
// Only what the base holds cannot change this way: the datapath section
// (map sizes, collector intervals) and the plugins declared; those take
// the restart path, and the log says so.

// baseParts are the base's instances a layer uses.
type baseParts struct {
	dp    *datapath.Datapath
	store *model.Store
	api   *api.Server
	opts  *Options
	log   *slog.Logger
	ns    *nodeState
	w     *watcher
	rep   *reports
	inst  *installed
	info  *node.Info
	pods  node.Pods
}

// layer is one module set, composed.
type layer struct {
	app  *fx.App
	eff  *config.Effective
	comp *composition
}

// layers holds the running layer and replaces it.
type layers struct {
	mu  sync.Mutex
	b   baseParts
	cur *layer
}

// build composes a layer for eff; nothing touches the node yet.
func (l *layers) build(eff *config.Effective) (*layer, error) {
	b := l.b
	labels, _ := b.ns.get()
	info := *b.info
	info.Pool, info.Labels = eff.Pool, maps.Clone(labels)
	var mods []fx.Option
	for _, f := range eff.Modules {
		mods = append(mods, f.Provide(eff.Settings[f.Name]))
	}
	pods := fx.Options()
	if b.pods != nil {
		p := b.pods
		pods = fx.Provide(func() node.Pods { return p })
	}
	comp := &composition{}
	log := b.log
	app := fx.New(
		appOptions(log),
		fx.Supply(b.dp, b.store, b.api, &info, log, eff, b.opts, b.inst, b.ns, b.w, b.rep, comp),
		pods,
		fx.Provide(newReconciler, newIPCache),
		fx.Options(mods...),
		fx.Invoke(compose),
	)
	if err := app.Err(); err != nil {
		return nil, fmt.Errorf("composing modules %v: %w", moduleNames(eff), err)
	}
	return &layer{app: app, eff: eff, comp: comp}, nil
}

// start builds and starts the first layer.
func (l *layers) start(ctx context.Context, eff *config.Effective) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	nl, err := l.build(eff)
	if err != nil {
		return err
	}
	if err := nl.app.Start(ctx); err != nil {
		return err
	}
	l.cur = nl
	return nil
}

// stop stops the running layer.
func (l *layers) stop(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cur == nil {
		return nil
	}
	err := l.cur.app.Stop(ctx)
	l.cur = nil
	return err
}

// current is the running layer's module set.
func (l *layers) current() *config.Effective {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cur == nil {
		return nil
	}
	return l.cur.eff
}

// errKeptRunning says the new module set was refused before anything
// changed: the running one goes on.
type errKeptRunning struct{ err error }

func (e *errKeptRunning) Error() string { return e.err.Error() }
func (e *errKeptRunning) Unwrap() error { return e.err }

// replace applies a new module set live. An error of type
// *errKeptRunning left the running set as it was; any other leaves the
// node between sets (its programs forwarding, its control plane stopped)
// and needs the restart path.
func (l *layers) replace(eff *config.Effective) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	start := time.Now()
	nl, err := l.build(eff)
	if err != nil {
		return &errKeptRunning{err}
	}
	if l.cur != nil {
		nl.comp.prev = l.cur.comp
	}
	if err := nl.comp.prepare(); err != nil {
		return &errKeptRunning{fmt.Errorf("loading the new module set's BPF: %w", err)}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if l.cur != nil {
		if err := l.cur.app.Stop(ctx); err != nil {
			l.b.log.Warn("stopping the previous module set", "err", err)
		}
	}
	l.cur = nil
	if err := nl.app.Start(ctx); err != nil {
		nl.comp.release()
		return fmt.Errorf("starting the new module set: %w", err)
	}
	l.cur = nl
	l.b.log.Info("module set applied live", "pool", eff.Pool, "modules", moduleNames(eff), "took", time.Since(start).Round(time.Millisecond))
	return nil
}

// liveApplicable says whether the running base can take eff by replacing
// the layer: everything but the datapath section, which sizes the maps
// the base holds.
func liveApplicable(running, eff *config.Effective) (bool, string) {
	if !reflect.DeepEqual(running.Datapath, eff.Datapath) {
		return false, "the datapath section changed (map sizes and collector intervals belong to the running datapath)"
	}
	return true, ""
}

type layerParams struct {
	fx.In
	LC    fx.Lifecycle
	DP    *datapath.Datapath
	Store *model.Store
	API   *api.Server
	Opts  *Options
	Log   *slog.Logger
	NS    *nodeState
	W     *watcher
	Rep   *reports
	Inst  *installed
	Info  *node.Info
	Eff   *config.Effective
	Pods  node.Pods `optional:"true"`
}

// startLayers runs the first module set's layer from start to stop of the
// base.
func startLayers(l *layers, p layerParams) {
	l.b = baseParts{dp: p.DP, store: p.Store, api: p.API, opts: p.Opts, log: p.Log, ns: p.NS, w: p.W, rep: p.Rep, inst: p.Inst, info: p.Info, pods: p.Pods}
	eff := p.Eff
	p.LC.Append(fx.Hook{
		OnStart: func(ctx context.Context) error { return l.start(ctx, eff) },
		OnStop:  l.stop,
	})
}
