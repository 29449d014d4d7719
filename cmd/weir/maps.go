package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/lab"
)

// runMaps prints one view of a node's pinned maps.
func runMaps(what string, args []string, out io.Writer) error {
	fs := flag.NewFlagSet(what, flag.ContinueOnError)
	pinDir := fs.String("pin-dir", "", "the node's bpffs directory")
	labName := fs.String("lab", "", "read a lab node's maps: the lab's name")
	nodeName := fs.String("node", "", "with --lab: the node")
	o := outputFlag(fs)
	if _, err := parseInterleaved(fs, args); err != nil {
		return err
	}
	dir, err := resolvePinDir(*pinDir, *labName, *nodeName)
	if err != nil {
		return err
	}
	p, err := datapath.OpenPinned(dir)
	if err != nil {
		return err
	}
	defer p.Close()
	switch what {
	case "service":
		rows, err := p.Services()
		return render(out, *o, rows, err, "ID\tFRONTEND\tTYPE\tSERVED\tTRAFFIC\tWHY\tBACKENDS", func(r datapath.ServiceRow) []string {
			var bes []string
			for _, b := range r.Backends {
				s := b.Addr.String()
				if b.State != "active" {
					s += " (" + b.State + ")"
				}
				bes = append(bes, s)
			}
			if len(bes) == 0 {
				bes = []string{"(none)"}
			}
			return []string{strconv.Itoa(int(r.ID)), r.Frontend.String() + "/" + r.Proto, r.Type, r.Served, r.Traffic, r.Selected, strings.Join(bes, ", ")}
		})
	case "plugin":
		rows, err := p.PluginMaps()
		return render(out, *o, rows, err, "PLUGIN\tMAP\tTYPE\tENTRIES\tCOUNTERS", func(r datapath.PluginMapRow) []string {
			var cs []string
			for i, c := range r.Counters {
				cs = append(cs, fmt.Sprintf("[%d]=%d", i, c))
			}
			return []string{r.Plugin, r.Map, r.Type, strconv.Itoa(r.Entries), strings.Join(cs, " ")}
		})
	case "lb":
		rows, err := p.LB()
		return render(out, *o, rows, err, "FRONTEND\tSLOT\tENTRY\tREVNAT", func(r datapath.LBEntry) []string {
			front := r.Frontend.String() + "/" + r.Proto
			if r.Slot == 0 {
				return []string{front, "0", fmt.Sprintf("master: %d backends, %s, %s scope", r.Count, r.Type, r.Scope), strconv.Itoa(int(r.RevNAT))}
			}
			be := fmt.Sprintf("backend %d (missing)", r.BackendID)
			if r.Backend != nil {
				be = fmt.Sprintf("%s (id %d, %s)", r.Backend, r.BackendID, r.State)
			}
			return []string{front, strconv.Itoa(int(r.Slot)), be, strconv.Itoa(int(r.RevNAT))}
		})
	case "ct":
		rows, err := p.CT()
		return render(out, *o, rows, err, "DIR\tPROTO\tSOURCE\tDESTINATION\tLEAVES AS\tBACKEND\tREVNAT\tSTATE\tFLAGS\tEXPIRES\tPACKETS\tBYTES", func(r datapath.CTRow) []string {
			return []string{r.Dir, r.Proto, r.Src.String(), r.Dst.String(), r.NatSrc.String() + " -> " + r.NatDst.String(),
				strconv.FormatUint(uint64(r.BackendID), 10), strconv.FormatUint(uint64(r.RevNAT), 10), r.State,
				r.Flags, strconv.FormatInt(r.ExpiresIn, 10) + "s", strconv.FormatUint(r.Packets, 10), strconv.FormatUint(r.Bytes, 10)}
		})
	case "nat":
		rows, err := p.NAT()
		return render(out, *o, rows, err, "DIR\tPROTO\tSOURCE\tDESTINATION\tTRANSLATED\tOWNER\tAGE", func(r datapath.NATRow) []string {
			what := "source -> " + r.To.String()
			if r.Dir == "in" {
				what = "destination -> " + r.To.String()
			}
			return []string{r.Dir, r.Proto, r.Src.String(), r.Dst.String(), what, r.Owner, strconv.FormatInt(r.Age, 10) + "s"}
		})
	case "endpoint":
		rows, err := p.Endpoints()
		return render(out, *o, rows, err, "ADDRESS\tIFINDEX\tMAC\tGATEWAY MAC", func(r datapath.EndpointRow) []string {
			return []string{r.Addr.String(), strconv.Itoa(int(r.Ifindex)), r.MAC, r.NodeMAC}
		})
	case "ipcache":
		rows, err := p.IPCache()
		return render(out, *o, rows, err, "PREFIX\tKIND\tNODE\tREACHED", func(r datapath.IPCacheRow) []string {
			return []string{r.Prefix.String(), r.Kind, r.NodeIP.String(), r.Via}
		})
	case "metrics":
		rows, err := p.Metrics()
		return render(out, *o, rows, err, "HOOK\tVERDICT\tREASON\tPACKETS\tBYTES", func(r datapath.MetricRow) []string {
			verdict := "dropped"
			if r.Code == 0 {
				verdict = "passed"
			}
			return []string{r.Hook, verdict, r.Reason, strconv.FormatUint(r.Packets, 10), strconv.FormatUint(r.Bytes, 10)}
		})
	}
	return fmt.Errorf("unknown view %q", what)
}

// render prints rows as JSON or as a table of the row function's cells.
func render[T any](out io.Writer, o output, rows []T, err error, header string, row func(T) []string) error {
	if err != nil {
		return err
	}
	if o == "json" {
		if rows == nil {
			rows = []T{} // an empty list, not null
		}
		return writeJSON(out, rows)
	}
	t := make([][]string, 0, len(rows))
	for _, r := range rows {
		t = append(t, row(r))
	}
	return table(out, header, t)
}

func resolvePinDir(pinDir, labName, nodeName string) (string, error) {
	if pinDir != "" {
		if labName != "" {
			return "", errors.New("use either --pin-dir or --lab/--node")
		}
		return pinDir, nil
	}
	if labName == "" {
		return "", errors.New("say which node: --lab NAME --node NODE, or --pin-dir DIR")
	}
	l, err := lab.Load(labName, lab.Options{})
	if err != nil {
		return "", err
	}
	n, err := labNode(l, labName, nodeName)
	if err != nil {
		return "", err
	}
	return n.PinDir, nil
}

// labNode picks a lab's node: the one named, or the only one.
func labNode(l *lab.Lab, labName, nodeName string) (*lab.Node, error) {
	if nodeName == "" {
		if len(l.Nodes) != 1 {
			return nil, fmt.Errorf("lab %s has %d nodes: pick one with --node", labName, len(l.Nodes))
		}
		return l.Nodes[0], nil
	}
	n := l.Node(nodeName)
	if n == nil {
		return nil, fmt.Errorf("lab %s has no node %q", labName, nodeName)
	}
	return n, nil
}
