package model

import (
	"context"
	"log/slog"
	"time"
)

// retryBackoff is the next wait after a failed apply: 100 ms doubling to
// 30 s.
func retryBackoff(prev time.Duration) time.Duration {
	return min(max(2*prev, 100*time.Millisecond), 30*time.Second)
}

// FollowNodes calls apply with the store's nodes whenever they change (or
// kick fires: for appliers whose result depends on more than the nodes,
// the configuration say), once the store is authoritative, until ctx
// ends. A failed apply is retried with exponential backoff (100 ms to
// 30 s); nodes already applied are not applied again. what names the work
// in logs.
func FollowNodes(ctx context.Context, store *Store, kick <-chan struct{}, log *slog.Logger, what string, apply func([]*Node) error) {
	changed := store.SubscribeNodes()
	backoff := time.Duration(0)
	var retry <-chan time.Time
	var applied uint64
	var haveApplied bool
	for {
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-retry:
		case <-kick:
			haveApplied = false
		}
		retry = nil
		nodes, version, ready := store.Nodes()
		if !ready || haveApplied && version == applied && backoff == 0 {
			continue
		}
		if err := apply(nodes); err != nil {
			backoff = retryBackoff(backoff)
			log.Error(what+" failed; retrying", "err", err, "retry_in", backoff)
			retry = time.After(backoff)
			continue
		}
		backoff = 0
		applied, haveApplied = version, true
	}
}

// FollowServices calls apply with the services that changed, as a
// watcher of the store reports them, until ctx ends: each change is
// applied once, and changes that arrive while one is applied are applied
// together next. A failed apply is retried with exponential backoff
// (100 ms to 30 s) as a full resync, since what it left in the datapath
// is unknown.
func FollowServices(ctx context.Context, store *Store, log *slog.Logger, what string, apply func(Delta) error) {
	w := store.Watch()
	backoff := time.Duration(0)
	var retry <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.C():
		case <-retry:
		}
		retry = nil
		d, ready := w.Next()
		if !ready {
			continue
		}
		if !d.Full && len(d.Services) == 0 && backoff == 0 {
			continue
		}
		if err := apply(d); err != nil {
			backoff = retryBackoff(backoff)
			log.Error(what+" failed; retrying", "err", err, "retry_in", backoff)
			w.Resync()
			// The resync's notification is read now; the retry waits
			// for the backoff (or another change).
			select {
			case <-w.C():
			default:
			}
			retry = time.After(backoff)
			continue
		}
		backoff = 0
	}
}
