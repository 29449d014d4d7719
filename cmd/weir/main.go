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
)

const usage = `usage: weir <command> [flags]

Lab (namespaces on this machine):
  lab up [-f SPEC]                       build a lab (default examples/lab/demo.yaml)
  lab down NAME                          remove everything a lab made
  lab status NAME [-o json]              nodes, agents, pods
  lab apply NAME -f FILE [--node N]      replace the services file of nodes
  lab curl NAME --pod P [-n N] URL       HTTP GETs from a pod, one connection each
  lab udp NAME --pod P [-n N] ADDR       UDP requests from a pod
  lab restart-agent NAME --node N        stop and start a node's agent
  lab kube apply|delete NAME -f FILE     create or delete Namespaces, Pods, Services
                                         in a lab with kubernetes: true

Measuring, from wherever it runs (a pod: through lab exec):
  connect-latency ADDR... [-n N] [-o json]
                                         connect + HTTP request + close, N times to each
                                         ADDR in turn: p50, p99

Agent of a node (--lab NAME --node N, or --api-socket PATH):
  status [-o json]                       readiness, sources, work done, how full each map is

Datapath of a node (--lab NAME --node N, or --pin-dir DIR):
  service list [-o json]                 frontends and their backends
  bpf lb list [-o json]                  raw services map entries
  bpf ct list [-o json]                  live conntrack entries
  bpf nat list [-o json]                 source NAT entries (both directions of every flow)
  monitor [-o json] [--count N]          drops as they happen, with reason and tuple
  bpf endpoint list [-o json]            local endpoints
  bpf ipcache list [-o json]             where addresses live, and how they are reached
  bpf metrics list [-o json]             packet counters by hook and reason
  bpf plugin list [-o json]              the maps of plugins, with their counters
`

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "weir:", err)
		os.Exit(1)
	}
}

var errUsage = errors.New("see 'weir help'")

func run(args []string, out io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(out, usage)
		return errUsage
	}
	switch args[0] {
	case "help", "-h", "--help":
		fmt.Fprint(out, usage)
		return nil
	case "lab":
		return runLab(args[1:], out)
	case "status":
		return runStatus(args[1:], out)
	case "connect-latency":
		return runConnLatency(args[1:], out)
	case "monitor":
		return runMonitor(args[1:], out)
	case "service":
		if len(args) >= 2 && args[1] == "list" {
			return runMaps("service", args[2:], out)
		}
	case "bpf":
		if len(args) >= 3 && args[2] == "list" {
			switch args[1] {
			case "lb", "ct", "nat", "endpoint", "metrics", "ipcache", "plugin":
				return runMaps(args[1], args[3:], out)
			}
		}
	}
	return fmt.Errorf("unknown command %q; %w", strings.Join(args, " "), errUsage)
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
