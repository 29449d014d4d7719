package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/weirnet/weir/core/datapath"
)

// runMonitor prints a node's drops as the datapath reports them, until
// interrupted or --count events were printed.
func runMonitor(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("monitor", flag.ContinueOnError)
	pinDir := fs.String("pin-dir", "", "the node's bpffs directory")
	labName := fs.String("lab", "", "a lab node's drops: the lab's name")
	nodeName := fs.String("node", "", "with --lab: the node")
	count := fs.Int("count", 0, "stop after this many events (0: until interrupted)")
	o := outputFlag(fs)
	if _, err := parseInterleaved(fs, args); err != nil {
		return err
	}
	dir, err := resolvePinDir(*pinDir, *labName, *nodeName)
	if err != nil {
		return err
	}
	r, err := datapath.OpenEvents(dir)
	if err != nil {
		return err
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sig)
	go func() {
		<-sig
		r.Close()
	}()
	defer r.Close()
	for n := 0; *count == 0 || n < *count; n++ {
		ev, err := r.Read(time.Time{})
		if errors.Is(err, datapath.ErrClosed) {
			return nil
		}
		if err != nil {
			return err
		}
		if *o == "json" {
			if err := writeJSON(out, ev); err != nil {
				return err
			}
			continue
		}
		fmt.Fprintln(out, ev)
	}
	return nil
}
