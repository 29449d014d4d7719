package lab

import (
	"bufio"
	"context"
	"fmt"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/weirnet/weir/core/proc"
)

// echoTarget is an echo server as a client reaches it: from a namespace,
// at an address, answering "<name>: <line>".
type echoTarget struct {
	ns, addr, name string
}

// holdConnections opens n connections to the targets (in turn) at once,
// holds every one open until all are, then exchanges a line on each; it
// returns the failures.
func holdConnections(ctx context.Context, n int, targets []echoTarget) []string {
	var (
		wg, open sync.WaitGroup
		mu       sync.Mutex
		failed   []string
		release  = make(chan struct{})
	)
	open.Add(n)
	for i := range n {
		tg := targets[i%len(targets)]
		wg.Go(func() {
			err := func() error {
				dctx, cancel := context.WithTimeout(ctx, 20*time.Second)
				defer cancel()
				c, err := Dial(dctx, tg.ns, "tcp4", tg.addr)
				open.Done()
				if err != nil {
					return err
				}
				defer c.Close()
				<-release
				_ = c.SetDeadline(time.Now().Add(20 * time.Second))
				msg := fmt.Sprintf("conn-%d", i)
				if _, err := fmt.Fprintln(c, msg); err != nil {
					return err
				}
				line, err := bufio.NewReader(c).ReadString('\n')
				if err != nil {
					return err
				}
				if strings.TrimSpace(line) != tg.name+": "+msg {
					return fmt.Errorf("answer %q", line)
				}
				return nil
			}()
			if err != nil {
				mu.Lock()
				failed = append(failed, fmt.Sprintf("%s #%d: %v", tg.addr, i, err))
				mu.Unlock()
			}
		})
	}
	open.Wait()
	close(release)
	wg.Wait()
	return failed
}

// talkers keep long-lived connections exchanging a line every 20 ms,
// counting the exchanges and the first failure of each.
type talkers struct {
	mu     sync.Mutex
	counts []int
	errs   []string
	stop   chan struct{}
	wg     sync.WaitGroup
}

// talk opens one connection per target and starts exchanging on each.
func talk(t *testing.T, ctx context.Context, targets []echoTarget) *talkers {
	t.Helper()
	tk := &talkers{counts: make([]int, len(targets)), stop: make(chan struct{})}
	for i, tg := range targets {
		c, err := Dial(ctx, tg.ns, "tcp4", tg.addr)
		if err != nil {
			t.Fatalf("%s: %v", tg.addr, err)
		}
		t.Cleanup(func() { c.Close() })
		r := bufio.NewReader(c)
		tk.wg.Go(func() {
			for n := 0; ; n++ {
				select {
				case <-tk.stop:
					return
				case <-time.After(20 * time.Millisecond):
				}
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				msg := fmt.Sprintf("m%d", n)
				_, err := fmt.Fprintln(c, msg)
				var line string
				if err == nil {
					line, err = r.ReadString('\n')
				}
				if err == nil && strings.TrimSpace(line) != tg.name+": "+msg {
					err = fmt.Errorf("answer %q", line)
				}
				tk.mu.Lock()
				if err != nil {
					tk.errs = append(tk.errs, fmt.Sprintf("flow %d (%s): %v", i, tg.addr, err))
					tk.mu.Unlock()
					return
				}
				tk.counts[i]++
				tk.mu.Unlock()
			}
		})
	}
	return tk
}

// atLeast is a condition: every flow exchanged n lines.
func (tk *talkers) atLeast(n int) func() bool {
	return func() bool {
		tk.mu.Lock()
		defer tk.mu.Unlock()
		for _, c := range tk.counts {
			if c < n {
				return false
			}
		}
		return true
	}
}

// end stops the exchanges and returns the failures.
func (tk *talkers) end() []string {
	close(tk.stop)
	tk.wg.Wait()
	return tk.errs
}

// restartAndKill restarts a node's agent gracefully, then kills it with
// SIGKILL and starts another, each while tk keeps talking.
func restartAndKill(t *testing.T, l *Lab, node string, tk *talkers) {
	t.Helper()
	ctx := context.Background()
	waitFor(t, 10*time.Second, "traffic on every flow", tk.atLeast(5))
	if err := l.StopAgent(node); err != nil {
		t.Fatal(err)
	}
	if err := l.StartAgent(ctx, node); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "traffic after the restart", tk.atLeast(30))
	pid := l.Node(node).AgentPID
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the agent to die", func() bool { return !proc.Alive(pid) })
	waitFor(t, 10*time.Second, "traffic with no agent", tk.atLeast(50))
	if err := l.StartAgent(ctx, node); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "traffic after the kill", tk.atLeast(80))
}
