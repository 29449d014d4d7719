package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/weirnet/weir/core/api"
	"github.com/weirnet/weir/core/lab"
	"github.com/weirnet/weir/core/lbmap"
)

// runStatus prints what a node's agent reports: readiness, what its
// sources and reconcilers did, and how full each map is.
func runStatus(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	socket := fs.String("api-socket", "", "the agent's API socket")
	labName := fs.String("lab", "", "a lab node's agent: the lab's name")
	nodeName := fs.String("node", "", "with --lab: the node")
	o := outputFlag(fs)
	if _, err := parseInterleaved(fs, args); err != nil {
		return err
	}
	sock, err := resolveSocket(*socket, *labName, *nodeName)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := api.NewClient(sock).Status(ctx)
	if err != nil {
		return err
	}
	if *o == "json" {
		return writeJSON(out, st)
	}
	ready := "not ready"
	if st.Ready {
		ready = "ready"
	}
	pool := st.Pool
	if pool == "" {
		pool = "-"
	}
	fmt.Fprintf(out, "node %s (pool %s): %s; modules %s\n", st.Node, pool, ready, strings.Join(st.Modules, ", "))
	for _, m := range st.Modules {
		if s := st.Slots[m]; len(s) > 0 {
			fmt.Fprintf(out, "  %s fills %s\n", m, strings.Join(s, ", "))
		}
	}
	for _, p := range st.Plugins {
		state := "declared, not in this node's module set"
		if p.Enabled {
			state = fmt.Sprintf("running as pid %d", p.PID)
			if p.PID == 0 {
				state = "process down (being restarted)"
			}
		}
		fmt.Fprintf(out, "plugin %s %s (%s): %s; restarted %d times; failurePolicy %s\n", p.Name, p.Version, p.Path, state, p.Restarts, p.FailurePolicy)
	}
	if len(st.CgroupHooks) > 0 {
		hooks := make([]string, 0, len(st.CgroupHooks))
		for h, prog := range st.CgroupHooks {
			hooks = append(hooks, h+"="+prog)
		}
		slices.Sort(hooks)
		fmt.Fprintf(out, "socket hooks on %s: %s\n", st.Cgroup, strings.Join(hooks, ", "))
	}
	if s := st.Services; s != nil {
		fmt.Fprintf(out, "services: version %d in the datapath (%d passes, %d full; %d service changes; %s of CPU, last pass %s)\n",
			s.AppliedVersion, s.Passes, s.Full, s.Services, micros(s.WorkMicros), s.LastTook.Round(time.Microsecond))
		if s.Error != "" {
			fmt.Fprintf(out, "  last write failed: %s\n", s.Error)
		}
	}
	if f := st.File; f != nil {
		fmt.Fprintf(out, "file %s: %s\n", f.File, describeFile(f.Applied, f.Services))
		if f.Error != "" {
			fmt.Fprintf(out, "  refused (sha256 %s): %s\n", short(f.Rejected), f.Error)
		}
	}
	if k := st.Kubernetes; k != nil {
		synced := "not synced"
		if k.Synced {
			synced = fmt.Sprintf("synced in %s", (time.Duration(k.SyncMillis) * time.Millisecond))
		}
		fmt.Fprintf(out, "kubernetes: %s; %d services; %d rounds, %d service changes, %s of CPU; %d refused\n",
			synced, k.Services, k.Rounds, k.Changed, micros(k.WorkMicros), k.Refused)
		if k.LastError != "" {
			fmt.Fprintf(out, "  last refusal: %s\n", k.LastError)
		}
	}
	if c := st.Conntrack; c != nil && c.Passes > 0 {
		fmt.Fprintf(out, "conntrack collector: %d passes, last deleted %d, next in %s\n", c.Passes, c.Deleted, c.Next)
		if n := c.NAT; n != nil {
			pressure := ""
			if n.Pressure {
				pressure = "; under pressure"
			}
			fmt.Fprintf(out, "  NAT: %d orphans deleted last pass, %d early passes; %d flows given a port, %d ports found taken, %d flows refused%s\n",
				n.Orphans, n.Wakeups, n.Allocated, n.Retries, n.Exhausted, pressure)
		}
	}
	if len(st.Maps) == 0 {
		return nil
	}
	fmt.Fprintln(out)
	return table(out, "MAP\tENTRIES\tMAX\tFILL", rowsOf(st.Maps, func(m lbmap.MapFill) []string {
		fill := "-"
		if m.MaxEntries > 0 {
			fill = strconv.FormatFloat(100*float64(m.Entries)/float64(m.MaxEntries), 'f', 1, 64) + "%"
		}
		return []string{m.Name, strconv.Itoa(m.Entries), strconv.Itoa(m.MaxEntries), fill}
	}))
}

func rowsOf[T any](in []T, row func(T) []string) [][]string {
	out := make([][]string, len(in))
	for i, v := range in {
		out[i] = row(v)
	}
	return out
}

func micros(us uint64) string { return (time.Duration(us) * time.Microsecond).String() }

func short(digest string) string {
	if len(digest) > 12 {
		return digest[:12]
	}
	return digest
}

func describeFile(applied string, services int) string {
	if applied == "" {
		return "nothing applied yet"
	}
	return fmt.Sprintf("applied (sha256 %s, %d services)", short(applied), services)
}

// resolveSocket finds an agent's API socket from the flags.
func resolveSocket(socket, labName, nodeName string) (string, error) {
	if socket != "" {
		if labName != "" {
			return "", errors.New("use either --api-socket or --lab/--node")
		}
		return socket, nil
	}
	if labName == "" {
		return "/run/weir/agent.sock", nil
	}
	l, err := lab.Load(labName, lab.Options{})
	if err != nil {
		return "", err
	}
	n, err := labNode(l, labName, nodeName)
	if err != nil {
		return "", err
	}
	return n.APISocket, nil
}
