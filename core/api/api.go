// Package api is the agent's local control API: JSON over HTTP on a unix
// socket. The CNI plugin and the lab use it to create and delete pod
// endpoints; the CLI reads status from it. Modules register their handlers
// on the Server.
package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/weirnet/weir/core/ctgc"
	"github.com/weirnet/weir/core/filesource"
	"github.com/weirnet/weir/core/lbmap"
)

// EndpointRequest asks the agent to wire a pod into the node.
type EndpointRequest struct {
	// ID identifies the pod sandbox (the CNI container ID); requests with
	// the same ID are idempotent.
	ID string `json:"id"`
	// Netns is the path of the pod's network namespace.
	Netns string `json:"netns"`
	// IfName is the interface to create inside the pod (default eth0).
	IfName string `json:"ifName,omitempty"`
	// Address is the pod's IPv4 address.
	Address      string `json:"address"`
	PodNamespace string `json:"podNamespace,omitempty"`
	PodName      string `json:"podName,omitempty"`
}

// Endpoint is a wired pod.
type Endpoint struct {
	ID           string `json:"id"`
	Netns        string `json:"netns"`
	IfName       string `json:"ifName"`
	Address      string `json:"address"`
	Gateway      string `json:"gateway"`
	MAC          string `json:"mac"`
	HostIfName   string `json:"hostIfName"`
	HostIfindex  int    `json:"hostIfindex"`
	HostMAC      string `json:"hostMAC"`
	MTU          int    `json:"mtu"`
	PodNamespace string `json:"podNamespace,omitempty"`
	PodName      string `json:"podName,omitempty"`
}

// Status describes the running agent.
type Status struct {
	Node    string   `json:"node"`
	Pool    string   `json:"pool"`
	Modules []string `json:"modules"`
	// Slots are the tail-call slots each module's programs fill.
	Slots  map[string][]string `json:"slots,omitempty"`
	PinDir string              `json:"pinDir"`
	// Ready is true once the datapath is installed and every source of
	// services has synced.
	Ready bool `json:"ready"`
	// PodCIDRs are the node's pod address ranges (Node.spec.podCIDRs, or
	// the --pod-cidr flag), from which the CNI plugin allocates.
	PodCIDRs []string `json:"podCIDRs"`
	// Cgroup is the cgroup v2 directory the socket hooks are on, and
	// CgroupHooks the program each claimed hook runs ("cgroup/connect4":
	// "sock4_connect").
	Cgroup      string            `json:"cgroup,omitempty"`
	CgroupHooks map[string]string `json:"cgroupHooks,omitempty"`
	// HeapBytes is the Go heap in use by the agent.
	HeapBytes uint64 `json:"heapBytes"`
	// Conntrack is the last pass of the conntrack collector: fill level,
	// pressure, what it removed, when it runs next.
	Conntrack *ctgc.Stats `json:"conntrack,omitempty"`
	// Maps says how full each shared map is.
	Maps []lbmap.MapFill `json:"maps,omitempty"`
	// Services is what the service maps hold (the store version applied,
	// the last error) and the work spent writing them; absent on nodes
	// that translate no services.
	Services *lbmap.Status `json:"services,omitempty"`
	// File is what became of the services file (standalone mode).
	File *filesource.Status `json:"file,omitempty"`
	// Kubernetes is what the Kubernetes source did.
	Kubernetes *KubeStatus `json:"kubernetes,omitempty"`
	// Plugins are the plugins the configuration declares.
	Plugins []PluginStatus `json:"plugins,omitempty"`
}

// PluginStatus is one declared plugin: whether the node's module set runs
// it, its process and how often the agent restarted it.
type PluginStatus struct {
	Name          string `json:"name"`
	Version       string `json:"version"`
	Path          string `json:"path"`
	Enabled       bool   `json:"enabled"`
	PID           int    `json:"pid"`
	Restarts      int64  `json:"restarts"`
	FailurePolicy string `json:"failurePolicy"`
}

// KubeStatus is what the Kubernetes source did: whether and how fast its
// caches synced, the rounds of changes it handed on and the CPU time they
// took, and the services the datapath refused (full maps).
type KubeStatus struct {
	Synced     bool   `json:"synced"`
	SyncMillis int64  `json:"syncMillis"`
	Services   int    `json:"services"`
	Rounds     uint64 `json:"rounds"`
	Changed    uint64 `json:"servicesChanged"`
	WorkMicros uint64 `json:"workMicros"`
	Refused    int    `json:"refused"`
	LastError  string `json:"lastError,omitempty"`
}

// Error is the body of every non-2xx response.
type Error struct {
	Error string `json:"error"`
}

// Server serves the API on a unix socket.
type Server struct {
	socket string
	mux    *http.ServeMux
	srv    *http.Server
	log    *slog.Logger

	mu sync.RWMutex
	// handlers are the current handler of each pattern: a module set
	// applied live hands its module's patterns to the new instances.
	handlers map[string]http.HandlerFunc
}

// NewServer returns a server for socket; handlers are added with Handle
// before Start.
func NewServer(socket string, log *slog.Logger) *Server {
	if log == nil {
		log = slog.Default()
	}
	mux := http.NewServeMux()
	// Profiles of the running agent (curl --unix-socket SOCKET
	// http://agent/debug/pprof/profile?seconds=10 > cpu.pb): only root
	// reaches the socket, and finding where time and memory go at scale
	// needs the agent as it runs, not a reproduction.
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return &Server{socket: socket, mux: mux, log: log, handlers: map[string]http.HandlerFunc{},
		srv: &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}}
}

// Handle registers a handler (Go ServeMux pattern, e.g. "POST /v1/endpoints"),
// or replaces the pattern's handler, at any time.
func (s *Server) Handle(pattern string, h http.HandlerFunc) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.handlers[pattern]; !ok {
		s.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			s.mu.RLock()
			cur := s.handlers[pattern]
			s.mu.RUnlock()
			if cur == nil {
				WriteJSON(w, http.StatusNotFound, Error{Error: "no module of the node's current set serves " + pattern})
				return
			}
			cur(w, r)
		})
	}
	s.handlers[pattern] = h
}

// Unhandle removes a pattern's handler: requests get 404 until a handler
// is registered again.
func (s *Server) Unhandle(pattern string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.handlers[pattern]; ok {
		s.handlers[pattern] = nil
	}
}

// Start listens on the socket, replacing a stale socket file.
func (s *Server) Start() error {
	if err := os.MkdirAll(filepath.Dir(s.socket), 0o755); err != nil {
		return fmt.Errorf("creating API socket directory: %w", err)
	}
	if err := os.Remove(s.socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing stale API socket: %w", err)
	}
	ln, err := net.Listen("unix", s.socket)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", s.socket, err)
	}
	if err := os.Chmod(s.socket, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("restricting API socket: %w", err)
	}
	go func() {
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("API server stopped", "err", err)
		}
	}()
	return nil
}

// Stop shuts the server down and removes the socket.
func (s *Server) Stop(ctx context.Context) error {
	err := s.srv.Shutdown(ctx)
	_ = os.Remove(s.socket)
	return err
}

// WriteJSON writes v with the status code.
func WriteJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// WriteError writes an Error body.
func WriteError(w http.ResponseWriter, code int, err error) {
	WriteJSON(w, code, Error{Error: err.Error()})
}

// DecodeJSON decodes a request body strictly: unknown fields are errors.
func DecodeJSON(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("invalid request body: %w", err)
	}
	return nil
}
