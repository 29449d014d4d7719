package lab

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/weirnet/weir/core/netns"
)

// Workload is what a lab pod serves: every server answers with the pod's
// name, so a client sees which backend it reached.
type Workload struct {
	// HTTP port: GET / answers "<name>\n", GET /client "<name> <the
	// client's address:port as the server saw it>\n".
	HTTP int `yaml:"http" json:"http,omitempty"`
	// UDP port: each datagram is answered with "<name>: <datagram>".
	UDP int `yaml:"udp" json:"udp,omitempty"`
	// Echo port (TCP): each line is answered with "<name>: <line>", for
	// long-lived connections.
	Echo int `yaml:"echo" json:"echo,omitempty"`
	// Sink port (TCP): reads until the client closes its side, then
	// answers the number of bytes received (bulk transfers).
	Sink int `yaml:"sink" json:"sink,omitempty"`
	// DNS port (UDP): a name server answering every TXT question with the
	// pod's name (for real resolvers such as dig).
	DNS int `yaml:"dns" json:"dns,omitempty"`
	// Source port (TCP): reads a byte count on a line, sends that many
	// bytes and closes (bulk from the server to the client).
	Source int `yaml:"source" json:"source,omitempty"`
}

// Empty reports whether the workload serves nothing.
func (w Workload) Empty() bool {
	return w.HTTP == 0 && w.UDP == 0 && w.Echo == 0 && w.Sink == 0 && w.DNS == 0 && w.Source == 0
}

// Servers are a running workload.
type Servers struct {
	closers []io.Closer
	wg      sync.WaitGroup
}

// Close stops every server.
func (s *Servers) Close() {
	for _, c := range s.closers {
		c.Close()
	}
	s.wg.Wait()
}

// Serve starts the workload's servers with sockets in the namespace at
// nsPath ("" for the caller's own namespace).
func Serve(name, nsPath string, w Workload) (*Servers, error) {
	s := &Servers{}
	listen := func() error {
		if w.HTTP != 0 {
			ln, err := net.Listen("tcp4", fmt.Sprintf(":%d", w.HTTP))
			if err != nil {
				return err
			}
			srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
				// /client also says whom the server saw: source NAT,
				// or the client's address kept, shows there.
				if r.URL.Path == "/client" {
					fmt.Fprintln(rw, name, r.RemoteAddr)
					return
				}
				fmt.Fprintln(rw, name)
			})}
			s.closers = append(s.closers, srv)
			s.wg.Go(func() { _ = srv.Serve(ln) })
		}
		if w.UDP != 0 {
			pc, err := net.ListenPacket("udp4", fmt.Sprintf(":%d", w.UDP))
			if err != nil {
				return err
			}
			s.closers = append(s.closers, pc)
			s.wg.Go(func() { udpEcho(name, pc) })
		}
		if w.Echo != 0 {
			ln, err := net.Listen("tcp4", fmt.Sprintf(":%d", w.Echo))
			if err != nil {
				return err
			}
			s.closers = append(s.closers, ln)
			s.wg.Go(func() { lineEcho(name, ln) })
		}
		if w.DNS != 0 {
			pc, err := net.ListenPacket("udp4", fmt.Sprintf(":%d", w.DNS))
			if err != nil {
				return err
			}
			s.closers = append(s.closers, pc)
			s.wg.Go(func() { serveDNS(name, pc) })
		}
		if w.Sink != 0 {
			ln, err := net.Listen("tcp4", fmt.Sprintf(":%d", w.Sink))
			if err != nil {
				return err
			}
			s.closers = append(s.closers, ln)
			s.wg.Go(func() { sink(ln) })
		}
		if w.Source != 0 {
			ln, err := net.Listen("tcp4", fmt.Sprintf(":%d", w.Source))
			if err != nil {
				return err
			}
			s.closers = append(s.closers, ln)
			s.wg.Go(func() { source(ln) })
		}
		return nil
	}
	var err error
	if nsPath == "" {
		err = listen()
	} else {
		err = netns.Do(nsPath, listen)
	}
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("starting servers of %s: %w", name, err)
	}
	return s, nil
}

func udpEcho(name string, pc net.PacketConn) {
	buf := make([]byte, 65535)
	for {
		n, addr, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		_, _ = pc.WriteTo([]byte(name+": "+string(buf[:n])), addr)
	}
}

// serveDNS answers each query with one TXT record holding name, and
// malformed ones with FORMERR.
func serveDNS(name string, pc net.PacketConn) {
	buf := make([]byte, 65535)
	for {
		n, addr, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		if out, err := dnsAnswer(name, buf[:n]); err == nil {
			_, _ = pc.WriteTo(out, addr)
		}
	}
}

func dnsAnswer(name string, query []byte) ([]byte, error) {
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil {
		return nil, err
	}
	q, err := p.Question()
	if err != nil {
		rh := dnsmessage.Header{ID: h.ID, Response: true, RCode: dnsmessage.RCodeFormatError}
		b := dnsmessage.NewBuilder(nil, rh)
		return b.Finish()
	}
	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired}
	b := dnsmessage.NewBuilder(nil, rh)
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	if err := b.Question(q); err != nil {
		return nil, err
	}
	if err := b.StartAnswers(); err != nil {
		return nil, err
	}
	if q.Type == dnsmessage.TypeTXT {
		rr := dnsmessage.ResourceHeader{Name: q.Name, Type: dnsmessage.TypeTXT, Class: dnsmessage.ClassINET, TTL: 0}
		if err := b.TXTResource(rr, dnsmessage.TXTResource{TXT: []string{name}}); err != nil {
			return nil, err
		}
	}
	return b.Finish()
}

// serveConns runs handle on every accepted connection (closing it after)
// until the listener closes, then waits for the handlers.
func serveConns(ln net.Listener, handle func(net.Conn)) {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		wg.Go(func() {
			defer c.Close()
			handle(c)
		})
	}
}

func lineEcho(name string, ln net.Listener) {
	serveConns(ln, func(c net.Conn) {
		sc := bufio.NewScanner(c)
		for sc.Scan() {
			if _, err := fmt.Fprintf(c, "%s: %s\n", name, sc.Text()); err != nil {
				return
			}
		}
	})
}

func sink(ln net.Listener) {
	serveConns(ln, func(c net.Conn) {
		n, _ := io.Copy(io.Discard, c)
		fmt.Fprintf(c, "%d\n", n)
	})
}

// maxSource bounds what a source sends on one connection (16 GiB).
const maxSource = 16 << 30

func source(ln net.Listener) {
	serveConns(ln, func(c net.Conn) {
		var n int64
		if _, err := fmt.Fscanln(c, &n); err != nil || n < 0 || n > maxSource {
			return
		}
		buf := make([]byte, 256<<10)
		for sent := int64(0); sent < n; {
			k := min(int64(len(buf)), n-sent)
			if _, err := c.Write(buf[:k]); err != nil {
				return
			}
			sent += k
		}
	})
}

// Fetch asks a source for size bytes over a new connection from inside
// the namespace and returns how many arrived.
func Fetch(ctx context.Context, nsPath, addr string, size int64) (int64, error) {
	c, err := Dial(ctx, nsPath, "tcp4", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	if d, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(d)
	}
	if _, err := fmt.Fprintf(c, "%d\n", size); err != nil {
		return 0, err
	}
	return io.Copy(io.Discard, c)
}

// Send writes size bytes over a new connection from inside the namespace
// to a sink and returns what the sink counted.
func Send(ctx context.Context, nsPath, addr string, size int64) (int64, error) {
	c, err := Dial(ctx, nsPath, "tcp4", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	if d, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(d)
	}
	buf := make([]byte, 256<<10)
	for sent := int64(0); sent < size; {
		n := min(int64(len(buf)), size-sent)
		if _, err := c.Write(buf[:n]); err != nil {
			return sent, fmt.Errorf("after %d bytes: %w", sent, err)
		}
		sent += n
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return size, err
	}
	var got int64
	if _, err := fmt.Fscan(c, &got); err != nil {
		return size, fmt.Errorf("reading the sink's count: %w", err)
	}
	return got, nil
}

// Dial opens a connection from inside the namespace at nsPath.
func Dial(ctx context.Context, nsPath, network, addr string) (net.Conn, error) {
	return netns.Dial(ctx, nsPath, network, addr)
}

// HTTPClient returns a client whose connections start inside the namespace
// at nsPath; every request uses a new connection, so a service picks a
// backend for each.
func HTTPClient(nsPath string, timeout time.Duration) *http.Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return Dial(ctx, nsPath, network, addr)
		},
		DisableKeepAlives: true,
	}
	return &http.Client{Transport: tr, Timeout: timeout}
}

// Get fetches url from inside the namespace and returns the trimmed body.
func Get(ctx context.Context, c *http.Client, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("HTTP %d", resp.StatusCode)
	}
	return strings.TrimSpace(string(b)), nil
}

// UDPAsk sends one datagram from inside the namespace and returns the
// answer.
func UDPAsk(ctx context.Context, nsPath, addr, msg string, timeout time.Duration) (string, error) {
	c, err := Dial(ctx, nsPath, "udp4", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte(msg)); err != nil {
		return "", err
	}
	buf := make([]byte, 65535)
	n, err := c.Read(buf)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return "", fmt.Errorf("no answer from %s within %s", addr, timeout)
		}
		return "", err
	}
	return string(buf[:n]), nil
}

// Exec runs a program (a real client: curl, dig) with its network
// namespace at nsPath and its process in the cgroup v2 directory cgroup
// from its first instruction, as a pod's or a node's own process would
// be, and returns what it wrote to stdout.
func Exec(ctx context.Context, nsPath, cgroup string, argv ...string) (string, error) {
	dir, err := os.Open(cgroup)
	if err != nil {
		return "", fmt.Errorf("opening cgroup: %w", err)
	}
	defer dir.Close()
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + nsPath, "--"}, argv...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}
