package model

import (
	"context"
	"log/slog"
	"time"
)

// Follow calls apply with the store's snapshot whenever the store changes,
// once it is authoritative, until ctx ends. A failed apply is retried with
// exponential backoff (100 ms to 30 s); a snapshot already applied is not
// applied again. what names the work in logs.
func Follow(ctx context.Context, store *Store, log *slog.Logger, what string, apply func(*Snapshot) error) {
	FollowKicked(ctx, store, nil, log, what, apply)
}

// FollowKicked is Follow that also applies the current snapshot again
// whenever kick fires: for appliers whose result depends on more than the
// snapshot (the configuration, say).
func FollowKicked(ctx context.Context, store *Store, kick <-chan struct{}, log *slog.Logger, what string, apply func(*Snapshot) error) {
	changed := store.Subscribe()
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
		snap, version, ready := store.Snapshot()
		if !ready || haveApplied && version == applied && backoff == 0 {
			continue
		}
		if err := apply(snap); err != nil {
			backoff = min(max(2*backoff, 100*time.Millisecond), 30*time.Second)
			log.Error(what+" failed; retrying", "err", err, "retry_in", backoff)
			retry = time.After(backoff)
			continue
		}
		backoff = 0
		applied, haveApplied = version, true
	}
}
