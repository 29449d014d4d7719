package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"slices"
	"time"
)

// connLatency is what connect-latency reports: percentiles of connect +
// one HTTP/1.0 request + close, over n connections after warm-up ones.
type connLatency struct {
	Addr  string  `json:"addr"`
	N     int     `json:"n"`
	P50us float64 `json:"p50Micros"`
	P99us float64 `json:"p99Micros"`
}

// runConnLatency times whole short connections from wherever it runs (a
// pod's namespace and cgroup, through lab exec), so every socket hook and
// packet stage of the path is in the figure. With several addresses it
// alternates between them and reports each.
func runConnLatency(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("connect-latency", flag.ContinueOnError)
	n := fs.Int("n", 2000, "connections to time")
	warm := fs.Int("warmup", 200, "connections made first and not timed")
	o := outputFlag(fs)
	rest, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(rest) == 0 {
		return fmt.Errorf("connect-latency takes one or more ADDR (host:port); %w", errUsage)
	}
	if *n < 1 || *warm < 0 {
		return fmt.Errorf("-n must be at least 1 and -warmup at least 0")
	}
	req := []byte("GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
	buf := make([]byte, 4096)
	one := func(addr string) (time.Duration, error) {
		start := time.Now()
		c, err := net.DialTimeout("tcp4", addr, 5*time.Second)
		if err != nil {
			return 0, err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(req); err != nil {
			return 0, err
		}
		for {
			_, err := c.Read(buf)
			if err == io.EOF {
				break
			}
			if err != nil {
				return 0, err
			}
		}
		return time.Since(start), nil
	}
	// Several addresses take turns, one connection each, so that they
	// meet the same moments of the machine and compare.
	for range *warm {
		for _, addr := range rest {
			if _, err := one(addr); err != nil {
				return fmt.Errorf("warm-up connection to %s: %w", addr, err)
			}
		}
	}
	took := make([][]time.Duration, len(rest))
	for range *n {
		for i, addr := range rest {
			d, err := one(addr)
			if err != nil {
				return fmt.Errorf("connection to %s: %w", addr, err)
			}
			took[i] = append(took[i], d)
		}
	}
	var res []connLatency
	for i, addr := range rest {
		t := took[i]
		slices.Sort(t)
		pct := func(p float64) float64 {
			return float64(t[min(len(t)-1, int(p*float64(len(t))))].Nanoseconds()) / 1000
		}
		res = append(res, connLatency{Addr: addr, N: *n, P50us: pct(0.50), P99us: pct(0.99)})
	}
	if *o == "json" {
		return writeJSON(out, res)
	}
	for _, r := range res {
		fmt.Fprintf(out, "%s: %d connections, p50 %.1f µs, p99 %.1f µs\n", r.Addr, r.N, r.P50us, r.P99us)
	}
	return nil
}
