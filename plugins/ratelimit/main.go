// Command ratelimit is an example out-of-tree datapath plugin: a limit on
// the rate of new connections per service frontend and client, enforced by
// a token bucket in the pod-egress/plugin-early stage (ratelimit.c). The
// agent starts it as a go-plugin binary; it hands over its object and
// writes the limits of its settings into its own map through the agent.
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"

	"github.com/weirnet/weir/plugins/sdk"
)

func main() { sdk.Serve(&rateLimit{}) }

// Version is the plugin's version, as it describes itself.
const Version = "0.1.0"

// Map names of ratelimit.c.
const (
	mapLimits   = "ratelimit_limits"
	mapBuckets  = "ratelimit_buckets"
	mapCounters = "ratelimit_counters"
)

// Limit is one frontend's limit, as written in the settings.
type Limit struct {
	// Frontend is a service address and port ("10.96.0.10:80").
	Frontend string `json:"frontend"`
	// Protocol is TCP (default) or UDP.
	Protocol string `json:"protocol"`
	// Rate is new connections per second each client may open.
	Rate uint32 `json:"rate"`
	// Burst is how many a client may open at once (default: Rate).
	Burst uint32 `json:"burst"`
}

// Settings are the plugin's settings section.
type Settings struct {
	Limits []Limit `json:"limits"`
}

const schema = `{"type":"object","additionalProperties":false,"properties":{"limits":{"type":"array","items":{"type":"object","additionalProperties":false,"required":["frontend","rate"],"properties":{"frontend":{"type":"string"},"protocol":{"enum":["TCP","UDP"]},"rate":{"type":"integer","minimum":1},"burst":{"type":"integer","minimum":1}}}}}}`

type rateLimit struct{}

// entry is a limit as ratelimit_limits holds it.
type entry struct {
	key, value []byte
}

var _ sdk.Plugin = (*rateLimit)(nil)

func (r *rateLimit) Describe() sdk.Description {
	return sdk.Description{
		Name: "ratelimit", Version: Version,
		Summary:  "limits new connections per service frontend and client (token bucket)",
		Slots:    []sdk.SlotClaim{{Slot: "pod-egress/plugin-early", Program: "ratelimit"}},
		CoreMaps: []string{"weir_ct"},
		Maps: []sdk.OwnMap{
			{Name: mapLimits, Summary: "frontend -> rate and burst"},
			{Name: mapBuckets, Summary: "frontend and client -> tokens"},
			{Name: mapCounters, Summary: "new connections allowed, limited"},
		},
		SettingsSchema: schema,
	}
}

func (r *rateLimit) Configure(raw json.RawMessage) (*sdk.Object, error) {
	if _, err := parse(raw); err != nil {
		return nil, err
	}
	return &sdk.Object{ELF: _RatelimitBytes}, nil
}

// parse validates settings into map entries.
func parse(raw json.RawMessage) ([]entry, error) {
	var s Settings
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		if f, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
			return nil, &sdk.FieldError{Path: strings.Trim(f, `"`), Msg: "unknown field; allowed fields: limits"}
		}
		return nil, &sdk.FieldError{Path: "limits", Msg: fmt.Sprintf("not valid: %v (each limit has frontend, protocol, rate, burst)", err)}
	}
	var out []entry
	seen := map[string]int{}
	for i, l := range s.Limits {
		at := fmt.Sprintf("limits[%d]", i)
		ap, err := netip.ParseAddrPort(l.Frontend)
		if err != nil || !ap.Addr().Is4() || ap.Port() == 0 {
			return nil, &sdk.FieldError{Path: at + ".frontend", Msg: fmt.Sprintf("%q is not an IPv4 service address and port (such as 10.96.0.10:80)", l.Frontend)}
		}
		var proto uint8
		switch strings.ToUpper(l.Protocol) {
		case "", "TCP":
			proto = 6
		case "UDP":
			proto = 17
		default:
			return nil, &sdk.FieldError{Path: at + ".protocol", Msg: fmt.Sprintf("%q is not one of TCP, UDP", l.Protocol)}
		}
		if l.Rate == 0 {
			return nil, &sdk.FieldError{Path: at + ".rate", Msg: "give new connections per second per client (1 or more)"}
		}
		burst := l.Burst
		if burst == 0 {
			burst = l.Rate
		}
		id := fmt.Sprintf("%s/%d", ap, proto)
		if k, dup := seen[id]; dup {
			return nil, &sdk.FieldError{Path: at + ".frontend", Msg: fmt.Sprintf("%s is already limited by limits[%d]", l.Frontend, k)}
		}
		seen[id] = i
		out = append(out, entry{key: frontendKey(ap, proto), value: limitValue(l.Rate, burst)})
	}
	return out, nil
}

// frontendKey is struct ratelimit_frontend: address and port in network
// order.
func frontendKey(ap netip.AddrPort, proto uint8) []byte {
	b := make([]byte, 8)
	a := ap.Addr().As4()
	copy(b, a[:])
	binary.BigEndian.PutUint16(b[4:], ap.Port())
	b[6] = proto
	return b
}

// limitValue is struct ratelimit_limit, in host order.
func limitValue(rate, burst uint32) []byte {
	b := make([]byte, 8)
	binary.NativeEndian.PutUint32(b, rate)
	binary.NativeEndian.PutUint32(b[4:], burst)
	return b
}

// Start makes ratelimit_limits hold exactly the settings' limits: the map
// outlives the plugin (the agent pins it), so limits no longer set go.
func (r *rateLimit) Start(ctx context.Context, host *sdk.Host, raw json.RawMessage) error {
	want, err := parse(raw)
	if err != nil {
		return err
	}
	keep := map[string]bool{}
	for _, e := range want {
		if err := host.Update(ctx, mapLimits, e.key, e.value); err != nil {
			return err
		}
		keep[string(e.key)] = true
	}
	have, err := host.Entries(ctx, mapLimits)
	if err != nil {
		return err
	}
	for _, e := range have {
		if !keep[string(e.Key)] {
			if err := host.Delete(ctx, mapLimits, e.Key); err != nil {
				return err
			}
		}
	}
	return nil
}

func (r *rateLimit) Stop(context.Context) error { return nil }
