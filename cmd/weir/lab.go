package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/weirnet/weir/core/filesource"
	"github.com/weirnet/weir/core/lab"
	"github.com/weirnet/weir/core/lab/kubelet"
)

func runLab(args []string, out io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("lab needs a subcommand; %w", errUsage)
	}
	sub, args := args[0], args[1:]
	switch sub {
	case "up":
		return labUp(args, out)
	case "serve":
		return labServe(args)
	case "kubelet":
		return labKubelet(args)
	case "kube":
		return labKube(args, out)
	}
	fs := flag.NewFlagSet("lab "+sub, flag.ContinueOnError)
	var (
		o     = outputFlag(fs)
		file  = fs.String("f", "", "file")
		node  = fs.String("node", "", "node")
		pod   = fs.String("pod", "", "pod to send from")
		count = fs.Int("n", 10, "number of requests")
		msg   = fs.String("msg", "ping", "UDP payload")
		wait  = fs.Duration("wait", 0, "curl/udp: first wait up to this long for the target to answer")
	)
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) == 0 {
		return fmt.Errorf("lab %s needs the lab's name", sub)
	}
	l, err := lab.Load(pos[0], lab.Options{})
	if err != nil {
		return err
	}
	ctx := context.Background()
	switch sub {
	case "down":
		if err := l.Down(); err != nil {
			return err
		}
		fmt.Fprintf(out, "lab %s is down\n", l.Spec.Name)
		return nil
	case "status":
		return labStatus(ctx, l, *o, out)
	case "apply":
		if *file == "" {
			return errors.New("lab apply needs -f FILE")
		}
		data, err := os.ReadFile(*file)
		if err != nil {
			return err
		}
		// Check the file here first: a mistake is reported to the user
		// directly rather than only in the agents' logs.
		svcs, err := filesource.Parse(*file, data)
		if err != nil {
			return err
		}
		for _, n := range l.Nodes {
			if *node != "" && n.Name != *node {
				continue
			}
			if err := l.Apply(n.Name, data); err != nil {
				return err
			}
			if err := waitApplied(ctx, n, time.Minute); err != nil {
				return err
			}
			fmt.Fprintf(out, "node %s: services of %s applied (%d services)\n", n.Name, *file, len(svcs))
		}
		return nil
	case "curl", "udp":
		p := l.Pod(*pod)
		if p == nil {
			return fmt.Errorf("lab %s has no pod %q (--pod)", l.Spec.Name, *pod)
		}
		if len(pos) < 2 {
			return fmt.Errorf("lab %s needs a target", sub)
		}
		if *wait > 0 {
			if err := waitAnswer(ctx, sub, p, pos[1], *msg, *wait); err != nil {
				return err
			}
		}
		return labRequests(ctx, l, sub, p, pos[1], *count, *msg, out)
	case "restart-agent":
		if *node == "" {
			return errors.New("lab restart-agent needs --node")
		}
		if err := l.StopAgent(*node); err != nil {
			return err
		}
		if err := l.StartAgent(ctx, *node); err != nil {
			return err
		}
		fmt.Fprintf(out, "agent of node %s restarted\n", *node)
		return nil
	}
	return fmt.Errorf("unknown lab command %q; %w", sub, errUsage)
}

// waitApplied waits until the node's agent reports the file it was just
// given as applied and its services written to the datapath, or as
// refused (with the agent's reason).
func waitApplied(ctx context.Context, n *lab.Node, timeout time.Duration) error {
	data, err := os.ReadFile(n.ServicesFile)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(data)
	want := hex.EncodeToString(sum[:])
	deadline := time.Now().Add(timeout)
	for {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		st, err := n.Client().Status(cctx)
		cancel()
		if err == nil && st.File != nil {
			switch {
			case st.File.Rejected == want:
				return fmt.Errorf("node %s refused the services: %s", n.Name, st.File.Error)
			case st.File.Applied == want && st.Services == nil:
				return nil
			case st.File.Applied == want && st.Services.AppliedVersion >= st.File.Version:
				return nil
			case st.File.Applied == want && st.Services.Error != "":
				err = fmt.Errorf("writing them to the datapath failed: %s", st.Services.Error)
			}
		}
		if time.Now().After(deadline) {
			if err == nil {
				err = errors.New("no answer from the agent yet")
			}
			return fmt.Errorf("node %s did not apply the services within %s (%v); see its log %s", n.Name, timeout, err, n.Log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// siblingBinary finds a program installed next to this one (bin/).
func siblingBinary(name string) (string, error) {
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	p := filepath.Join(filepath.Dir(self), name)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("%s not found next to %s (run make build)", name, self)
	}
	return p, nil
}

func labUp(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("lab up", flag.ContinueOnError)
	file := fs.String("f", "examples/lab/demo.yaml", "lab spec")
	agentBin := fs.String("agent-bin", "", "weir-agent binary (default: next to weir)")
	logLevel := fs.String("agent-log-level", "info", "agents' log level")
	if err := fs.Parse(args); err != nil {
		return err
	}
	spec, err := lab.LoadSpec(*file)
	if err != nil {
		return err
	}
	if *agentBin == "" {
		if *agentBin, err = siblingBinary("weir-agent"); err != nil {
			return err
		}
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	l, err := lab.Up(ctx, spec, lab.Options{AgentBinary: *agentBin, ServeBinary: self, CNIBinDir: filepath.Dir(self),
		AgentArgs: []string{"--log-level", *logLevel}})
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "lab %s is up\n", l.Spec.Name)
	return labStatus(ctx, l, "table", out)
}

func labStatus(ctx context.Context, l *lab.Lab, o output, out io.Writer) error {
	type podRow struct {
		Name string `json:"name"`
		IP   string `json:"ip"`
	}
	type nodeRow struct {
		Name    string   `json:"name"`
		IP      string   `json:"ip"`
		Agent   string   `json:"agent"`
		Pool    string   `json:"pool"`
		Modules []string `json:"modules"`
		PinDir  string   `json:"pinDir"`
		Pods    []podRow `json:"pods"`
	}
	var rows []nodeRow
	for _, n := range l.Nodes {
		r := nodeRow{Name: n.Name, IP: n.IP, PinDir: n.PinDir, Agent: "down"}
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		if st, err := n.Client().Status(cctx); err == nil {
			r.Agent, r.Pool, r.Modules = "not ready", st.Pool, st.Modules
			if st.Ready {
				r.Agent = "ready"
			}
			r.Agent += " (pid " + strconv.Itoa(n.AgentPID) + ")"
		}
		cancel()
		for _, p := range n.Pods {
			r.Pods = append(r.Pods, podRow{p.Name, p.IP})
		}
		rows = append(rows, r)
	}
	if o == "json" {
		return writeJSON(out, rows)
	}
	if l.ControlPlane != nil {
		fmt.Fprintln(out, "control plane:", l.ControlPlane.Describe())
	}
	var t [][]string
	for _, r := range rows {
		var pods []string
		for _, p := range r.Pods {
			pods = append(pods, p.Name+"="+p.IP)
		}
		pool := r.Pool
		if pool == "" {
			pool = "-"
		}
		t = append(t, []string{r.Name, r.IP, r.Agent, pool, strings.Join(r.Modules, ","), strings.Join(pods, " ")})
	}
	return table(out, "NODE\tUNDERLAY IP\tAGENT\tPOOL\tMODULES\tPODS", t)
}

// waitAnswer retries one request until the target answers.
func waitAnswer(ctx context.Context, kind string, p *lab.Pod, target, msg string, d time.Duration) error {
	client := lab.HTTPClient(p.NetnsPath(), time.Second)
	deadline := time.Now().Add(d)
	for {
		var err error
		if kind == "curl" {
			_, err = lab.Get(ctx, client, target)
		} else {
			_, err = lab.UDPAsk(ctx, p.NetnsPath(), target, msg, time.Second)
		}
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not answer within %s: %w", target, d, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func labRequests(ctx context.Context, l *lab.Lab, kind string, p *lab.Pod, target string, n int, msg string, out io.Writer) error {
	counts := map[string]int{}
	failed := 0
	client := lab.HTTPClient(p.NetnsPath(), 3*time.Second)
	for i := 1; i <= n; i++ {
		var answer string
		var err error
		if kind == "curl" {
			answer, err = lab.Get(ctx, client, target)
		} else {
			answer, err = lab.UDPAsk(ctx, p.NetnsPath(), target, msg, 2*time.Second)
		}
		if err != nil {
			failed++
			fmt.Fprintf(out, "%3d  %s -> error: %v\n", i, target, err)
			continue
		}
		who, _, _ := strings.Cut(answer, ":")
		counts[who]++
		where := ""
		if pod := l.Pod(who); pod != nil {
			where = " (on " + pod.Node + ")"
		}
		fmt.Fprintf(out, "%3d  %s -> answered by %s%s\n", i, target, answer, where)
	}
	var names []string
	for k := range counts {
		names = append(names, k)
	}
	slices.Sort(names)
	var parts []string
	for _, k := range names {
		parts = append(parts, fmt.Sprintf("%s=%d", k, counts[k]))
	}
	fmt.Fprintf(out, "%d requests from %s: %d answered (%s), %d failed\n", n, p.Name, n-failed, strings.Join(parts, " "), failed)
	if failed > 0 {
		return fmt.Errorf("%d of %d requests failed", failed, n)
	}
	return nil
}

// labKubelet runs a lab node's kubelet until stopped (the lab starts one
// per node in Kubernetes mode).
func labKubelet(args []string) error {
	fs := flag.NewFlagSet("lab kubelet", flag.ContinueOnError)
	stateRoot := fs.String("state-root", lab.DefaultStateRoot, "where labs keep their state")
	node := fs.String("node", "", "the node")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || *node == "" {
		return errors.New("lab kubelet needs the lab's name and --node")
	}
	l, err := lab.Load(pos[0], lab.Options{StateRoot: *stateRoot})
	if err != nil {
		return err
	}
	n := l.Node(*node)
	if n == nil {
		return fmt.Errorf("lab %s has no node %q", pos[0], *node)
	}
	c, err := l.Kube()
	if err != nil {
		return err
	}
	k, err := kubelet.New(l.KubeletConfig(n, c))
	if err != nil {
		return err
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	if err := k.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// labServe runs a pod's workload in the current namespace until stopped.
func labServe(args []string) error {
	fs := flag.NewFlagSet("lab serve", flag.ContinueOnError)
	name := fs.String("name", "", "pod name to answer with")
	var w lab.Workload
	fs.IntVar(&w.HTTP, "http", 0, "HTTP port")
	fs.IntVar(&w.UDP, "udp", 0, "UDP echo port")
	fs.IntVar(&w.Echo, "echo", 0, "TCP line echo port")
	fs.IntVar(&w.Sink, "sink", 0, "TCP sink port (answers the byte count)")
	fs.IntVar(&w.Source, "source", 0, "TCP source port (sends the byte count it is asked for)")
	fs.IntVar(&w.DNS, "dns", 0, "DNS port (UDP): TXT questions get the pod name")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *name == "" || w.Empty() {
		return errors.New("lab serve needs --name and at least one port")
	}
	s, err := lab.Serve(*name, "", w)
	if err != nil {
		return err
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	<-ctx.Done()
	s.Close()
	return nil
}
