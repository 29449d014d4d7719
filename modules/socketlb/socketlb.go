// Package socketlb is the socketlb module: service load balancing at the
// socket. cgroup v2 socket programs on the node's cgroup give connect() of
// TCP and UDP sockets, and every sendmsg() of unconnected UDP, a backend
// instead of the service frontend, and answer recvmsg() and getpeername()
// with the frontend, so a flow is translated once per connection and never
// per packet. It reads the same service maps as lb, written by core's
// reconciler.
package socketlb

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/cilium/ebpf"
	"go.uber.org/fx"
	"golang.org/x/sys/unix"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/lbmap"
	"github.com/weirnet/weir/core/module"
	"github.com/weirnet/weir/modules/lb"
)

// Name is the module's name in configuration.
const Name = "socketlb"

// Errno values the socket programs answer with (bpf/socketlb.c).
const (
	// NoBackendErrno fails connect() and sendmsg() to a frontend without
	// backends, as a kernel REJECT would: clients fail at once.
	NoBackendErrno = unix.ECONNREFUSED
	// BindErrno fails bind() to a frontend's address and port.
	BindErrno = unix.EADDRINUSE
)

// Settings of the socketlb module.
type Settings struct {
	// HostNamespaceOnly translates only the sockets of the node's own
	// network namespace; pods' traffic is left to the per-packet lb
	// (service meshes that redirect pod traffic, sandboxed runtimes whose
	// sockets are not the pod's).
	HostNamespaceOnly bool `yaml:"hostNamespaceOnly"`
}

// Validate implements module.Settings: every value is valid.
func (*Settings) Validate() error { return nil }

var _ module.Settings = (*Settings)(nil)

// Factory registers the module.
var Factory = module.Factory{
	Descriptor: module.Descriptor{
		Name:    Name,
		Summary: "socket-level service load balancing (connect, sendmsg, recvmsg, getpeername, bind)",
		// Per-packet lb serves what no socket hook sees: sockets outside
		// the node's cgroup, pods under hostNamespaceOnly, packets not
		// from a socket of this node.
		Requires: []string{lb.Name},
		Cgroup: []module.CgroupClaim{
			{Hook: "cgroup/connect4", Program: "sock4_connect"},
			{Hook: "cgroup/sendmsg4", Program: "sock4_sendmsg"},
			{Hook: "cgroup/recvmsg4", Program: "sock4_recvmsg"},
			{Hook: "cgroup/getpeername4", Program: "sock4_getpeername"},
			{Hook: "cgroup/post_bind4", Program: "sock4_post_bind"},
		},
		NewSettings: func() module.Settings { return &Settings{} },
	},
	Provide: func(s module.Settings) fx.Option {
		return fx.Options(fx.Supply(s.(*Settings)), module.Provide(New))
	},
}

// Params are what the module is built from.
type Params struct {
	fx.In
	Settings   *Settings
	Reconciler *lbmap.Reconciler
	Datapath   *datapath.Datapath
	Log        *slog.Logger
}

// Module is the running socketlb module.
type Module struct {
	s      *Settings
	term   *terminator
	cancel context.CancelFunc
	done   chan struct{}
}

var (
	_ module.Starter = (*Module)(nil)
	_ module.Stopper = (*Module)(nil)
)

var _ module.Loaded = (*Module)(nil)

// New builds the module. Taking the reconciler makes fx construct it; the
// backends that leave a frontend from its first write on are heard, so a
// restarted agent terminates sockets to backends that left while it was
// down.
func New(p Params) *Module {
	m := &Module{s: p.Settings, term: newTerminator(p.Datapath.Cgroup(), p.Log.With("module", Name))}
	p.Reconciler.OnDepartures(m.term.add)
	return m
}

// Name implements module.Module.
func (*Module) Name() string { return Name }

// Object implements module.Module: the settings and the node's network
// namespace become load-time constants.
func (m *Module) Object() (*ebpf.CollectionSpec, error) {
	if err := Probe(); err != nil {
		return nil, err
	}
	return ObjectSpec(m.s)
}

// ObjectSpec returns the module's BPF object for the network namespace of
// the calling thread.
func ObjectSpec(s *Settings) (*ebpf.CollectionSpec, error) {
	spec, err := loadSocketlb()
	if err != nil {
		return nil, err
	}
	var hostOnly uint8
	var cookie uint64
	if s.HostNamespaceOnly {
		hostOnly = 1
		if cookie, err = NetnsCookie(); err != nil {
			return nil, err
		}
	}
	for name, v := range map[string]any{"socketlb_host_only": hostOnly, "socketlb_host_netns": cookie} {
		if err := spec.Variables[name].Set(v); err != nil {
			return nil, fmt.Errorf("setting %s: %w", name, err)
		}
	}
	return spec, nil
}

// NetnsCookie is the cookie of the calling thread's network namespace, as
// bpf_get_netns_cookie sees it (SO_NETNS_COOKIE, Linux 5.14).
func NetnsCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("reading the network namespace's cookie: %w", err)
	}
	defer unix.Close(fd)
	v, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("reading the network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14): %w", err)
	}
	return v, nil
}

// Loaded implements module.Loaded: the socket iterators that terminate
// sockets come from the loaded object.
func (m *Module) Loaded(coll *ebpf.Collection) error { return m.term.load(coll) }

// Start implements module.Starter: socket termination runs until Stop.
func (m *Module) Start(context.Context) error {
	ctx, cancel := context.WithCancel(context.Background())
	m.cancel, m.done = cancel, make(chan struct{})
	go func() {
		defer close(m.done)
		m.term.run(ctx)
	}()
	return nil
}

// Stop implements module.Stopper.
func (m *Module) Stop(context.Context) error {
	if m.cancel != nil {
		m.cancel()
		<-m.done
	}
	m.term.close()
	return nil
}
