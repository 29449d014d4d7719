// Package endpoints is the endpoints module: it wires local pods into the
// node (a veth pair whose host end has no address, a pod default route via
// a link-local gateway that BPF answers), keeps the endpoints map, and
// delivers packets for local pods straight into their namespace with
// bpf_redirect_peer.
package endpoints

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"go.uber.org/fx"
	"golang.org/x/sys/unix"

	"github.com/weirnet/weir/core/api"
	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/module"
	"github.com/weirnet/weir/core/node"
	"github.com/weirnet/weir/core/slots"
)

// Name is the module's name in configuration.
const Name = "endpoints"

// Settings of the endpoints module.
type Settings struct {
	// GatewayIP is the pods' default gateway: a link-local address no
	// interface holds, answered by the BPF ARP responder.
	GatewayIP string `yaml:"gatewayIP"`
	// MTU of pod interfaces; 0 takes the uplink's MTU minus the overhead
	// of the forwarding module (a tunnel's headers).
	MTU int `yaml:"mtu"`
	// StaleAfter is how long an endpoint whose pod no longer exists (its
	// CNI DEL never came) is kept before it is removed; "0s" keeps it.
	// Only with Kubernetes, which says which pods exist.
	StaleAfter string `yaml:"staleAfter"`
	staleAfter time.Duration
}

// DefaultSettings returns the defaults.
func DefaultSettings() *Settings {
	return &Settings{GatewayIP: "169.254.1.1", MTU: 0, StaleAfter: "2m", staleAfter: 2 * time.Minute}
}

// Validate implements module.Settings.
func (s *Settings) Validate() error {
	a, err := netip.ParseAddr(s.GatewayIP)
	if err != nil || !a.Is4() {
		return &module.FieldError{Path: "gatewayIP", Msg: fmt.Sprintf("%q is not an IPv4 address", s.GatewayIP)}
	}
	if a.IsUnspecified() || a.IsMulticast() || a.IsLoopback() {
		return &module.FieldError{Path: "gatewayIP", Msg: fmt.Sprintf("%s cannot be a gateway; use a link-local address such as 169.254.1.1", a)}
	}
	if s.MTU != 0 && (s.MTU < 576 || s.MTU > 65535) {
		return &module.FieldError{Path: "mtu", Msg: fmt.Sprintf("%d is out of range (576 to 65535, or 0 for the uplink's MTU minus tunnel overhead)", s.MTU)}
	}
	d, err := time.ParseDuration(s.StaleAfter)
	if err != nil || d < 0 || (d > 0 && d < time.Second) {
		return &module.FieldError{Path: "staleAfter", Msg: fmt.Sprintf("%q is not a duration of at least 1s (such as 2m), or 0s to keep such endpoints", s.StaleAfter)}
	}
	s.staleAfter = d
	return nil
}

func (s *Settings) gateway() netip.Addr { return netip.MustParseAddr(s.GatewayIP) }

// Factory registers the module.
var Factory = module.Factory{
	Descriptor: module.Descriptor{
		Name:    Name,
		Summary: "wires local pods and delivers to them with bpf_redirect_peer",
		Slots: []module.SlotClaim{
			{Slot: "pod-egress/arp", Program: "endpoints_arp"},
			{Slot: "pod-egress/local", Program: "endpoints_local"},
			{Slot: "pod-ingress/deliver", Program: "endpoints_deliver"},
			// Packets for local pods arriving from other nodes go
			// straight in, skipping the node's stack.
			{Slot: "netdev-ingress/local", Program: "endpoints_local"},
		},
		NewSettings: func() module.Settings { return DefaultSettings() },
	},
	Provide: func(s module.Settings) fx.Option {
		return fx.Options(fx.Supply(s.(*Settings)), module.Provide(New))
	},
}

// Params are the module's dependencies.
type Params struct {
	fx.In
	Settings  *Settings
	DP        *datapath.Datapath
	API       *api.Server
	Node      *node.Info
	Log       *slog.Logger
	Overheads []module.MTUOverhead `group:"mtu-overhead"`
	// Pods is there when the agent follows Kubernetes.
	Pods node.Pods `optional:"true"`
}

// Module is the running endpoints module.
type Module struct {
	s    *Settings
	mtu  int
	pods node.Pods
	stop context.CancelFunc
	done chan struct{}
	dp   *datapath.Datapath
	log  *slog.Logger
	dir  string
	mu   sync.Mutex
	eps  map[string]*api.Endpoint
	addr map[netip.Addr]string
	api  *api.Server
}

var (
	_ module.Starter = (*Module)(nil)
	_ module.Stopper = (*Module)(nil)
)

// New builds the module; Start serves its API.
func New(p Params) (*Module, error) {
	m := &Module{
		s:    p.Settings,
		mtu:  podMTU(p.Settings.MTU, p.Node.Uplink, p.Overheads),
		pods: p.Pods,
		dp:   p.DP,
		log:  p.Log.With("module", Name),
		dir:  filepath.Join(p.Node.StateDir, "endpoints"),
		eps:  map[string]*api.Endpoint{},
		addr: map[netip.Addr]string{},
	}
	m.api = p.API
	return m, nil
}

// podMTU is the configured MTU, or the uplink's (1500 without one) less
// the largest encapsulation overhead.
func podMTU(configured int, up node.Uplink, overheads []module.MTUOverhead) int {
	if configured != 0 {
		return configured
	}
	mtu := 1500
	if up.Valid() && up.MTU > 0 {
		mtu = up.MTU
	}
	largest := 0
	for _, o := range overheads {
		largest = max(largest, int(o))
	}
	return mtu - largest
}

// Name implements module.Module.
func (m *Module) Name() string { return Name }

// Object implements module.Module.
func (m *Module) Object() (*ebpf.CollectionSpec, error) { return ObjectSpec(m.s) }

// ObjectSpec returns the module's BPF object configured with s.
func ObjectSpec(s *Settings) (*ebpf.CollectionSpec, error) {
	spec, err := loadEndpoints()
	if err != nil {
		return nil, err
	}
	if err := spec.Variables["endpoints_gateway_ip"].Set(datapath.AddrToBE(s.gateway())); err != nil {
		return nil, fmt.Errorf("setting the gateway address: %w", err)
	}
	return spec, nil
}

// Start restores the endpoints a previous agent wired: their entry programs
// move to the freshly loaded ones, and leftovers of pods that vanished while
// the agent was down are removed.
func (m *Module) Start(context.Context) error {
	if err := os.MkdirAll(m.dir, 0o700); err != nil {
		return fmt.Errorf("creating endpoint state directory: %w", err)
	}
	files, err := filepath.Glob(filepath.Join(m.dir, "*.json"))
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("reading %s: %w", f, err)
		}
		var ep api.Endpoint
		if err := json.Unmarshal(data, &ep); err != nil {
			m.log.Error("discarding unreadable endpoint state", "file", f, "err", err)
			_ = os.Remove(f)
			continue
		}
		if err := m.restore(&ep); err != nil {
			m.log.Warn("endpoint did not survive; removing it", "id", ep.ID, "err", err)
			m.forget(&ep)
			continue
		}
		m.eps[ep.ID] = &ep
		m.addr[netip.MustParseAddr(ep.Address)] = ep.ID
	}
	m.pruneMap()
	m.log.Info("endpoints restored", "count", len(m.eps))
	// Registered once the state is restored: a module set applied live
	// hands the patterns from the previous instance to this one here.
	m.api.Handle("POST /v1/endpoints", m.handleCreate)
	m.api.Handle("GET /v1/endpoints", m.handleList)
	m.api.Handle("GET /v1/endpoints/{id}", m.handleGet)
	m.api.Handle("DELETE /v1/endpoints/{id}", m.handleDelete)
	if m.pods != nil && m.s.staleAfter > 0 {
		ctx, cancel := context.WithCancel(context.Background())
		m.stop, m.done = cancel, make(chan struct{})
		go m.collect(ctx)
	}
	return nil
}

// Stop implements module.Stopper: endpoints stay wired while the agent is
// down.
func (m *Module) Stop(context.Context) error {
	if m.stop != nil {
		m.stop()
		<-m.done
	}
	return nil
}

// collect removes endpoints whose pod has been gone for staleAfter: a
// runtime that never ran CNI DEL (it crashed, or lost its state) would
// otherwise leave their interface and map entry behind for good.
func (m *Module) collect(ctx context.Context) {
	defer close(m.done)
	every := min(m.s.staleAfter/2, 30*time.Second)
	tick := time.NewTicker(every)
	defer tick.Stop()
	missing := map[string]time.Time{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		m.mu.Lock()
		for id, ep := range m.eps {
			if ep.PodName == "" {
				continue
			}
			exists, synced := m.pods.PodOnNode(ep.PodNamespace, ep.PodName)
			if !synced {
				break
			}
			if exists {
				delete(missing, id)
				continue
			}
			since, seen := missing[id]
			if !seen {
				missing[id] = time.Now()
				continue
			}
			if time.Since(since) >= m.s.staleAfter {
				m.log.Warn("removing the endpoint of a pod that no longer exists", "id", id, "pod", ep.PodNamespace+"/"+ep.PodName, "address", ep.Address)
				m.forget(ep)
				delete(missing, id)
			}
		}
		m.mu.Unlock()
	}
}

func (m *Module) restore(ep *api.Endpoint) error {
	addr, err := netip.ParseAddr(ep.Address)
	if err != nil {
		return err
	}
	l, err := net.InterfaceByName(ep.HostIfName)
	if err != nil {
		return fmt.Errorf("host interface %s: %w", ep.HostIfName, err)
	}
	if l.Index != ep.HostIfindex {
		return fmt.Errorf("host interface %s has index %d, was %d", ep.HostIfName, l.Index, ep.HostIfindex)
	}
	if err := hostRoute(l.Index, addr); err != nil {
		return err
	}
	return m.program(ep, addr)
}

// program writes the endpoint's map entry and attaches the hook entry
// programs to its host interface.
func (m *Module) program(ep *api.Endpoint, addr netip.Addr) error {
	mac, err := net.ParseMAC(ep.MAC)
	if err != nil {
		return err
	}
	hostMAC, err := net.ParseMAC(ep.HostMAC)
	if err != nil {
		return err
	}
	val := datapath.Endpoint{Ifindex: uint32(ep.HostIfindex)}
	copy(val.Mac[:], mac)
	copy(val.NodeMac[:], hostMAC)
	if err := m.dp.Endpoints().Put(datapath.EndpointKey{Addr: datapath.AddrToBE(addr)}, val); err != nil {
		return fmt.Errorf("writing endpoint map entry: %w", err)
	}
	for _, h := range []slots.Hook{slots.PodEgress, slots.PodIngress} {
		if err := m.dp.Attach(ep.HostIfindex, ep.HostIfName, h); err != nil {
			return err
		}
	}
	return nil
}

// pruneMap removes map entries no endpoint owns (a crash between wiring and
// saving state).
func (m *Module) pruneMap() {
	var (
		k     datapath.EndpointKey
		v     datapath.Endpoint
		stale []datapath.EndpointKey
	)
	it := m.dp.Endpoints().Iterate()
	for it.Next(&k, &v) {
		if _, ok := m.addr[datapath.AddrFromBE(k.Addr)]; !ok {
			stale = append(stale, k)
		}
	}
	for _, k := range stale {
		_ = m.dp.Endpoints().Delete(k)
	}
}

// forget removes every trace of an endpoint; each step tolerates pieces
// that are already gone.
func (m *Module) forget(ep *api.Endpoint) {
	for _, h := range []slots.Hook{slots.PodEgress, slots.PodIngress} {
		if err := m.dp.Detach(ep.HostIfName, h); err != nil {
			m.log.Warn("detaching endpoint hook", "id", ep.ID, "hook", h, "err", err)
		}
	}
	if addr, err := netip.ParseAddr(ep.Address); err == nil {
		_ = m.dp.Endpoints().Delete(datapath.EndpointKey{Addr: datapath.AddrToBE(addr)})
		if err := unplumb(ep.HostIfName, addr); err != nil {
			m.log.Warn("removing endpoint interface", "id", ep.ID, "err", err)
		}
		if m.addr[addr] == ep.ID {
			delete(m.addr, addr)
		}
	}
	_ = os.Remove(m.stateFile(ep.ID))
	delete(m.eps, ep.ID)
}

func (m *Module) stateFile(id string) string { return filepath.Join(m.dir, id+".json") }

func (m *Module) save(ep *api.Endpoint) error {
	data, err := json.MarshalIndent(ep, "", "  ")
	if err != nil {
		return err
	}
	tmp := m.stateFile(ep.ID) + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("saving endpoint state: %w", err)
	}
	if err := os.Rename(tmp, m.stateFile(ep.ID)); err != nil {
		return fmt.Errorf("saving endpoint state: %w", err)
	}
	return nil
}

// requestError is a client mistake (HTTP 400) or conflict (409).
type requestError struct {
	code int
	msg  string
}

func (e *requestError) Error() string { return e.msg }

func badRequest(format string, a ...any) error {
	return &requestError{http.StatusBadRequest, fmt.Sprintf(format, a...)}
}

var validID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

func validate(req *api.EndpointRequest) (netip.Addr, error) {
	if !validID.MatchString(req.ID) {
		return netip.Addr{}, badRequest("id %q is invalid: 1 to 128 characters of letters, digits, '.', '_' or '-'", req.ID)
	}
	if req.IfName == "" {
		req.IfName = "eth0"
	}
	if len(req.IfName) > unix.IFNAMSIZ-1 || req.IfName == "." || req.IfName == ".." || slices.ContainsFunc([]byte(req.IfName), func(c byte) bool { return c == '/' || c <= ' ' || c == ':' }) {
		return netip.Addr{}, badRequest("ifName %q is not a valid interface name (at most 15 characters, no '/', ':' or spaces)", req.IfName)
	}
	addr, err := netip.ParseAddr(req.Address)
	if err != nil || !addr.Is4() {
		return netip.Addr{}, badRequest("address %q is not an IPv4 address", req.Address)
	}
	if addr.IsUnspecified() || addr.IsLoopback() || addr.IsMulticast() || addr.IsLinkLocalUnicast() {
		return netip.Addr{}, badRequest("address %s cannot be a pod address", addr)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(req.Netns, &st); err != nil {
		return netip.Addr{}, badRequest("netns %q: %v", req.Netns, err)
	}
	if st.Type != unix.NSFS_MAGIC && st.Type != unix.PROC_SUPER_MAGIC {
		return netip.Addr{}, badRequest("netns %q is not a network namespace", req.Netns)
	}
	return addr, nil
}

// Create wires a pod. A repeated request for the same ID with the same
// parameters returns the existing endpoint.
func (m *Module) Create(req api.EndpointRequest) (*api.Endpoint, error) {
	addr, err := validate(&req)
	if err != nil {
		return nil, err
	}
	if addr == m.s.gateway() {
		return nil, badRequest("address %s is the pods' gateway", addr)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if ep, ok := m.eps[req.ID]; ok {
		if ep.Address == addr.String() && ep.Netns == req.Netns && ep.IfName == req.IfName {
			return ep, nil
		}
		return nil, &requestError{http.StatusConflict, fmt.Sprintf("endpoint %s exists with address %s in %s", req.ID, ep.Address, ep.Netns)}
	}
	if owner, ok := m.addr[addr]; ok {
		return nil, &requestError{http.StatusConflict, fmt.Sprintf("address %s is already used by endpoint %s", addr, owner)}
	}

	hostName := hostIfName(req.ID)
	w, err := plumb(hostName, req.Netns, req.IfName, addr, m.s.gateway(), m.mtu)
	if err != nil {
		return nil, err
	}
	ep := &api.Endpoint{
		ID: req.ID, Netns: req.Netns, IfName: req.IfName, Address: addr.String(),
		Gateway: m.s.GatewayIP, MAC: w.podMAC.String(), HostIfName: hostName,
		HostIfindex: w.hostIndex, HostMAC: w.hostMAC.String(), MTU: m.mtu,
		PodNamespace: req.PodNamespace, PodName: req.PodName,
	}
	if err := m.program(ep, addr); err != nil {
		m.forget(ep)
		return nil, err
	}
	if err := m.save(ep); err != nil {
		m.forget(ep)
		return nil, err
	}
	m.eps[ep.ID] = ep
	m.addr[addr] = ep.ID
	m.log.Info("endpoint created", "id", ep.ID, "address", ep.Address, "host_if", hostName, "pod", ep.PodNamespace+"/"+ep.PodName)
	return ep, nil
}

// Delete unwires a pod; unknown IDs are not an error (CNI DEL is
// idempotent).
func (m *Module) Delete(id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	ep, ok := m.eps[id]
	if !ok {
		return nil
	}
	m.forget(ep)
	m.log.Info("endpoint deleted", "id", id, "address", ep.Address)
	return nil
}

// List returns every endpoint, sorted by ID.
func (m *Module) List() []api.Endpoint {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]api.Endpoint, 0, len(m.eps))
	for _, ep := range m.eps {
		out = append(out, *ep)
	}
	slices.SortFunc(out, func(a, b api.Endpoint) int {
		if a.ID < b.ID {
			return -1
		}
		if a.ID > b.ID {
			return 1
		}
		return 0
	})
	return out
}

func (m *Module) handleCreate(w http.ResponseWriter, r *http.Request) {
	var req api.EndpointRequest
	if err := api.DecodeJSON(r, &req); err != nil {
		api.WriteError(w, http.StatusBadRequest, err)
		return
	}
	ep, err := m.Create(req)
	if err != nil {
		writeErr(w, err)
		return
	}
	api.WriteJSON(w, http.StatusOK, ep)
}

func (m *Module) handleList(w http.ResponseWriter, _ *http.Request) {
	api.WriteJSON(w, http.StatusOK, m.List())
}

func (m *Module) handleGet(w http.ResponseWriter, r *http.Request) {
	m.mu.Lock()
	ep, ok := m.eps[r.PathValue("id")]
	m.mu.Unlock()
	if !ok {
		api.WriteError(w, http.StatusNotFound, fmt.Errorf("no endpoint %q", r.PathValue("id")))
		return
	}
	api.WriteJSON(w, http.StatusOK, ep)
}

func (m *Module) handleDelete(w http.ResponseWriter, r *http.Request) {
	if err := m.Delete(r.PathValue("id")); err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func writeErr(w http.ResponseWriter, err error) {
	var re *requestError
	if errors.As(err, &re) {
		api.WriteError(w, re.code, err)
		return
	}
	api.WriteError(w, http.StatusInternalServerError, err)
}
