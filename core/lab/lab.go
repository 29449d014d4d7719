// Package lab builds a cluster out of network namespaces on this machine: a
// shared underlay bridge, nodes attached to it each running its own
// weir-agent with its own bpffs pin directory and cgroup, and pods wired by
// those agents. Its state is kept on disk so that one process can bring a
// lab up and another can inspect it or tear it down.
package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"gopkg.in/yaml.v3"

	"github.com/weirnet/weir/core/api"
	"github.com/weirnet/weir/core/lab/controlplane"
	"github.com/weirnet/weir/core/mounts"
	"github.com/weirnet/weir/core/netns"
	"github.com/weirnet/weir/core/proc"
)

// Default locations of lab state.
const (
	DefaultStateRoot = "/run/weir/lab"
	DefaultPinRoot   = mounts.DefaultBPFFS + "/weir-lab"
)

// Options say where the lab's programs are and where its state goes.
type Options struct {
	// AgentBinary is the weir-agent executable. Required.
	AgentBinary string
	// ServeBinary is the weir executable, used to run pod workloads as
	// processes ("weir lab serve"). Empty: workloads are not started, the
	// caller serves them itself (tests do, in-process).
	ServeBinary string
	StateRoot   string
	PinRoot     string
	// CNIBinDir holds weir-cni (Kubernetes mode).
	CNIBinDir string
	// AgentArgs are extra weir-agent flags (e.g. --log-level=debug).
	AgentArgs []string
	Logger    *slog.Logger
}

// Binaries are the programs a lab runs, kept with its state so another
// process (restart-agent, the kubelets) finds them.
type Binaries struct {
	Agent  string `json:"agent"`
	Serve  string `json:"serve,omitempty"`
	CNIDir string `json:"cniDir,omitempty"`
}

func (o *Options) defaults() {
	if o.StateRoot == "" {
		o.StateRoot = DefaultStateRoot
	}
	if o.PinRoot == "" {
		o.PinRoot = DefaultPinRoot
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
}

// Lab is a running lab.
type Lab struct {
	Spec     Spec    `json:"spec"`
	Dir      string  `json:"dir"`
	Underlay string  `json:"underlay"` // namespace name
	Nodes    []*Node `json:"nodes"`
	Options  Options `json:"-"`
	// Cgroup is the lab's cgroup v2 directory.
	Cgroup   string   `json:"cgroup"`
	Binaries Binaries `json:"binaries"`
	// ControlPlane and Kubeconfig exist in Kubernetes mode.
	ControlPlane *controlplane.ControlPlane `json:"controlPlane,omitempty"`
	Kubeconfig   string                     `json:"kubeconfig,omitempty"`
	// AdminKubeconfig is the control plane's admin credential (the lab's
	// kubelets and tools); Kubeconfig is the agents' (the install's
	// service account).
	AdminKubeconfig string `json:"adminKubeconfig,omitempty"`
	// Externals are the hosts outside the cluster; Router the namespace
	// routing between the underlay and their subnets ("" when no host
	// needs it).
	Externals []*External `json:"externals,omitempty"`
	Router    string      `json:"router,omitempty"`
}

// External is a host outside the cluster.
type External struct {
	Name  string `json:"name"`
	Netns string `json:"netns"`
	IP    string `json:"ip"`
	// Gateway is the router's address facing the host (beyond the
	// router), or "" for hosts on the underlay.
	Gateway   string   `json:"gateway,omitempty"`
	Serve     Workload `json:"serve"`
	ServerPID int      `json:"serverPID,omitempty"`
}

// NetnsPath is the host's namespace path.
func (e *External) NetnsPath() string { return netns.Path(e.Netns) }

// External returns the external host with the given name, or nil.
func (l *Lab) External(name string) *External {
	for _, e := range l.Externals {
		if e.Name == name {
			return e
		}
	}
	return nil
}

// Node is a lab node.
type Node struct {
	Name         string            `json:"name"`
	Labels       map[string]string `json:"labels,omitempty"`
	PodCIDR      string            `json:"podCIDR"`
	Netns        string            `json:"netns"`
	IP           string            `json:"ip"`
	PinDir       string            `json:"pinDir"`
	StateDir     string            `json:"stateDir"`
	APISocket    string            `json:"apiSocket"`
	Cgroup       string            `json:"cgroup"`
	Config       string            `json:"config"`
	ServicesFile string            `json:"servicesFile"`
	Log          string            `json:"log"`
	AgentPID     int               `json:"agentPID"`
	KubeletPID   int               `json:"kubeletPID,omitempty"`
	Pods         []*Pod            `json:"pods"`
}

// Pod is a lab pod.
type Pod struct {
	Name      string   `json:"name"`
	Namespace string   `json:"namespace,omitempty"`
	Node      string   `json:"node"`
	Netns     string   `json:"netns"`
	IP        string   `json:"ip"`
	ID        string   `json:"id"`
	Serve     Workload `json:"serve"`
	ServerPID int      `json:"serverPID,omitempty"`
}

// NetnsPath is the pod's namespace path.
func (p *Pod) NetnsPath() string { return netns.Path(p.Netns) }

// NetnsPath is the node's namespace path.
func (n *Node) NetnsPath() string { return netns.Path(n.Netns) }

// Client returns an API client for the node's agent.
func (n *Node) Client() *api.Client { return api.NewClient(n.APISocket) }

func stateFile(dir string) string { return filepath.Join(dir, "lab.json") }

// Load reads the state of a lab that is up.
func Load(name string, opts Options) (*Lab, error) {
	opts.defaults()
	dir := filepath.Join(opts.StateRoot, name)
	data, err := os.ReadFile(stateFile(dir))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("lab %q is not up (no %s)", name, stateFile(dir))
	}
	if err != nil {
		return nil, err
	}
	var l Lab
	if err := json.Unmarshal(data, &l); err != nil {
		return nil, fmt.Errorf("reading lab state %s: %w", stateFile(dir), err)
	}
	l.Options = opts
	return &l, nil
}

func (l *Lab) save() error {
	data, err := json.MarshalIndent(l, "", "  ")
	if err != nil {
		return err
	}
	tmp := stateFile(l.Dir) + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, stateFile(l.Dir))
}

// Node returns the named node.
func (l *Lab) Node(name string) *Node {
	for _, n := range l.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// Pod returns the named pod.
func (l *Lab) Pod(name string) *Pod {
	for _, n := range l.Nodes {
		for _, p := range n.Pods {
			if p.Name == name {
				return p
			}
		}
	}
	return nil
}

// Up builds the lab. On failure everything it made so far is removed.
func Up(ctx context.Context, spec *Spec, opts Options) (l *Lab, err error) {
	opts.defaults()
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	if opts.AgentBinary == "" {
		return nil, errors.New("lab: the weir-agent binary is required")
	}
	if spec.Kubernetes && (opts.ServeBinary == "" || opts.CNIBinDir == "") {
		return nil, errors.New("lab: with Kubernetes, the weir binary (kubelet, workloads) and the weir-cni directory are required")
	}
	dir := filepath.Join(opts.StateRoot, spec.Name)
	if _, err := os.Stat(stateFile(dir)); err == nil {
		return nil, fmt.Errorf("lab %q is already up; bring it down first (weir lab down %s)", spec.Name, spec.Name)
	}
	cgRoot, err := mounts.Cgroup2Root()
	if err != nil {
		return nil, err
	}
	l = &Lab{Spec: *spec, Dir: dir, Underlay: spec.Name + "-ul", Options: opts,
		Cgroup:   filepath.Join(cgRoot, "weir-lab", spec.Name),
		Binaries: Binaries{Agent: opts.AgentBinary, Serve: opts.ServeBinary, CNIDir: opts.CNIBinDir}}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating lab state directory: %w", err)
	}
	defer func() {
		if err != nil {
			if derr := l.Down(); derr != nil {
				err = errors.Join(err, fmt.Errorf("cleaning up: %w", derr))
			}
			l = nil
		}
	}()
	if err := l.save(); err != nil {
		return l, err
	}
	if err := l.buildUnderlay(); err != nil {
		return l, err
	}
	if err := l.addExternals(); err != nil {
		return l, err
	}
	if spec.Kubernetes {
		if err := l.startControlPlane(ctx); err != nil {
			return l, err
		}
	}
	for i := range spec.Nodes {
		if err := l.addNode(ctx, i); err != nil {
			return l, err
		}
	}
	if spec.Kubernetes {
		c, err := l.Kube()
		if err != nil {
			return l, err
		}
		if err := l.createSpecPods(ctx, c); err != nil {
			return l, err
		}
	}
	return l, nil
}

func (l *Lab) buildUnderlay() error {
	path, err := netns.Create(l.Underlay)
	if err != nil {
		return err
	}
	h, err := netns.Handle(path)
	if err != nil {
		return err
	}
	defer h.Close()
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}
	if err := h.LinkAdd(br); err != nil {
		return fmt.Errorf("creating the underlay bridge: %w", err)
	}
	if err := h.LinkSetUp(br); err != nil {
		return err
	}
	return l.save()
}

func (l *Lab) addNode(ctx context.Context, i int) error {
	ns := l.Spec.Nodes[i]
	ul := netip.MustParsePrefix(l.Spec.Underlay)
	ip := l.nodeIP(i)
	n := &Node{
		Name:      ns.Name,
		Labels:    ns.Labels,
		PodCIDR:   ns.PodCIDR,
		Netns:     l.Spec.Name + "-" + ns.Name,
		IP:        ip.String(),
		PinDir:    filepath.Join(l.Options.PinRoot, l.Spec.Name, ns.Name),
		StateDir:  filepath.Join(l.Dir, ns.Name, "state"),
		APISocket: filepath.Join(l.Dir, ns.Name, "agent.sock"),
		Cgroup:    filepath.Join(l.Cgroup, ns.Name),
		Config:    filepath.Join(l.Dir, ns.Name, "config.yaml"),
		Log:       filepath.Join(l.Dir, ns.Name, "agent.log"),
	}
	n.ServicesFile = filepath.Join(l.Dir, ns.Name, "services.yaml")
	l.Nodes = append(l.Nodes, n)
	if err := l.save(); err != nil {
		return err
	}
	if err := os.MkdirAll(n.StateDir, 0o700); err != nil {
		return err
	}
	if err := l.writeNodeFiles(n); err != nil {
		return err
	}
	if err := l.plumbNode(n, ul.Bits()); err != nil {
		return fmt.Errorf("node %s: %w", n.Name, err)
	}
	for _, d := range []string{"agent", "pods"} {
		if err := os.MkdirAll(filepath.Join(n.Cgroup, d), 0o755); err != nil {
			return fmt.Errorf("creating cgroup of node %s: %w", n.Name, err)
		}
	}
	if l.Spec.Kubernetes {
		c, err := l.Kube()
		if err != nil {
			return err
		}
		// The agent reads its labels from the Node when it starts.
		if err := l.registerNode(ctx, c, n); err != nil {
			return err
		}
	}
	if err := l.StartAgent(ctx, n.Name); err != nil {
		return err
	}
	if l.Spec.Kubernetes {
		for _, ps := range ns.Pods {
			n.Pods = append(n.Pods, &Pod{Name: ps.Name, Namespace: ps.namespace(), Node: n.Name, Serve: ps.Serve})
		}
		return l.startKubelet(n)
	}
	for j := range ns.Pods {
		if err := l.addPod(ctx, n, ns.Pods[j]); err != nil {
			return fmt.Errorf("pod %s: %w", ns.Pods[j].Name, err)
		}
	}
	return nil
}

func (l *Lab) writeNodeFiles(n *Node) error {
	cfg := []byte(DefaultAgentConfig)
	if l.Spec.AgentConfig != "" {
		var err error
		if cfg, err = os.ReadFile(l.Spec.AgentConfig); err != nil {
			return fmt.Errorf("reading agent config: %w", err)
		}
	}
	if err := os.WriteFile(n.Config, cfg, 0o600); err != nil {
		return err
	}
	svcs := []byte("services: []\n")
	if l.Spec.Services != "" {
		var err error
		if svcs, err = os.ReadFile(l.Spec.Services); err != nil {
			return fmt.Errorf("reading services file: %w", err)
		}
	}
	return l.Apply(n.Name, svcs)
}

// withNodes adds the lab's nodes to a services file that names none: in
// standalone mode the file is the agents' whole view of the cluster.
func (l *Lab) withNodes(services []byte) ([]byte, error) {
	if l.Spec.Kubernetes {
		return services, nil
	}
	type fileNode struct {
		Name     string            `yaml:"name"`
		IP       string            `yaml:"ip"`
		PodCIDRs []string          `yaml:"podCIDRs"`
		Labels   map[string]string `yaml:"labels,omitempty"`
	}
	var nodes []fileNode
	for i, ns := range l.Spec.Nodes {
		nodes = append(nodes, fileNode{Name: ns.Name, IP: l.nodeIP(i).String(), PodCIDRs: []string{ns.PodCIDR}, Labels: ns.Labels})
	}
	// A plain block mapping (what people write) takes the nodes section
	// as text at its end: parsing and printing again a file of tens of
	// thousands of services would cost seconds.
	if keys, ok := blockMappingKeys(services); ok {
		if slices.Contains(keys, "nodes") {
			return services, nil
		}
		section, err := yaml.Marshal(map[string][]fileNode{"nodes": nodes})
		if err != nil {
			return nil, err
		}
		out := slices.Clip(services)
		if len(out) > 0 && out[len(out)-1] != '\n' {
			out = append(out, '\n')
		}
		return append(out, section...), nil
	}
	var doc yaml.Node
	// A file that is not a YAML mapping goes to the agents as it is: they
	// reject it with a precise message.
	if err := yaml.Unmarshal(services, &doc); err != nil || len(doc.Content) == 0 || doc.Content[0].Kind != yaml.MappingNode {
		return services, nil
	}
	root := doc.Content[0]
	for i := 0; i+1 < len(root.Content); i += 2 {
		if root.Content[i].Value == "nodes" {
			return services, nil
		}
	}
	var value yaml.Node
	if err := value.Encode(nodes); err != nil {
		return nil, err
	}
	root.Content = append(root.Content, &yaml.Node{Kind: yaml.ScalarNode, Value: "nodes"}, &value)
	return yaml.Marshal(&doc)
}

// blockMappingKeys returns the top-level keys of a document that is one
// plain block mapping (every line at column 0 is a comment or a "key:"
// line), or false for anything else (flow style, several documents,
// anchors, tabs, a last line without its end): those take the full parse.
func blockMappingKeys(doc []byte) ([]string, bool) {
	var keys []string
	for line := range bytes.Lines(doc) {
		if len(line) == 0 || line[len(line)-1] != '\n' {
			return nil, false
		}
		t := bytes.TrimRight(line, "\r\n")
		if len(t) == 0 || t[0] == ' ' || t[0] == '#' {
			continue
		}
		k, v, found := bytes.Cut(t, []byte(":"))
		if !found || len(k) == 0 || !plainKey(k) || bytes.IndexByte(t, '\t') >= 0 {
			return nil, false
		}
		// A value on the key's line: plain, or an empty flow collection;
		// anything that may open a flow spanning lines, or an anchor or
		// tag, takes the full parse.
		if v = bytes.TrimSpace(v); len(v) > 0 && !bytes.Equal(v, []byte("[]")) && !bytes.Equal(v, []byte("{}")) && bytes.IndexAny(v[:1], "[{&*!") >= 0 {
			return nil, false
		}
		keys = append(keys, string(k))
	}
	return keys, len(keys) > 0
}

func plainKey(k []byte) bool {
	for _, c := range k {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// nodeIP is the underlay address of the i-th node: .11 on.
func (l *Lab) nodeIP(i int) netip.Addr {
	ip := netip.MustParsePrefix(l.Spec.Underlay).Masked().Addr()
	for range 11 + i {
		ip = ip.Next()
	}
	return ip
}

// plumbNode makes the node's namespace with its uplink on the underlay.
func (l *Lab) plumbNode(n *Node, bits int) error {
	path, err := l.attachHost(n.Netns, "u-"+n.Name, netip.PrefixFrom(netip.MustParseAddr(n.IP), bits))
	if err != nil {
		return err
	}
	// Beyond the underlay is the router, as a default gateway would be.
	if l.Router != "" {
		if err := defaultRoute(path, l.underlayHost(routerHost)); err != nil {
			return err
		}
	}
	// A node routes for its pods: forwarding on, strict reverse-path
	// filtering off (pod traffic enters on interfaces without addresses).
	return netns.Do(path, func() error {
		for f, v := range map[string]string{
			"/proc/sys/net/ipv4/ip_forward":                "1",
			"/proc/sys/net/ipv4/conf/all/rp_filter":        "0",
			"/proc/sys/net/ipv4/conf/default/rp_filter":    "0",
			"/proc/sys/net/ipv6/conf/all/disable_ipv6":     "1",
			"/proc/sys/net/ipv6/conf/default/disable_ipv6": "1",
		} {
			if err := os.WriteFile(f, []byte(v), 0o644); err != nil {
				return fmt.Errorf("setting %s: %w", f, err)
			}
		}
		return nil
	})
}

// attachHost makes a namespace whose eth0 sits on the underlay bridge
// (through the underlay-side end peer) with address addr.
func (l *Lab) attachHost(name, peer string, addr netip.Prefix) (string, error) {
	path, err := netns.Create(name)
	if err != nil {
		return "", err
	}
	ulNS, err := netns.Open(netns.Path(l.Underlay))
	if err != nil {
		return "", err
	}
	defer ulNS.Close()
	// Create the pair in the host, with the other end in the underlay.
	h, err := netns.Handle(path)
	if err != nil {
		return "", err
	}
	defer h.Close()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: peer, PeerNamespace: netlink.NsFd(int(ulNS))}
	if err := h.LinkAdd(veth); err != nil {
		return "", fmt.Errorf("creating uplink: %w", err)
	}
	uh, err := netns.Handle(netns.Path(l.Underlay))
	if err != nil {
		return "", err
	}
	defer uh.Close()
	ulink, err := uh.LinkByName(peer)
	if err != nil {
		return "", err
	}
	br, err := uh.LinkByName("br0")
	if err != nil {
		return "", err
	}
	if err := uh.LinkSetMaster(ulink, br); err != nil {
		return "", err
	}
	if err := uh.LinkSetUp(ulink); err != nil {
		return "", err
	}
	eth0, err := h.LinkByName("eth0")
	if err != nil {
		return "", err
	}
	if err := h.AddrAdd(eth0, &netlink.Addr{IPNet: prefixNet(addr)}); err != nil {
		return "", fmt.Errorf("addressing uplink: %w", err)
	}
	for _, n := range []string{"lo", "eth0"} {
		link, err := h.LinkByName(n)
		if err != nil {
			return "", err
		}
		if err := h.LinkSetUp(link); err != nil {
			return "", err
		}
	}
	return path, nil
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// StartAgent starts the node's agent and waits until it is ready.
func (l *Lab) StartAgent(ctx context.Context, node string) error {
	n := l.Node(node)
	if n == nil {
		return fmt.Errorf("no node %q", node)
	}
	if n.AgentPID != 0 && proc.Alive(n.AgentPID) {
		return fmt.Errorf("the agent of node %s is already running (pid %d)", node, n.AgentPID)
	}
	args := []string{
		"--config", n.Config,
		"--node-name", n.Name,
		"--node-ip", n.IP,
		"--pin-dir", n.PinDir,
		"--state-dir", n.StateDir,
		"--api-socket", n.APISocket,
		"--cgroup", n.Cgroup,
	}
	if l.Spec.Kubernetes {
		args = append(args, "--kubeconfig", l.Kubeconfig)
	} else {
		// Standalone, said so: an inherited in-cluster environment (a lab
		// run inside a pod) must not turn the agent to that cluster.
		args = append(args, "--standalone", "--node-labels", joinLabels(n.Labels), "--pod-cidr", n.PodCIDR, "--services-file", n.ServicesFile)
	}
	args = append(args, l.Options.AgentArgs...)
	pid, err := proc.Start(proc.Spec{Path: l.Binaries.Agent, Args: args, Netns: n.NetnsPath(), LogFile: n.Log, Cgroup: filepath.Join(n.Cgroup, "agent")})
	if err != nil {
		return fmt.Errorf("starting the agent of node %s: %w", node, err)
	}
	n.AgentPID = pid
	if err := l.save(); err != nil {
		return err
	}
	return l.waitReady(ctx, n)
}

func (l *Lab) waitReady(ctx context.Context, n *Node) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	c := n.Client()
	for {
		st, err := c.Status(ctx)
		if err == nil && st.Ready {
			return nil
		}
		if !proc.Alive(n.AgentPID) {
			return fmt.Errorf("the agent of node %s exited:\n%s", n.Name, proc.Tail(n.Log, 25))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the agent of node %s did not become ready (last error: %v):\n%s", n.Name, err, proc.Tail(n.Log, 25))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// StopAgent stops the node's agent the way an operator or a DaemonSet
// rollout would (SIGTERM); its datapath stays.
func (l *Lab) StopAgent(node string) error {
	n := l.Node(node)
	if n == nil {
		return fmt.Errorf("no node %q", node)
	}
	proc.Stop(n.AgentPID, "weir-agent", 15*time.Second)
	n.AgentPID = 0
	return l.save()
}

func (l *Lab) addPod(ctx context.Context, n *Node, ps PodSpec) error {
	p := &Pod{Name: ps.Name, Node: n.Name, Netns: l.Spec.Name + "-" + n.Name + "-" + ps.Name, IP: ps.IP, Serve: ps.Serve,
		ID: "lab-" + l.Spec.Name + "-" + ps.Name}
	n.Pods = append(n.Pods, p)
	if err := l.save(); err != nil {
		return err
	}
	path, err := netns.Create(p.Netns)
	if err != nil {
		return err
	}
	if _, err := n.Client().CreateEndpoint(ctx, api.EndpointRequest{
		ID: p.ID, Netns: path, Address: p.IP, PodNamespace: "lab", PodName: p.Name,
	}); err != nil {
		return err
	}
	if l.Options.ServeBinary != "" && !p.Serve.Empty() {
		args := append([]string{"lab", "serve", "--name", p.Name}, workloadArgs(p.Serve)...)
		logf := filepath.Join(l.Dir, n.Name, "pod-"+p.Name+".log")
		pid, err := proc.Start(proc.Spec{Path: l.Options.ServeBinary, Args: args, Netns: path, LogFile: logf, Cgroup: filepath.Join(n.Cgroup, "pods")})
		if err != nil {
			return err
		}
		p.ServerPID = pid
	}
	return l.save()
}

// Down removes everything the lab made; it carries on past errors and
// reports them together.
func (l *Lab) Down() error {
	var errs []error
	l.stopKube()
	for _, e := range l.Externals {
		proc.Stop(e.ServerPID, "lab", 5*time.Second)
	}
	for _, n := range l.Nodes {
		for _, p := range n.Pods {
			proc.Stop(p.ServerPID, "lab", 5*time.Second)
		}
		proc.Stop(n.AgentPID, "weir-agent", 15*time.Second)
	}
	// Every namespace of the lab: nodes, pods (the kubelets' too), the
	// control plane and the underlay.
	errs = append(errs, l.deleteLabNamespaces()...)
	for _, n := range l.Nodes {
		// Unpinning drops the maps and the links (their devices went with
		// the namespace).
		if err := os.RemoveAll(n.PinDir); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
		errs = append(errs, removeCgroup(n.Cgroup))
	}
	errs = append(errs, removeCgroup(l.Cgroup))
	_ = os.Remove(filepath.Dir(l.Cgroup))
	if l.Options.PinRoot != "" {
		_ = os.Remove(filepath.Join(l.Options.PinRoot, l.Spec.Name))
		_ = os.Remove(l.Options.PinRoot) // only once no other lab uses it
	}
	errs = append(errs, os.RemoveAll(l.Dir))
	return errors.Join(errs...)
}

// removeCgroup removes a cgroup directory tree bottom-up (cgroupfs only
// removes empty directories, one by one).
func removeCgroup(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.IsDir() {
			if err := removeCgroup(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	var lastErr error
	// A killed process leaves its cgroup a moment later.
	for range 50 {
		if lastErr = os.Remove(dir); lastErr == nil || errors.Is(lastErr, os.ErrNotExist) {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("removing cgroup %s: %w", dir, lastErr)
}

// Apply replaces a node's services file (adding the lab's nodes when it
// names none); the agent picks it up.
func (l *Lab) Apply(node string, services []byte) error {
	n := l.Node(node)
	if n == nil {
		return fmt.Errorf("no node %q", node)
	}
	services, err := l.withNodes(services)
	if err != nil {
		return err
	}
	tmp := n.ServicesFile + ".tmp"
	if err := os.WriteFile(tmp, services, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, n.ServicesFile)
}

func joinLabels(m map[string]string) string {
	var parts []string
	for k, v := range m {
		parts = append(parts, k+"="+v)
	}
	return strings.Join(parts, ",")
}
