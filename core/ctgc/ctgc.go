// Package ctgc collects expired conntrack entries from the agent, and the
// source NAT entries whose flow's conntrack entry is gone (orphans). The
// datapath already ignores an expired entry; collecting it frees its room
// before the LRU has to evict something, possibly a live but idle flow,
// and an orphan NAT entry holds a port of its range until collected.
// The interval adapts to how much each pass found (as Cilium's does):
// shorter while many entries expire, longer while few do, at the shortest
// while either map is under pressure; a NAT range filling up (ports found
// taken, flows refused) wakes the collector at once.
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
	// NAT and NATStats return the source NAT map and its per-CPU
	// allocation counters; nil (or a nil map) leaves NAT alone.
	NAT, NATStats func() *ebpf.Map
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
	// NAT is the source NAT map's part of the pass, when there is one.
	NAT *NATStats `json:"nat,omitempty"`
}

// NATStats describe the NAT map after a pass, and the allocation counters
// the datapath keeps (since the map was made).
type NATStats struct {
	Entries    int     `json:"entries"`
	MaxEntries uint32  `json:"maxEntries"`
	Fill       float64 `json:"fill"`
	// Orphans are the entries deleted because their flow's conntrack
	// entry was gone (or the other half of their pair was).
	Orphans  int  `json:"orphans"`
	Pressure bool `json:"pressure"`
	// Allocated flows got a port; Retries counts candidate ports found
	// taken; Exhausted flows found none and were dropped.
	Allocated uint64 `json:"allocated"`
	Retries   uint64 `json:"retries"`
	Exhausted uint64 `json:"exhausted"`
	// Wakeups are the passes the NAT pressure signal started early.
	Wakeups int `json:"wakeups"`
}

// GC is a conntrack collector.
type GC struct {
	opts     Options
	mu       sync.Mutex
	stats    Stats
	interval time.Duration
	wake     chan struct{}
	wakeups  int
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
	return &GC{opts: opts, interval: opts.Interval, wake: make(chan struct{}, 1)}
}

// Wake starts a pass now (the NAT pressure signal).
func (g *GC) Wake() {
	select {
	case g.wake <- struct{}{}:
	default:
	}
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
		case <-g.wake:
			g.mu.Lock()
			g.wakeups++
			g.mu.Unlock()
		}
	}
}

// WatchNAT reads the datapath's NAT allocation counters every period and
// wakes the collector (at most once per MinInterval) when they show a
// range or the map filling up: a flow refused, more candidate ports found
// taken than flows given one (the first candidate of a free range is
// almost always free), or, from the last pass's count and the flows given
// a port since (two entries each), the map past PressureFill.
func (g *GC) WatchNAT(ctx context.Context, period time.Duration) {
	if g.opts.NATStats == nil {
		return
	}
	var last datapath.NATCounters
	var woke time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(period):
		}
		cur, err := g.natCounters()
		if err != nil {
			continue
		}
		g.mu.Lock()
		pass := g.stats.NAT
		g.mu.Unlock()
		why := natPressure(pass, last, cur)
		last = cur
		if why != "" && time.Since(woke) >= g.opts.MinInterval {
			g.opts.Log.Debug("NAT pressure: collecting early", "why", why)
			woke = time.Now()
			g.Wake()
		}
	}
}

// natPressure says why the counters, read at prev and then at cur, call
// for an early pass after the pass that left pass ("" when they do not).
func natPressure(pass *NATStats, prev, cur datapath.NATCounters) string {
	alloc, retries := cur.Allocated-prev.Allocated, cur.Retries-prev.Retries
	switch {
	case cur.Exhausted > prev.Exhausted:
		return "flows refused for want of a port"
	case retries > 0 && retries >= alloc:
		return "ports found taken"
	case pass != nil && pass.MaxEntries > 0 && cur.Allocated >= pass.Allocated &&
		float64(pass.Entries)+2*float64(cur.Allocated-pass.Allocated) >= PressureFill*float64(pass.MaxEntries):
		return "the map filling up"
	}
	return ""
}

// natCounters sums the per-CPU NAT allocation counters.
func (g *GC) natCounters() (datapath.NATCounters, error) {
	var sum datapath.NATCounters
	m := g.opts.NATStats()
	if m == nil {
		return sum, errors.New("no NAT counters")
	}
	var per []datapath.NATCounters
	if err := m.Lookup(uint32(0), &per); err != nil {
		return sum, fmt.Errorf("reading the NAT counters: %w", err)
	}
	for _, c := range per {
		sum.Allocated += c.Allocated
		sum.Retries += c.Retries
		sum.Exhausted += c.Exhausted
	}
	return sum, nil
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
	natTotal, natDeleted := 0, 0
	if nat := g.natMap(); nat != nil {
		ns, err := g.natPass(nat, m, now)
		if err != nil {
			return Stats{}, err
		}
		st.NAT = ns
		natTotal, natDeleted = ns.Entries+ns.Orphans, ns.Orphans
		if ns.Pressure {
			g.opts.Log.Warn("NAT pressure: the NAT map is nearly full; raise datapath.natMaxEntries", "entries", ns.Entries, "max", ns.MaxEntries)
		}
	}
	st.Next = g.adapt(total+natTotal, deleted+natDeleted, st.Pressure || (st.NAT != nil && st.NAT.Pressure))

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

func (g *GC) natMap() *ebpf.Map {
	if g.opts.NAT == nil {
		return nil
	}
	return g.opts.NAT()
}

// natMinAge spares NAT entries younger than this: a flow's NAT entries
// may be written a moment before its conntrack entry.
const natMinAge = 2

type natEntry struct {
	key datapath.NATKey
	val datapath.NATEntry
}

// natPass deletes the NAT flows whose conntrack entry (keyed by the
// reverse of the OUT tuple) is gone or expired, and halves whose other
// half is gone.
func (g *GC) natPass(nat, ct *ebpf.Map, now int64) (*NATStats, error) {
	info, err := nat.Info()
	if err != nil {
		return nil, fmt.Errorf("reading the NAT map: %w", err)
	}
	var (
		k     datapath.NATKey
		v     datapath.NATEntry
		all   []natEntry
		total int
	)
	it := nat.Iterate()
	for it.Next(&k, &v) {
		total++
		if now-int64(v.Created) >= natMinAge {
			all = append(all, natEntry{k, v})
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("reading the NAT map: %w", err)
	}
	orphans := 0
	// del deletes the entry at k only while it still holds what keep
	// says: the datapath may have given the key to another flow since the
	// map was read (a reclaimed port, a repaired half).
	del := func(k datapath.NATKey, keep func(datapath.NATEntry) bool) error {
		var cur datapath.NATEntry
		if err := nat.Lookup(k, &cur); err != nil {
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				return nil
			}
			return fmt.Errorf("reading the NAT map: %w", err)
		}
		if !keep(cur) {
			return nil
		}
		err := nat.Delete(k)
		if err == nil {
			orphans++
			return nil
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		return fmt.Errorf("deleting a NAT entry: %w", err)
	}
	for _, e := range all {
		switch e.key.Dir {
		case datapath.NATOut:
			in := datapath.NATKey{Saddr: e.key.Daddr, Daddr: e.val.Addr, Sport: e.key.Dport, Dport: e.val.Port, Proto: e.key.Proto, Dir: datapath.NATIn}
			live, err := ctLive(ct, datapath.CTKey{Saddr: e.key.Daddr, Daddr: e.key.Saddr, Sport: e.key.Dport, Dport: e.key.Sport, Proto: e.key.Proto}, now)
			if err != nil {
				return nil, err
			}
			if live {
				continue
			}
			// The reply half first, while it is this flow's (points
			// back to it): a port is free only once nothing points at
			// it.
			if err := del(in, func(c datapath.NATEntry) bool { return c.Addr == e.key.Saddr && c.Port == e.key.Sport }); err != nil {
				return nil, err
			}
			if err := del(e.key, func(c datapath.NATEntry) bool { return c == e.val }); err != nil {
				return nil, err
			}
		case datapath.NATIn:
			out := datapath.NATKey{Saddr: e.val.Addr, Daddr: e.key.Saddr, Sport: e.val.Port, Dport: e.key.Sport, Proto: e.key.Proto, Dir: datapath.NATOut}
			var o datapath.NATEntry
			err := nat.Lookup(out, &o)
			if err == nil && o.Addr == e.key.Daddr && o.Port == e.key.Dport {
				continue
			}
			if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return nil, fmt.Errorf("reading the NAT map: %w", err)
			}
			if err := del(e.key, func(c datapath.NATEntry) bool { return c == e.val }); err != nil {
				return nil, err
			}
		}
	}
	ns := &NATStats{Entries: total - orphans, MaxEntries: info.MaxEntries, Orphans: orphans}
	if info.MaxEntries > 0 {
		ns.Fill = float64(ns.Entries) / float64(info.MaxEntries)
	}
	ns.Pressure = ns.Fill >= PressureFill
	if g.opts.NATStats != nil {
		if c, err := g.natCounters(); err == nil {
			ns.Allocated, ns.Retries, ns.Exhausted = c.Allocated, c.Retries, c.Exhausted
		}
	}
	g.mu.Lock()
	ns.Wakeups = g.wakeups
	g.mu.Unlock()
	return ns, nil
}

// ctLive reports whether the conntrack entry at k exists and has not
// expired.
func ctLive(ct *ebpf.Map, k datapath.CTKey, now int64) (bool, error) {
	var e datapath.CTEntry
	err := ct.Lookup(k, &e)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("reading the conntrack map: %w", err)
	}
	return int64(e.Lifetime) > now, nil
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
