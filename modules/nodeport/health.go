package nodeport

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/weirnet/weir/core/model"
)

// healthChecks answers, on every service's healthCheckNodePort, whether
// this node has local backends for it, as kube-proxy does: external load
// balancers send traffic for externalTrafficPolicy Local services only to
// nodes that answer 200.
type healthChecks struct {
	node string
	// listen opens a port's listener (tests bind elsewhere).
	listen func(port uint16) (net.Listener, error)
	log    *slog.Logger

	mu       sync.Mutex
	services map[model.ServiceName]*hcService
	servers  map[uint16]*hcServer
}

type hcService struct {
	port  uint16
	local int
}

type hcServer struct {
	srv  *http.Server
	done chan struct{}
}

// hcAnswer is kube-proxy's response body.
type hcAnswer struct {
	Service struct {
		Namespace string `json:"namespace"`
		Name      string `json:"name"`
	} `json:"service"`
	LocalEndpoints      int  `json:"localEndpoints"`
	ServiceProxyHealthy bool `json:"serviceProxyHealthy"`
}

func newHealthChecks(node string, log *slog.Logger) *healthChecks {
	return &healthChecks{
		node: node, log: log,
		listen: func(port uint16) (net.Listener, error) {
			return net.Listen("tcp4", net.JoinHostPort("0.0.0.0", strconv.Itoa(int(port))))
		},
		services: map[model.ServiceName]*hcService{},
		servers:  map[uint16]*hcServer{},
	}
}

// localEndpoints counts the service's distinct backend addresses on this
// node that take new connections (as kube-proxy counts ready local
// endpoints).
func localEndpoints(svc *model.Service, node string) int {
	seen := map[string]bool{}
	for _, f := range svc.Frontends {
		for _, b := range f.Backends {
			if b.NodeName == node && b.State == model.Active {
				seen[b.Addr.Addr().String()] = true
			}
		}
	}
	return len(seen)
}

// apply follows a change of services: servers open on the ports of
// services that want one and close on ports no service wants. A port that
// cannot be opened is reported and tried again with the next change.
func (h *healthChecks) apply(d model.Delta) error {
	var closing []*hcServer
	// Servers close outside the lock: their handlers take it.
	defer func() {
		for _, s := range closing {
			s.close()
		}
	}()
	h.mu.Lock()
	defer h.mu.Unlock()
	if d.Full {
		for name := range h.services {
			if _, ok := d.Services[name]; !ok {
				delete(h.services, name)
			}
		}
	}
	for name, svc := range d.Services {
		if svc == nil || svc.HealthCheckNodePort == 0 {
			delete(h.services, name)
			continue
		}
		h.services[name] = &hcService{port: svc.HealthCheckNodePort, local: localEndpoints(svc, h.node)}
	}
	want := map[uint16]model.ServiceName{}
	for name, s := range h.services {
		want[s.port] = name
	}
	for port, srv := range h.servers {
		if _, ok := want[port]; !ok {
			closing = append(closing, srv)
			delete(h.servers, port)
		}
	}
	var errs []error
	for port, name := range want {
		if _, ok := h.servers[port]; ok {
			continue
		}
		ln, err := h.listen(port)
		if err != nil {
			errs = append(errs, fmt.Errorf("health check port %d of %s: %w", port, name, err))
			continue
		}
		srv := &hcServer{srv: &http.Server{Handler: h.handler(port), ReadHeaderTimeout: 5 * time.Second}, done: make(chan struct{})}
		go func() {
			defer close(srv.done)
			_ = srv.srv.Serve(ln)
		}()
		h.servers[port] = srv
		h.log.Info("serving a health check", "service", name.String(), "port", port)
	}
	return errors.Join(errs...)
}

// handler answers for whichever service holds the port now.
func (h *healthChecks) handler(port uint16) http.Handler {
	return http.HandlerFunc(func(rw http.ResponseWriter, _ *http.Request) {
		h.mu.Lock()
		var ans hcAnswer
		found := false
		for name, s := range h.services {
			if s.port == port {
				ans.Service.Namespace, ans.Service.Name, ans.LocalEndpoints = name.Namespace, name.Name, s.local
				found = true
				break
			}
		}
		h.mu.Unlock()
		ans.ServiceProxyHealthy = true
		rw.Header().Set("Content-Type", "application/json")
		rw.Header().Set("X-Content-Type-Options", "nosniff")
		rw.Header().Set("X-Load-Balancing-Endpoints", strconv.Itoa(ans.LocalEndpoints))
		if !found || ans.LocalEndpoints == 0 {
			rw.WriteHeader(http.StatusServiceUnavailable)
		}
		_ = json.NewEncoder(rw).Encode(ans)
	})
}

func (s *hcServer) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = s.srv.Shutdown(ctx)
	<-s.done
}

// close stops every server.
func (h *healthChecks) close() {
	h.mu.Lock()
	servers := h.servers
	h.servers = map[uint16]*hcServer{}
	h.mu.Unlock()
	for _, srv := range servers {
		srv.close()
	}
}
