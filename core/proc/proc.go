// Package proc starts detached helper processes (agents, control-plane
// components, pod workloads) in a chosen network namespace and cgroup, and
// stops them again, also from another process than the one that started
// them.
package proc

import (
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Spec describes a process to start.
type Spec struct {
	Path string
	Args []string
	Env  []string
	// Netns is the path of the network namespace to run in; "" keeps the
	// caller's. The process enters it through nsenter (util-linux), which
	// switches the network namespace only: mounts such as bpffs stay
	// visible.
	Netns string
	// LogFile receives stdout and stderr (appended).
	LogFile string
	// Cgroup is a cgroup v2 directory to move the process into, or "".
	Cgroup string
}

// Start starts a detached process (its own session: it outlives the
// caller) and returns its pid. The process is reaped when it exits if the
// caller is still around.
func Start(s Spec) (int, error) {
	f, err := os.OpenFile(s.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	name, args := s.Path, s.Args
	if s.Netns != "" {
		name, args = "nsenter", append([]string{"--net=" + s.Netns, "--", s.Path}, s.Args...)
	}
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = append(os.Environ(), s.Env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("starting %s: %w", filepath.Base(s.Path), err)
	}
	pid := cmd.Process.Pid
	go func() { _ = cmd.Wait() }()
	if s.Cgroup != "" {
		if err := os.WriteFile(filepath.Join(s.Cgroup, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644); err != nil {
			slog.Warn("placing process in cgroup", "pid", pid, "cgroup", s.Cgroup, "err", err)
		}
	}
	return pid, nil
}

// Stop sends SIGTERM to pid and waits for it to exit, then SIGKILL after
// grace. A pid whose command line does not contain want is left alone: it
// is not the process we started any more.
func Stop(pid int, want string, grace time.Duration) {
	if pid <= 0 || !Alive(pid) {
		return
	}
	if cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); !strings.Contains(string(cmdline), want) {
		return
	}
	_ = syscall.Kill(pid, syscall.SIGTERM)
	deadline := time.Now().Add(grace)
	for Alive(pid) {
		if time.Now().After(deadline) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
			deadline = time.Now().Add(5 * time.Second)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Alive reports whether pid runs (a zombie does not count).
func Alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the parenthesised command name.
	s := string(data)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z' && s[i+2] != 'X'
	}
	return true
}

// Tail returns the last n lines of a file, for error messages.
func Tail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
