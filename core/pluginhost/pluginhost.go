// Package pluginhost runs datapath plugins for the agent: it starts each
// declared plugin binary over hashicorp/go-plugin (gRPC, mutual TLS, the
// binary's SHA-256 checked), learns what it describes, and turns it into a
// module.Factory the configuration enables like any in-tree module. The
// plugin process has no privileges: this side loads its BPF object (its
// core maps replaced by the node's, its own maps pinned for it), fills its
// slots, and answers its calls on its own maps.
package pluginhost

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"
	"go.uber.org/fx"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"gopkg.in/yaml.v3"

	"github.com/weirnet/weir/core/api"
	"github.com/weirnet/weir/core/config"
	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/module"
	"github.com/weirnet/weir/core/slots"
	pluginv1 "github.com/weirnet/weir/plugins/proto/v1"
	"github.com/weirnet/weir/plugins/sdk"
)

// Plugin is a started plugin process and what it described.
type Plugin struct {
	Decl config.Plugin
	Desc *pluginv1.Description
	log  *slog.Logger

	mu     sync.Mutex
	client *plugin.Client
	rpc    *sdk.Client
	// restarts counts processes started after one died.
	restarts atomic.Int64
}

// Restarts is how many times the plugin's process was started again after
// it died.
func (p *Plugin) Restarts() int64 { return p.restarts.Load() }

// Start starts the plugin binary and asks it to describe itself. Every
// error names the plugin and what was wrong; nothing is left running on
// error.
func Start(decl config.Plugin, log *slog.Logger) (*Plugin, error) {
	if log == nil {
		log = slog.Default()
	}
	p := &Plugin{Decl: decl, log: log.With("plugin", decl.Name)}
	if err := p.launch(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), decl.Timeout())
	defer cancel()
	desc, err := p.rpc.Describe(ctx, &pluginv1.DescribeRequest{})
	if err != nil {
		p.Kill()
		return nil, p.callError("Describe", err)
	}
	if err := check(decl, desc); err != nil {
		p.Kill()
		return nil, fmt.Errorf("plugin %s (%s): %w", decl.Name, decl.Path, err)
	}
	p.Desc = desc
	return p, nil
}

// launch starts the process and completes the handshake.
func (p *Plugin) launch() error {
	d := p.Decl
	sum, err := fileSHA256(d.Path)
	if err != nil {
		return fmt.Errorf("plugin %s: %w", d.Name, err)
	}
	want, _ := hex.DecodeString(strings.ToLower(d.SHA256))
	if !bytes.Equal(sum, want) {
		return fmt.Errorf("plugin %s: %s has SHA-256 %x, but the configuration says %s: not started (replace the binary or the checksum)", d.Name, d.Path, sum, strings.ToLower(d.SHA256))
	}
	client := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  sdk.Handshake,
		VersionedPlugins: map[int]plugin.PluginSet{sdk.ProtocolVersion: {sdk.PluginKey: &sdk.GRPCPlugin{}}},
		Cmd:              exec.Command(d.Path),
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		AutoMTLS:         true,
		// Checked again by go-plugin as it starts the binary.
		SecureConfig: &plugin.SecureConfig{Checksum: want, Hash: sha256.New()},
		StartTimeout: d.Timeout(),
		Logger:       hclog.New(&hclog.LoggerOptions{Name: "plugin." + d.Name, Output: &logWriter{p.log}, Level: hclog.Info}),
	})
	rpc, err := client.Client()
	if err != nil {
		client.Kill()
		if client.Exited() && strings.Contains(err.Error(), "Unrecognized remote plugin message") {
			return fmt.Errorf("plugin %s: starting %s: the process exited before the go-plugin handshake (its output is in the agent's log; a Weir plugin calls sdk.Serve)", d.Name, d.Path)
		}
		return fmt.Errorf("plugin %s: starting %s: %w (a Weir plugin speaks protocol version %d over gRPC; see plugins/README.md)", d.Name, d.Path, err, sdk.ProtocolVersion)
	}
	raw, err := rpc.Dispense(sdk.PluginKey)
	if err != nil {
		client.Kill()
		return fmt.Errorf("plugin %s: %w", d.Name, err)
	}
	c, ok := raw.(*sdk.Client)
	if !ok {
		client.Kill()
		return fmt.Errorf("plugin %s: dispensed %T, not a datapath plugin", d.Name, raw)
	}
	p.mu.Lock()
	p.client, p.rpc = client, c
	p.mu.Unlock()
	return nil
}

func fileSHA256(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading the plugin binary: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, fmt.Errorf("reading the plugin binary: %w", err)
	}
	return h.Sum(nil), nil
}

// check refuses a description the host cannot honour.
func check(decl config.Plugin, d *pluginv1.Description) error {
	if d.Name != decl.Name {
		return fmt.Errorf("it describes itself as %q, but is declared as %q", d.Name, decl.Name)
	}
	if err := descriptor(d).Validate(); err != nil {
		return err
	}
	if len(d.Slots) == 0 {
		return fmt.Errorf("it claims no slot; plugin slots: %s", strings.Join(slots.PluginSlots(), ", "))
	}
	for _, m := range d.CoreMaps {
		if !strings.HasPrefix(m, "weir_") {
			return fmt.Errorf("core map %q: core maps are named weir_*", m)
		}
	}
	for _, m := range d.Maps {
		if m.Name == "" || strings.HasPrefix(m.Name, "weir_") || strings.HasPrefix(m.Name, ".") {
			return fmt.Errorf("own map %q: name it after the plugin, not weir_*", m.Name)
		}
	}
	return nil
}

func descriptor(d *pluginv1.Description) module.Descriptor {
	out := module.Descriptor{Name: d.Name, Summary: d.Summary, Requires: d.Requires, Excludes: d.Excludes, Plugin: true}
	for _, c := range d.Slots {
		out.Slots = append(out.Slots, module.SlotClaim{Slot: c.Slot, Program: c.Program})
	}
	return out
}

func (p *Plugin) callError(call string, err error) error {
	if errors.Is(err, context.DeadlineExceeded) || status.Code(err).String() == "DeadlineExceeded" {
		return fmt.Errorf("plugin %s: %s did not answer within %s (callTimeout)", p.Decl.Name, call, p.Decl.Timeout())
	}
	return fmt.Errorf("plugin %s: %s: %s", p.Decl.Name, call, status.Convert(err).Message())
}

// exited is closed when the current process has exited.
func (p *Plugin) exited() <-chan struct{} {
	p.mu.Lock()
	c := p.client
	p.mu.Unlock()
	ch := make(chan struct{})
	go func() {
		// go-plugin has no callback for a dying plugin (its issue #92):
		// poll, cheaply.
		for !c.Exited() {
			time.Sleep(50 * time.Millisecond)
		}
		close(ch)
	}()
	return ch
}

// Pid is the current process's id (0 when none runs).
func (p *Plugin) Pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.client == nil || p.client.Exited() {
		return 0
	}
	if rc := p.client.ReattachConfig(); rc != nil {
		return rc.Pid
	}
	return 0
}

// Status is what weir status says of the plugin.
func (p *Plugin) Status(enabled bool) api.PluginStatus {
	policy := p.Decl.FailurePolicy
	if policy == "" {
		policy = config.FailOpen
	}
	return api.PluginStatus{Name: p.Decl.Name, Version: p.Desc.GetVersion(), Path: p.Decl.Path, Enabled: enabled,
		PID: p.Pid(), Restarts: p.Restarts(), FailurePolicy: policy}
}

// Kill ends the plugin process.
func (p *Plugin) Kill() {
	p.mu.Lock()
	c := p.client
	p.mu.Unlock()
	if c != nil {
		c.Kill()
	}
}

// client returns the current connection.
func (p *Plugin) current() *sdk.Client {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.rpc
}

// configure asks the plugin to validate settings and build its object.
func (p *Plugin) configure(settingsJSON []byte) (*pluginv1.ConfigureResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), p.Decl.Timeout())
	defer cancel()
	r, err := p.current().Configure(ctx, &pluginv1.ConfigureRequest{SettingsJson: settingsJSON})
	if err != nil {
		if st, ok := status.FromError(err); ok && st.Code().String() == "InvalidArgument" {
			return nil, settingsError(st.Message())
		}
		return nil, p.callError("Configure", err)
	}
	return r, nil
}

// settingsError turns "path: message" into a field error the config
// places at the field's line.
func settingsError(msg string) error {
	if path, m, ok := strings.Cut(msg, ": "); ok && !strings.Contains(path, " ") {
		return &module.FieldError{Path: path, Msg: m}
	}
	return errors.New(msg)
}

// Factory is the module the plugin brings.
func (p *Plugin) Factory() module.Factory {
	return module.Factory{
		Descriptor: func() module.Descriptor {
			d := descriptor(p.Desc)
			d.NewSettings = func() module.Settings { return &Settings{p: p} }
			return d
		}(),
		Provide: func(s module.Settings) fx.Option {
			st, _ := s.(*Settings)
			return module.Provide(func(lc fx.Lifecycle, dp *datapath.Datapath) module.Module {
				return &Module{p: p, settings: st, dp: dp}
			})
		},
	}
}

// Settings is a plugin's settings section: the plugin validates it (its
// Configure), and the object built for it is kept.
type Settings struct {
	p    *Plugin
	json []byte
	obj  *pluginv1.ConfigureResponse
}

var _ module.RawSettings = (*Settings)(nil)

// SetYAML implements module.RawSettings.
func (s *Settings) SetYAML(section *yaml.Node) error {
	var v any
	if section != nil {
		if err := section.Decode(&v); err != nil {
			return err
		}
	}
	if v == nil {
		v = map[string]any{}
	}
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("settings cannot be sent to the plugin as JSON: %w", err)
	}
	s.json = b
	return nil
}

// Validate implements module.Settings: the plugin's own Configure.
func (s *Settings) Validate() error {
	if s.json == nil {
		s.json = []byte("{}")
	}
	obj, err := s.p.configure(s.json)
	if err != nil {
		return err
	}
	s.obj = obj
	return nil
}

// Object is the object the plugin built for these settings (after
// Validate).
func (s *Settings) Object() *pluginv1.ConfigureResponse { return s.obj }

// Module is a running plugin as the agent composes it.
type Module struct {
	p        *Plugin
	settings *Settings
	dp       *datapath.Datapath
	coll     *ebpf.Collection

	// stop ends the supervisor; done is closed when it returned.
	stop chan struct{}
	done chan struct{}
}

var (
	_ module.Starter = (*Module)(nil)
	_ module.Stopper = (*Module)(nil)
)

var (
	_ module.Module = (*Module)(nil)
	_ module.Loaded = (*Module)(nil)
)

// Name implements module.Module.
func (m *Module) Name() string { return m.p.Decl.Name }

// Object implements module.Module: the plugin's ELF with its constants
// set, refused when a program uses a map the plugin did not declare.
func (m *Module) Object() (*ebpf.CollectionSpec, error) {
	if m.settings == nil || m.settings.obj == nil {
		return nil, fmt.Errorf("plugin %s: no validated settings", m.Name())
	}
	return Spec(m.p.Desc, m.settings.obj)
}

// Spec builds the collection spec of a Configure answer and checks it
// against the description.
func Spec(d *pluginv1.Description, obj *pluginv1.ConfigureResponse) (*ebpf.CollectionSpec, error) {
	spec, err := ebpf.LoadCollectionSpecFromReader(bytes.NewReader(obj.Elf))
	if err != nil {
		return nil, fmt.Errorf("plugin %s: its object is not a BPF ELF: %w", d.Name, err)
	}
	for _, c := range obj.Constants {
		v, ok := spec.Variables[c.Name]
		if !ok {
			return nil, fmt.Errorf("plugin %s: constant %q is not a variable of its object", d.Name, c.Name)
		}
		if int(v.Size()) != len(c.Value) {
			return nil, fmt.Errorf("plugin %s: constant %s takes %d bytes, the plugin sent %d", d.Name, c.Name, v.Size(), len(c.Value))
		}
		if err := v.Set(c.Value); err != nil {
			return nil, fmt.Errorf("plugin %s: setting %s: %w", d.Name, c.Name, err)
		}
	}
	allowed := map[string]bool{}
	for _, n := range slices.Concat(d.CoreMaps, datapath.StageRuntimeMaps) {
		allowed[n] = true
	}
	for _, om := range d.Maps {
		allowed[om.Name] = true
		if _, ok := spec.Maps[om.Name]; !ok {
			return nil, fmt.Errorf("plugin %s: declares map %s, which its object does not have", d.Name, om.Name)
		}
	}
	claimed := map[string]bool{}
	for _, c := range d.Slots {
		if _, ok := spec.Programs[c.Program]; !ok {
			return nil, fmt.Errorf("plugin %s: slot %s names program %q, which its object does not have", d.Name, c.Slot, c.Program)
		}
		claimed[c.Program] = true
	}
	// Programs no slot runs are not loaded: nothing could reach them.
	for name := range spec.Programs {
		if !claimed[name] {
			delete(spec.Programs, name)
		}
	}
	for name, prog := range spec.Programs {
		for _, ins := range prog.Instructions {
			ref := ins.Reference()
			if ref == "" || !ins.IsLoadFromMap() || strings.HasPrefix(ref, ".") || allowed[ref] {
				continue
			}
			return nil, fmt.Errorf("plugin %s: program %s uses map %s, which the plugin did not declare (core maps: %s; own maps: %s)",
				d.Name, name, ref, strings.Join(d.CoreMaps, ", "), ownNames(d))
		}
	}
	return spec, nil
}

func ownNames(d *pluginv1.Description) string {
	var out []string
	for _, m := range d.Maps {
		out = append(out, m.Name)
	}
	if len(out) == 0 {
		return "none"
	}
	return strings.Join(out, ", ")
}

// Loaded implements module.Loaded: the plugin's own maps, for its calls.
func (m *Module) Loaded(coll *ebpf.Collection) error {
	m.coll = coll
	return nil
}

// Start implements module.Starter: serves the plugin's map calls, starts
// it, and from then on restarts its process whenever it dies.
func (m *Module) Start(context.Context) error {
	if m.p.Pid() == 0 {
		// Its process died while no module set ran it.
		if err := m.relaunch(); err != nil {
			return err
		}
	} else if err := m.startPlugin(); err != nil {
		return err
	}
	m.stop, m.done = make(chan struct{}), make(chan struct{})
	go m.supervise()
	return nil
}

// startPlugin hands the current process its host service and settings.
func (m *Module) startPlugin() error {
	c := m.p.current()
	id := c.Broker.NextId()
	own := map[string]*ebpf.Map{}
	if m.coll != nil {
		for _, om := range m.p.Desc.Maps {
			if mp := m.coll.Maps[om.Name]; mp != nil {
				own[om.Name] = mp
			}
		}
	}
	go c.Broker.AcceptAndServe(id, func(opts []grpc.ServerOption) *grpc.Server {
		s := grpc.NewServer(opts...)
		pluginv1.RegisterHostServer(s, &hostServer{plugin: m.Name(), maps: own})
		return s
	})
	ctx, cancel := context.WithTimeout(context.Background(), m.p.Decl.Timeout())
	defer cancel()
	if _, err := c.Start(ctx, &pluginv1.StartRequest{HostBrokerId: id, SettingsJson: m.settings.json}); err != nil {
		return m.p.callError("Start", err)
	}
	return nil
}

// Restarts is how many times the plugin's process was started again after
// it died.
func (m *Module) Restarts() int64 { return m.p.Restarts() }

// restartBackoff is the wait before the next restart: 100 ms doubling to
// 30 s, as the agent retries other work.
func restartBackoff(prev time.Duration) time.Duration {
	return min(max(2*prev, 100*time.Millisecond), 30*time.Second)
}

// supervise restarts the plugin's process when it dies (go-plugin does not)
// and applies its failure policy meanwhile. Its BPF does not depend on the
// process: under "open" it keeps running; under "closed" its slots drop
// until a new process was started and has its state again.
func (m *Module) supervise() {
	defer close(m.done)
	for {
		exited := m.p.exited()
		select {
		case <-m.stop:
			return
		case <-exited:
		}
		m.p.log.Error("plugin process died; restarting it", "failure_policy", m.policy())
		if m.policy() == config.FailClosed {
			m.fill(m.dp.PluginDownProgram)
		}
		var wait time.Duration
		for {
			wait = restartBackoff(wait)
			select {
			case <-m.stop:
				return
			case <-time.After(wait):
			}
			if err := m.relaunch(); err != nil {
				m.p.log.Error("restarting the plugin failed", "err", err, "retry_in", restartBackoff(wait))
				continue
			}
			break
		}
		m.p.restarts.Add(1)
		if m.policy() == config.FailClosed {
			m.fill(nil)
		}
		m.p.log.Info("plugin process restarted and synced", "restarts", m.p.restarts.Load())
	}
}

func (m *Module) policy() string {
	if m.p.Decl.FailurePolicy == "" {
		return config.FailOpen
	}
	return m.p.Decl.FailurePolicy
}

// fill puts stand-in (nil: the plugin's own programs) into its slots.
func (m *Module) fill(standIn func() *ebpf.Program) {
	if m.dp == nil || m.coll == nil {
		return
	}
	for _, c := range m.p.Desc.Slots {
		prog := m.coll.Programs[c.Program]
		if standIn != nil {
			prog = standIn()
		}
		if err := m.dp.SetSlot(c.Slot, prog); err != nil {
			m.p.log.Error("filling a plugin slot", "slot", c.Slot, "err", err)
		}
	}
}

// relaunch starts a new process of the same binary, checks that it
// describes itself as before and accepts the settings, and starts it.
func (m *Module) relaunch() error {
	p := m.p
	p.Kill()
	if err := p.launch(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.Decl.Timeout())
	defer cancel()
	desc, err := p.current().Describe(ctx, &pluginv1.DescribeRequest{})
	if err != nil {
		p.Kill()
		return p.callError("Describe", err)
	}
	if !proto.Equal(desc, p.Desc) {
		p.Kill()
		return fmt.Errorf("plugin %s describes itself differently than when the agent started; restart the agent to take the new description", p.Decl.Name)
	}
	if _, err := p.configure(m.settings.json); err != nil {
		p.Kill()
		return err
	}
	if err := m.startPlugin(); err != nil {
		p.Kill()
		return err
	}
	return nil
}

// Stop implements module.Stopper: the plugin hears it; its programs and
// maps stay until the next module set replaces them, and its process
// runs on (the agent ends it when the agent stops), ready for a module
// set that enables it again.
func (m *Module) Stop(context.Context) error {
	if m.stop != nil {
		close(m.stop)
		<-m.done
	}
	if m.p.Pid() == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), m.p.Decl.Timeout())
	defer cancel()
	if _, err := m.p.current().Stop(ctx, &pluginv1.StopRequest{}); err != nil {
		return m.p.callError("Stop", err)
	}
	return nil
}

// logWriter sends a plugin's log lines and stderr to the agent's log.
type logWriter struct{ log *slog.Logger }

func (w *logWriter) Write(b []byte) (int, error) {
	for _, line := range strings.Split(strings.TrimRight(string(b), "\n"), "\n") {
		if line != "" {
			w.log.Info(line)
		}
	}
	return len(b), nil
}

// StartAll starts every declared plugin; on any error the ones already
// started are killed.
func StartAll(decls []config.Plugin, log *slog.Logger) ([]*Plugin, error) {
	var out []*Plugin
	for _, d := range decls {
		p, err := Start(d, log)
		if err != nil {
			for _, q := range out {
				q.Kill()
			}
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}
