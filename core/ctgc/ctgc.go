// Package ctgc collects expired conntrack entries from the agent. The
// datapath already ignores an expired entry; collecting it frees its room
// before the LRU has to evict something, possibly a live but idle flow.
// The interval adapts to how much each pass found (as Cilium's does):
// shorter while many entries expire, longer while few do, at the shortest
// while the map is under pressure.
package ctgc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/cilium/ebpf"

	"github.com/weirnet/weir/core/datapath"
)

// Defaults of the collector's intervals.
const (
	DefaultInterval    = 5 * time.Minute
	DefaultMinInterval = 10 * time.Second
	DefaultMaxInterval = 12 * time.Hour
)

// PressureFill is the fill ratio above which the map counts as under
// pressure: a warning, and passes at the shortest interval.
const PressureFill = 0.8

// Options configure a collector.
type Options struct {
	// Map returns the conntrack map (the datapath loads it at start).
	Map func() *ebpf.Map
	// Interval is the first wait and the one passes start from;
	// MinInterval and MaxInterval bound how it adapts.
	Interval, MinInterval, MaxInterval time.Duration
	Log                                *slog.Logger
	// Now is the boot clock in seconds (the clock of lifetimes);
	// datapath.BootSeconds when nil.
	Now func() (int64, error)
}

// Stats describe the last pass.
type Stats struct {
	At         time.Time     `json:"at"`
	Took       time.Duration `json:"took"`
	Entries    int           `json:"entries"` // after the pass
	MaxEntries uint32        `json:"maxEntries"`
	Fill       float64       `json:"fill"`
	Deleted    int           `json:"deleted"`
	Pressure   bool          `json:"pressure"`
	Next       time.Duration `json:"next"`
	Passes     int           `json:"passes"`
}

// GC is a conntrack collector.
type GC struct {
	opts     Options
	mu       sync.Mutex
	stats    Stats
	interval time.Duration
}

// New returns a collector; nothing runs before Run.
func New(opts Options) *GC {
	if opts.Interval <= 0 {
		opts.Interval = DefaultInterval
	}
	if opts.MinInterval <= 0 {
		opts.MinInterval = min(DefaultMinInterval, opts.Interval)
	}
	if opts.MaxInterval <= 0 {
		opts.MaxInterval = max(DefaultMaxInterval, opts.Interval)
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = datapath.BootSeconds
	}
	return &GC{opts: opts, interval: opts.Interval}
}

// Stats returns the last pass's figures.
func (g *GC) Stats() Stats {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.stats
}

// Run collects at start (a restarted agent's first pass must leave every
// live flow alone) and then at the adapting interval until ctx ends.
func (g *GC) Run(ctx context.Context) {
	for {
		st, err := g.Pass()
		if err != nil {
			g.opts.Log.Warn("conntrack collection failed", "err", err)
		}
		wait := g.interval
		if err == nil {
			wait = st.Next
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

type entry struct {
	key datapath.CTKey
	val datapath.CTEntry
}

// Pass removes every expired entry whose flow has no live entry left, and
// adapts the interval to what it found.
func (g *GC) Pass() (Stats, error) {
	m := g.opts.Map()
	if m == nil {
		return Stats{}, errors.New("no conntrack map")
	}
	start := time.Now()
	now, err := g.opts.Now()
	if err != nil {
		return Stats{}, fmt.Errorf("reading the boot clock: %w", err)
	}
	info, err := m.Info()
	if err != nil {
		return Stats{}, fmt.Errorf("reading the conntrack map: %w", err)
	}
	var (
		k       datapath.CTKey
		v       datapath.CTEntry
		total   int
		expired []entry
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		total++
		if int64(v.Lifetime) <= now {
			expired = append(expired, entry{k, v})
		}
	}
	if err := it.Err(); err != nil {
		return Stats{}, fmt.Errorf("reading the conntrack map: %w", err)
	}
	deleted := 0
	for _, e := range expired {
		// The datapath mirrors lifetimes between the two entries of a
		// flow at most a second apart: an expired entry whose twin lives
		// belongs to a live flow.
		if live, err := twinLive(m, e, now); err != nil || live {
			continue
		}
		// The datapath may have made a new flow on the key since the
		// map was read: only the entry that was read goes.
		var cur datapath.CTEntry
		if err := m.Lookup(e.key, &cur); err != nil || cur.Created != e.val.Created || cur.Lifetime != e.val.Lifetime {
			continue
		}
		err := m.Delete(e.key)
		if err == nil {
			deleted++
		} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return Stats{}, fmt.Errorf("deleting a conntrack entry: %w", err)
		}
	}
	left := total - deleted
	st := Stats{At: start, Took: time.Since(start), Entries: left, MaxEntries: info.MaxEntries, Deleted: deleted}
	if info.MaxEntries > 0 {
		st.Fill = float64(left) / float64(info.MaxEntries)
	}
	st.Pressure = st.Fill >= PressureFill
	st.Next = g.adapt(total, deleted, st.Pressure)

	g.mu.Lock()
	st.Passes = g.stats.Passes + 1
	g.stats = st
	g.mu.Unlock()

	args := []any{"entries", left, "max", info.MaxEntries, "deleted", deleted, "took", st.Took.Round(time.Millisecond), "next", st.Next}
	switch {
	case st.Pressure:
		g.opts.Log.Warn("conntrack pressure: the map is nearly full; raise datapath.ctMaxEntries", append(args, "fill", fmt.Sprintf("%.0f%%", st.Fill*100))...)
	case deleted > 0:
		g.opts.Log.Info("conntrack collected", args...)
	default:
		g.opts.Log.Debug("conntrack collected", args...)
	}
	return st, nil
}

func twinLive(m *ebpf.Map, e entry, now int64) (bool, error) {
	tk := datapath.CTKey{Saddr: e.val.NatDaddr, Daddr: e.val.NatSaddr, Sport: e.val.NatDport, Dport: e.val.NatSport, Proto: e.key.Proto}
	var t datapath.CTEntry
	err := m.Lookup(tk, &t)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	pointsBack := t.Dir != e.val.Dir && t.NatSaddr == e.key.Daddr && t.NatDaddr == e.key.Saddr &&
		t.NatSport == e.key.Dport && t.NatDport == e.key.Sport
	return pointsBack && int64(t.Lifetime) > now, nil
}

// adapt sets the next interval from the share of entries a pass deleted.
func (g *GC) adapt(total, deleted int, pressure bool) time.Duration {
	g.mu.Lock()
	defer g.mu.Unlock()
	ratio := 0.0
	if total > 0 {
		ratio = float64(deleted) / float64(total)
	}
	switch {
	case pressure:
		g.interval = g.opts.MinInterval
	case ratio > 0.25:
		g.interval = time.Duration(float64(g.interval) * (1 - ratio))
	case ratio < 0.05:
		g.interval = time.Duration(float64(g.interval) * 1.5)
	}
	g.interval = min(max(g.interval, g.opts.MinInterval), g.opts.MaxInterval)
	return g.interval
}
