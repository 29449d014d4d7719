package socketlb

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/weirnet/weir/core/netns"
)

// The socket tests need a client whose sockets live in the test's cgroup
// from their first moment: the test binary itself, started again as a
// child placed in the cgroup by clone (CLONE_INTO_CGROUP), with the
// network namespace entered before any socket exists.
const clientEnv = "WEIR_SOCKETLB_CLIENT"

// clientResult is what a client reports: the peer getpeername returned,
// the source recvfrom returned, what the server answered, and the errno of
// a failed call.
type clientResult struct {
	Peer  string `json:"peer,omitempty"`
	From  string `json:"from,omitempty"`
	Reply string `json:"reply,omitempty"`
	Errno int    `json:"errno,omitempty"`
	Step  string `json:"step,omitempty"`
}

func TestMain(m *testing.M) {
	if spec := os.Getenv(clientEnv); spec != "" {
		var res clientResult
		parts := strings.SplitN(spec, " ", 3)
		if len(parts) != 3 {
			fmt.Fprintf(os.Stderr, "bad client spec %q\n", spec)
			os.Exit(2)
		}
		mode, hold := strings.CutSuffix(parts[1], "-hold")
		enc := json.NewEncoder(os.Stdout)
		err := netns.Do(parts[0], func() error {
			res = runClient(mode, netip.MustParseAddrPort(parts[2]), func(fd int, first clientResult) clientResult {
				if !hold {
					return first
				}
				// Report the first exchange, then wait for the
				// socket's end (or 5 s of nothing).
				_ = enc.Encode(first)
				tv := unix.Timeval{Sec: 5}
				_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
				buf := make([]byte, 128)
				n, _, err := unix.Recvfrom(fd, buf, 0)
				var errno syscall.Errno
				if errors.As(err, &errno) {
					return clientResult{Step: "wait", Errno: int(errno)}
				}
				return clientResult{Step: "wait", Reply: string(buf[:max(n, 0)])}
			})
			return nil
		})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		_ = enc.Encode(res)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func sockaddr(a netip.AddrPort) *unix.SockaddrInet4 {
	return &unix.SockaddrInet4{Addr: a.Addr().As4(), Port: int(a.Port())}
}

func addrOf(sa unix.Sockaddr) string {
	if s, ok := sa.(*unix.SockaddrInet4); ok {
		return netip.AddrPortFrom(netip.AddrFrom4(s.Addr), uint16(s.Port)).String()
	}
	return fmt.Sprintf("%v", sa)
}

// runClient talks to target the way mode says, with raw system calls so
// that what the kernel answers (addresses, errno) is reported as is.
func runClient(mode string, target netip.AddrPort, then func(fd int, first clientResult) clientResult) clientResult {
	fail := func(step string, err error) clientResult {
		var errno syscall.Errno
		if errors.As(err, &errno) {
			return clientResult{Step: step, Errno: int(errno)}
		}
		return clientResult{Step: step + ": " + err.Error(), Errno: -1}
	}
	typ := unix.SOCK_STREAM
	if strings.HasPrefix(mode, "udp") {
		typ = unix.SOCK_DGRAM
	}
	fd, err := unix.Socket(unix.AF_INET, typ, 0)
	if err != nil {
		return fail("socket", err)
	}
	defer unix.Close(fd)
	tv := unix.Timeval{Sec: 2}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	var res clientResult
	switch mode {
	case "bind":
		_ = unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_FREEBIND, 1)
		if err := unix.Bind(fd, sockaddr(target)); err != nil {
			return fail("bind", err)
		}
		return res
	case "tcp", "udp-connected":
		if err := unix.Connect(fd, sockaddr(target)); err != nil {
			return fail("connect", err)
		}
		peer, err := unix.Getpeername(fd)
		if err != nil {
			return fail("getpeername", err)
		}
		res.Peer = addrOf(peer)
		if err := unix.Send(fd, []byte("hello"), 0); err != nil {
			return fail("send", err)
		}
	case "udp":
		if err := unix.Sendto(fd, []byte("hello"), 0, sockaddr(target)); err != nil {
			return fail("sendto", err)
		}
	default:
		return clientResult{Step: "unknown mode " + mode, Errno: -1}
	}
	buf := make([]byte, 128)
	n, from, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return fail("recvfrom", err)
	}
	if from != nil {
		res.From = addrOf(from)
	}
	res.Reply = string(buf[:n])
	return then(fd, res)
}

// holdClient starts a client that reports its first exchange and then
// waits for its socket to end; first returns the first report, rest
// the second.
func holdClient(t *testing.T, nsPath, cgroup, mode string, target netip.AddrPort) (first clientResult, rest func() clientResult) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), clientEnv+"="+nsPath+" "+mode+"-hold "+target.String())
	dir, err := os.Open(cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	dec := json.NewDecoder(out)
	if err := dec.Decode(&first); err != nil {
		t.Fatalf("client %s %s: %v", mode, target, err)
	}
	return first, func() clientResult {
		var r clientResult
		if err := dec.Decode(&r); err != nil {
			t.Fatalf("client %s %s: %v", mode, target, err)
		}
		return r
	}
}

// client runs one client in the namespace at nsPath and the cgroup at
// cgroup ("" keeps the test's own cgroup).
func client(t *testing.T, nsPath, cgroup, mode string, target netip.AddrPort) clientResult {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), clientEnv+"="+nsPath+" "+mode+" "+target.String())
	if cgroup != "" {
		dir, err := os.Open(cgroup)
		if err != nil {
			t.Fatal(err)
		}
		defer dir.Close()
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	done := make(chan struct{})
	timer := time.AfterFunc(20*time.Second, func() {
		if cmd.Process != nil {
			_ = cmd.Process.Kill()
		}
		close(done)
	})
	out, err := cmd.Output()
	if !timer.Stop() {
		<-done
	}
	if err != nil {
		t.Fatalf("client %s %s: %v: %s", mode, target, err, stderr.String())
	}
	var res clientResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("client %s %s answered %q: %v", mode, target, out, err)
	}
	return res
}
