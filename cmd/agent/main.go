// Command weir-agent is Weir's per-node daemon: it composes the modules its
// configuration selects for this node, loads their BPF into the kernel, and
// keeps the datapath in step with the services its sources describe.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"runtime/pprof"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/weirnet/weir/core/agent"
	"github.com/weirnet/weir/modules"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "weir-agent:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("weir-agent", flag.ContinueOnError)
	var (
		opts     agent.Options
		labels   string
		logLevel string
		logJSON  bool
	)
	host, _ := os.Hostname()
	fs.StringVar(&opts.ConfigPath, "config", "/etc/weir/config.yaml", "configuration file")
	fs.StringVar(&opts.NodeName, "node-name", host, "name of this node")
	fs.StringVar(&labels, "node-labels", "", "labels of this node, k=v,k2=v2 (select its node pool)")
	fs.StringVar(&opts.PinDir, "pin-dir", "/sys/fs/bpf/weir", "bpffs directory for this node's pinned maps and links")
	fs.StringVar(&opts.StateDir, "state-dir", "/var/lib/weir", "directory for state that survives restarts")
	fs.StringVar(&opts.ServicesFile, "services-file", "", "YAML file of services to serve (standalone mode), watched for changes")
	fs.StringVar(&opts.APISocket, "api-socket", "/run/weir/agent.sock", "unix socket of the local API")
	fs.StringVar(&opts.Cgroup, "cgroup", "", "cgroup v2 directory whose sockets this node's socket hooks see (default: the cgroup v2 root)")
	fs.StringVar(&opts.Kubeconfig, "kubeconfig", "", "Kubernetes client configuration (default: in-cluster when available, else standalone)")
	fs.BoolVar(&opts.Standalone, "standalone", false, "never use Kubernetes, even with an in-cluster configuration in the environment (services and nodes from --services-file)")
	fs.StringVar(&opts.NodeIP, "node-ip", "", "the node's IPv4 address toward other nodes (default: the Node's InternalIP, else the uplink's)")
	fs.StringVar(&opts.Uplink, "uplink", "", "the device toward other nodes (default: the one holding the node address, else the default route's)")
	fs.StringVar(&opts.MetricsAddr, "metrics-addr", ":9876", "where Prometheus metrics, /healthz and /readyz are served (empty: not served)")
	var podCIDRs string
	fs.StringVar(&podCIDRs, "pod-cidr", "", "standalone mode: the node's pod ranges, comma-separated (with Kubernetes they come from the Node)")
	fs.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	fs.BoolVar(&logJSON, "log-json", false, "log JSON lines instead of text")
	var cpuProfile string
	fs.StringVar(&cpuProfile, "cpu-profile", "", "write a CPU profile of the start (until every source synced and the first full state is in the datapath) to this file; later, /debug/pprof on the API socket")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(logLevel)); err != nil {
		return fmt.Errorf("--log-level %q: use debug, info, warn or error", logLevel)
	}
	hopts := &slog.HandlerOptions{Level: lvl}
	var h slog.Handler = slog.NewTextHandler(os.Stderr, hopts)
	if logJSON {
		h = slog.NewJSONHandler(os.Stderr, hopts)
	}
	opts.Logger = slog.New(h).With("node", opts.NodeName)
	var err error
	if opts.NodeLabels, err = parseLabels(labels); err != nil {
		return err
	}
	if opts.PodCIDRs, err = parseCIDRs(podCIDRs); err != nil {
		return err
	}

	if cpuProfile != "" {
		stop, err := profileStart(cpuProfile, opts.Logger)
		if err != nil {
			return err
		}
		opts.OnSettled = stop
	}

	reg, err := modules.Registry()
	if err != nil {
		return err
	}
	a, err := agent.New(opts, reg)
	if err != nil {
		return err
	}
	names := make([]string, len(a.Effective.Modules))
	for i, f := range a.Effective.Modules {
		names[i] = f.Name
	}
	opts.Logger.Info("starting", "pool", a.Effective.Pool, "modules", names)

	startCtx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := a.App.Start(startCtx); err != nil {
		return fmt.Errorf("starting: %w", err)
	}
	restart := ""
	select {
	case sig := <-a.App.Done(): // fx delivers SIGINT and SIGTERM here
		opts.Logger.Info("stopping; the datapath keeps forwarding", "signal", sig.String())
	case restart = <-a.Restart:
		opts.Logger.Info("restarting; the datapath keeps forwarding", "reason", restart)
	}
	stopCtx, cancel2 := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel2()
	if err := a.App.Stop(stopCtx); err != nil {
		return err
	}
	if restart != "" {
		// A new process image: the same flags, the new configuration.
		self, err := os.Executable()
		if err != nil {
			return err
		}
		return syscall.Exec(self, os.Args, os.Environ())
	}
	return nil
}

// parseLabels reads "k=v,k2=v2".
func parseLabels(s string) (map[string]string, error) {
	out := map[string]string{}
	if strings.TrimSpace(s) == "" {
		return out, nil
	}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok || k == "" {
			return nil, errors.New("--node-labels: " + kv + " is not key=value")
		}
		out[k] = v
	}
	return out, nil
}

// parseCIDRs reads "10.244.1.0/24,..." into canonical prefixes.
func parseCIDRs(s string) ([]string, error) {
	var out []string
	for _, c := range strings.Split(s, ",") {
		c = strings.TrimSpace(c)
		if c == "" {
			continue
		}
		p, err := netip.ParsePrefix(c)
		if err != nil || !p.Addr().Is4() || p.Masked() != p {
			return nil, errors.New("--pod-cidr: " + c + " is not an IPv4 network such as 10.244.1.0/24")
		}
		out = append(out, p.String())
	}
	return out, nil
}

// profileStart starts a CPU profile into path and returns what ends it
// (once: the agent calls it when it settled, or never).
func profileStart(path string, log *slog.Logger) (func(), error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("--cpu-profile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("--cpu-profile: %w", err)
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			pprof.StopCPUProfile()
			if err := f.Close(); err != nil {
				log.Warn("writing the start's CPU profile", "file", path, "err", err)
				return
			}
			log.Info("CPU profile of the start written", "file", path)
		})
	}, nil
}
