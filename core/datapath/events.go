package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/weirnet/weir/core/slots"
)

// DropEvent is one weir_events record: a packet the datapath dropped, with
// the tuple it had when it was dropped.
type DropEvent struct {
	// At is the boot-clock time of the drop.
	At     time.Duration  `json:"at"`
	Hook   string         `json:"hook"`
	Reason string         `json:"reason"`
	Code   uint8          `json:"code"`
	Proto  string         `json:"proto"`
	Src    netip.AddrPort `json:"src"`
	Dst    netip.AddrPort `json:"dst"`
	// Ifindex is the device the hook ran on.
	Ifindex uint32 `json:"ifindex"`
}

func (e DropEvent) String() string {
	return fmt.Sprintf("%s %s %s -> %s dropped: %s", e.Hook, e.Proto, e.Src, e.Dst, e.Reason)
}

// EventReader reads a node's drop events as they happen. A ring buffer has
// one reading position: one reader per node at a time sees every event.
type EventReader struct {
	m *ebpf.Map
	r *ringbuf.Reader
}

// OpenEvents opens the ring buffer pinned in a node's directory.
func OpenEvents(dir string) (*EventReader, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, MapEvents), nil)
	if err != nil {
		return nil, fmt.Errorf("opening pinned map %s: %w", MapEvents, err)
	}
	r, err := ringbuf.NewReader(m)
	if err != nil {
		m.Close()
		return nil, fmt.Errorf("reading %s: %w", MapEvents, err)
	}
	return &EventReader{m: m, r: r}, nil
}

// Close stops reading; a blocked Read returns.
func (er *EventReader) Close() error {
	err := er.r.Close()
	er.m.Close()
	return err
}

// ErrClosed is returned by Read once the reader is closed.
var ErrClosed = errors.New("event reader closed")

// Read waits for the next event until the deadline (zero: no deadline);
// os.ErrDeadlineExceeded says none came.
func (er *EventReader) Read(deadline time.Time) (DropEvent, error) {
	er.r.SetDeadline(deadline)
	rec, err := er.r.Read()
	if errors.Is(err, ringbuf.ErrClosed) {
		return DropEvent{}, ErrClosed
	}
	if err != nil {
		return DropEvent{}, err
	}
	var ev Event
	if _, err := binary.Decode(rec.RawSample, binary.LittleEndian, &ev); err != nil {
		return DropEvent{}, fmt.Errorf("decoding an event: %w", err)
	}
	return DropEvent{
		At: time.Duration(ev.TsNs), Hook: slots.Hook(ev.Hook).String(), Reason: Reason(ev.Reason).String(), Code: ev.Reason,
		Proto:   ProtoName(ev.Proto),
		Src:     netip.AddrPortFrom(AddrFromBE(ev.Saddr), PortFromBE(ev.Sport)),
		Dst:     netip.AddrPortFrom(AddrFromBE(ev.Daddr), PortFromBE(ev.Dport)),
		Ifindex: ev.Ifindex,
	}, nil
}
