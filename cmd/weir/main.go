// Command weir is Weir's command-line tool: it runs the built-in lab and
// reads a node's pinned datapath (services, load-balancer entries,
// conntrack, endpoints, counters).
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
)

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "weir:", err)
		os.Exit(1)
	}
}

var errUsage = errors.New("see 'weir help'")

// run builds the command tree and runs args through it. Each command's
// own flags are parsed by the command (flag.FlagSet, -o table|json
// throughout); cobra gives the tree its help and shell completion
// (weir completion bash|zsh|fish|powershell).
func run(args []string, out io.Writer) error {
	root := &cobra.Command{
		Use:   "weir",
		Short: "Weir's command-line tool: the built-in lab, and a node's agent and datapath",
		Long: `weir runs the built-in lab (namespaces on this machine), asks a node's agent
how it is doing (--lab NAME --node N, or --api-socket PATH), and reads a
node's pinned datapath (--lab NAME --node N, or --pin-dir DIR), agent
running or not. Every listing takes -o table (default) or -o json.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(out)
	root.SetArgs(args)
	// leaf is a command whose flags its run function parses itself.
	leaf := func(use, short string, fn func(args []string) error) *cobra.Command {
		return &cobra.Command{Use: use, Short: short, DisableFlagParsing: true,
			RunE: func(_ *cobra.Command, args []string) error {
				// -h lists the command's flags, which is not an error.
				if err := fn(args); !errors.Is(err, flag.ErrHelp) {
					return err
				}
				return nil
			}}
	}
	group := func(use, short string, subs ...*cobra.Command) *cobra.Command {
		c := &cobra.Command{Use: use, Short: short, Args: cobra.NoArgs,
			RunE: func(c *cobra.Command, _ []string) error { return c.Help() }}
		c.AddCommand(subs...)
		return c
	}
	labCmd := func(name, use, short string) *cobra.Command {
		return leaf(use, short, func(a []string) error { return runLab(append([]string{name}, a...), out) })
	}
	hiddenLab := func(name string) *cobra.Command {
		c := labCmd(name, name, "used by the lab itself")
		c.Hidden = true
		return c
	}
	lab := group("lab", "build and use a lab: nodes, pods and agents in namespaces on this machine",
		labCmd("up", "up [-f SPEC]", "build a lab (default examples/lab/demo.yaml)"),
		labCmd("down", "down NAME", "remove everything a lab made"),
		labCmd("status", "status NAME [-o json]", "nodes, agents, pods"),
		labCmd("apply", "apply NAME -f FILE [--node N]", "replace the services file of nodes"),
		labCmd("curl", "curl NAME --pod P [-n N] URL", "HTTP GETs from a pod, one connection each"),
		labCmd("udp", "udp NAME --pod P [-n N] ADDR", "UDP requests from a pod"),
		labCmd("restart-agent", "restart-agent NAME --node N", "stop and start a node's agent"),
		labCmd("kube", "kube apply|delete NAME -f FILE", "create or delete Namespaces, Pods, Services in a lab with kubernetes: true"),
		hiddenLab("serve"), hiddenLab("kubelet"),
	)
	maps := func(what, short string) *cobra.Command {
		return group(what, short, leaf("list [-o json]", short, func(a []string) error { return runMaps(what, a, out) }))
	}
	root.AddCommand(
		lab,
		leaf("status [-o json]", "the agent of a node: readiness, modules, plugins, sources, work done, how full each map is",
			func(a []string) error { return runStatus(a, out) }),
		leaf("connect-latency ADDR... [-n N] [-o json]", "connect + HTTP request + close, N times to each ADDR in turn: p50, p99",
			func(a []string) error { return runConnLatency(a, out) }),
		leaf("monitor [-o json] [--count N]", "drops as they happen, with reason and tuple",
			func(a []string) error { return runMonitor(a, out) }),
		maps("service", "frontends, the traffic each entry serves, and which backends it uses and why"),
		group("bpf", "a node's pinned maps, raw",
			maps("lb", "the services map's entries"),
			maps("ct", "live conntrack entries"),
			maps("nat", "source NAT entries (both directions of every flow)"),
			maps("endpoint", "local endpoints"),
			maps("ipcache", "where addresses live, and how they are reached"),
			maps("metrics", "packet counters by hook and reason"),
			maps("plugin", "the maps of plugins, with their counters"),
		),
	)
	return root.Execute()
}

// output is the -o flag: table or json.
type output string

func (o *output) String() string { return string(*o) }

func (o *output) Set(s string) error {
	if s != "table" && s != "json" {
		return fmt.Errorf("%q is not an output format; use table or json", s)
	}
	*o = output(s)
	return nil
}

func outputFlag(fs *flag.FlagSet) *output {
	o := output("table")
	fs.Var(&o, "o", "output format: table or json")
	return &o
}

func writeJSON(out io.Writer, v any) error {
	enc := json.NewEncoder(out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// table writes tab-separated rows aligned.
func table(out io.Writer, header string, rows [][]string) error {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, header)
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	return tw.Flush()
}

// parseInterleaved parses flags that may come after positional arguments
// (weir lab down NAME -o json), returning the positionals.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}
