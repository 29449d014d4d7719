// Package sdk is what a datapath plugin imports: it describes the plugin to
// weir-agent, hands over its BPF object, validates its settings and serves
// the agent's lifecycle calls over hashicorp/go-plugin (gRPC, mutual TLS).
// The agent loads the object, owns every kernel object and lets the plugin
// read and write its own maps through Host. A plugin's main is one call:
//
//	func main() { sdk.Serve(&myPlugin{}) }
//
// The BPF side builds against Weir's include tree (bpf/include): a stage
// program gets the per-packet context with WEIR_STAGE_CTX and continues
// with weir_next, as in-tree stages do. See plugins/README.md.
package sdk

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pluginv1 "github.com/weirnet/weir/plugins/proto/v1"
)

// ProtocolVersion is the version of plugins/proto/v1 this SDK speaks; the
// handshake refuses a plugin of another version before any call.
const ProtocolVersion = 1

// PluginKey is the name the plugin is dispensed under.
const PluginKey = "datapath"

// Handshake keeps a plugin binary from being run by hand, and anything but
// a Weir plugin from being run as one.
var Handshake = plugin.HandshakeConfig{
	ProtocolVersion:  ProtocolVersion,
	MagicCookieKey:   "WEIR_PLUGIN",
	MagicCookieValue: "datapath-plugin-c8f4a1e2",
}

// SlotClaim says that the object's program Program runs in the plugin
// slot Slot.
type SlotClaim struct {
	Slot    string
	Program string
}

// OwnMap is a map of the plugin's own object.
type OwnMap struct {
	Name    string
	Summary string
}

// Description is who the plugin is and what it needs.
type Description struct {
	Name, Version, Summary string
	Slots                  []SlotClaim
	Requires, Excludes     []string
	// CoreMaps are the core maps (weir_*) its programs use besides the
	// stage runtime's (weir_scratch, weir_calls, weir_slot_mask,
	// weir_metrics, weir_events), which every stage may use.
	CoreMaps []string
	// Maps are its own maps; its programs may use no others.
	Maps []OwnMap
	// SettingsSchema is a JSON Schema of its settings, for documentation.
	SettingsSchema string
}

// Object is the BPF object built for validated settings.
type Object struct {
	ELF []byte
	// Constants are volatile const variables to set, by name, as
	// little-endian bytes of their size.
	Constants map[string][]byte
}

// FieldError is a settings error about one field; the agent prefixes the
// path of the plugin's settings section.
type FieldError struct {
	Path, Msg string
}

func (e *FieldError) Error() string { return e.Path + ": " + e.Msg }

// Plugin is what a plugin implements.
type Plugin interface {
	Describe() Description
	// Configure validates settings (the plugin's section, as JSON) and
	// returns the object for them. It must not change any state: the
	// agent calls it for every node pool's settings.
	Configure(settings json.RawMessage) (*Object, error)
	// Start runs once the object is loaded and its slots filled, and
	// again after the agent restarted a crashed plugin; host reaches the
	// plugin's own maps, settings are the node's (as validated by
	// Configure).
	Start(ctx context.Context, host *Host, settings json.RawMessage) error
	// Stop runs before the agent removes the plugin's programs.
	Stop(ctx context.Context) error
}

// Serve runs the plugin until the agent ends it, or dies: a plugin whose
// agent was killed exits rather than outlive it (go-plugin does not
// notice), and its programs run on in the kernel as the agent left them.
func Serve(p Plugin) {
	go exitWithParent(os.Getppid(), time.Second)
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: Handshake,
		VersionedPlugins: map[int]plugin.PluginSet{
			ProtocolVersion: {PluginKey: &GRPCPlugin{Impl: p}},
		},
		GRPCServer: plugin.DefaultGRPCServer,
	})
}

// GRPCPlugin is the go-plugin binding of the protocol: the plugin side
// serves Impl; the agent's side gets a Client.
type GRPCPlugin struct {
	plugin.NetRPCUnsupportedPlugin
	Impl Plugin
}

// GRPCServer implements plugin.GRPCPlugin.
func (g *GRPCPlugin) GRPCServer(b *plugin.GRPCBroker, s *grpc.Server) error {
	pluginv1.RegisterDatapathPluginServer(s, &server{impl: g.Impl, broker: b})
	return nil
}

// GRPCClient implements plugin.GRPCPlugin.
func (g *GRPCPlugin) GRPCClient(_ context.Context, b *plugin.GRPCBroker, c *grpc.ClientConn) (any, error) {
	return &Client{DatapathPluginClient: pluginv1.NewDatapathPluginClient(c), Broker: b}, nil
}

// Client is the agent's handle on a plugin.
type Client struct {
	pluginv1.DatapathPluginClient
	Broker *plugin.GRPCBroker
}

type server struct {
	pluginv1.UnimplementedDatapathPluginServer
	impl   Plugin
	broker *plugin.GRPCBroker
	host   *Host
}

func (s *server) Describe(context.Context, *pluginv1.DescribeRequest) (*pluginv1.Description, error) {
	d := s.impl.Describe()
	out := &pluginv1.Description{Name: d.Name, Version: d.Version, Summary: d.Summary, Requires: d.Requires,
		Excludes: d.Excludes, CoreMaps: d.CoreMaps, SettingsSchema: d.SettingsSchema}
	for _, c := range d.Slots {
		out.Slots = append(out.Slots, &pluginv1.SlotClaim{Slot: c.Slot, Program: c.Program})
	}
	for _, m := range d.Maps {
		out.Maps = append(out.Maps, &pluginv1.OwnMap{Name: m.Name, Summary: m.Summary})
	}
	return out, nil
}

func (s *server) Configure(_ context.Context, req *pluginv1.ConfigureRequest) (*pluginv1.ConfigureResponse, error) {
	obj, err := s.impl.Configure(req.SettingsJson)
	if err != nil {
		if fe := (*FieldError)(nil); errors.As(err, &fe) {
			return nil, status.Error(codes.InvalidArgument, fe.Error())
		}
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	out := &pluginv1.ConfigureResponse{Elf: obj.ELF}
	for n, v := range obj.Constants {
		out.Constants = append(out.Constants, &pluginv1.Constant{Name: n, Value: v})
	}
	return out, nil
}

func (s *server) Start(ctx context.Context, req *pluginv1.StartRequest) (*pluginv1.StartResponse, error) {
	conn, err := s.broker.Dial(req.HostBrokerId)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "reaching the agent's host service: %v", err)
	}
	s.host = &Host{c: pluginv1.NewHostClient(conn)}
	if err := s.impl.Start(ctx, s.host, req.SettingsJson); err != nil {
		return nil, status.Error(codes.FailedPrecondition, err.Error())
	}
	return &pluginv1.StartResponse{}, nil
}

func (s *server) Stop(ctx context.Context, _ *pluginv1.StopRequest) (*pluginv1.StopResponse, error) {
	if err := s.impl.Stop(ctx); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &pluginv1.StopResponse{}, nil
}

// Host reaches the plugin's own maps in the agent. Keys and values are
// the raw bytes of the C structs (little-endian, as the host's kernel).
type Host struct {
	c pluginv1.HostClient
}

// Update writes one entry.
func (h *Host) Update(ctx context.Context, m string, key, value []byte) error {
	_, err := h.c.MapUpdate(ctx, &pluginv1.MapUpdateRequest{Map: m, Key: key, Value: value})
	return callErr("updating "+m, err)
}

// Lookup reads one entry; found is false when there is none. Per-CPU
// maps return every CPU's value, concatenated.
func (h *Host) Lookup(ctx context.Context, m string, key []byte) (value []byte, found bool, err error) {
	r, err := h.c.MapLookup(ctx, &pluginv1.MapLookupRequest{Map: m, Key: key})
	if err != nil {
		return nil, false, callErr("reading "+m, err)
	}
	return r.Value, r.Found, nil
}

// Delete removes one entry; a missing one is no error.
func (h *Host) Delete(ctx context.Context, m string, key []byte) error {
	_, err := h.c.MapDelete(ctx, &pluginv1.MapDeleteRequest{Map: m, Key: key})
	return callErr("deleting from "+m, err)
}

// Entries reads every entry of a map.
func (h *Host) Entries(ctx context.Context, m string) ([]*pluginv1.MapEntry, error) {
	r, err := h.c.MapEntries(ctx, &pluginv1.MapEntriesRequest{Map: m})
	if err != nil {
		return nil, callErr("listing "+m, err)
	}
	return r.Entries, nil
}

func callErr(what string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%s: %s", what, status.Convert(err).Message())
}

// exitWithParent ends the process once its parent is gone (it is then
// reparented).
func exitWithParent(ppid int, every time.Duration) {
	for range time.Tick(every) {
		if os.Getppid() != ppid {
			os.Exit(0)
		}
	}
}
