package agent

import (
	"context"
	"log/slog"
	"os"
	"runtime/debug"

	"go.uber.org/fx"

	"github.com/weirnet/weir/core/model"
)

// settledGCPercent is the garbage collector's target once the agent has
// synced: the heap then changes little (one service at a time), so
// collecting when it grew by a quarter costs little CPU and keeps the
// resident memory near what is live. Listing tens of thousands of objects
// at start runs with Go's default (100), which is faster while most of
// what is allocated is garbage.
const settledGCPercent = 50

// settleMemory waits until every source synced and the service maps hold
// their first full state, then hands the start's garbage back to the
// system and tightens the collector. A GOGC in the environment is the
// operator's choice and is left alone.
func settleMemory(lc fx.Lifecycle, store *model.Store, rep *reports, opts *Options, log *slog.Logger) {
	background(lc, func(ctx context.Context) {
		changed := store.Subscribe()
		for !store.Ready() {
			select {
			case <-ctx.Done():
				return
			case <-changed:
			}
		}
		rep.mu.Lock()
		lb := rep.lb
		rep.mu.Unlock()
		if lb != nil {
			select {
			case <-ctx.Done():
				return
			case <-lb.Written():
			}
		}
		if _, set := os.LookupEnv("GOGC"); !set {
			debug.SetGCPercent(settledGCPercent)
		}
		debug.FreeOSMemory()
		log.Debug("memory settled after the first sync", "gc_percent", settledGCPercent)
		if opts.OnSettled != nil {
			opts.OnSettled()
		}
	})
}
