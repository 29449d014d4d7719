package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/weirnet/weir/core/lab"
	"github.com/weirnet/weir/core/mounts"
	"github.com/weirnet/weir/core/netns"
)

var bins struct{ dir, agent, cni string }

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "weir-cni-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bins.dir, bins.agent, bins.cni = dir, filepath.Join(dir, "weir-agent"), filepath.Join(dir, "weir-cni")
	for out, pkg := range map[string]string{bins.agent: "../agent", bins.cni: "."} {
		cmd := exec.Command("go", "build", "-o", out, pkg)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			os.RemoveAll(dir)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

type env struct {
	t       *testing.T
	lab     *lab.Lab
	node    *lab.Node
	cni     *libcni.CNIConfig
	conf    *libcni.NetworkConfigList
	rawConf []byte
	dataDir string
}

func short() string {
	var b [3]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// setup brings up a one-node lab (an agent with pod CIDR 10.244.5.0/24)
// and a CNI configuration pointing at it.
func setup(t *testing.T) *env {
	t.Helper()
	spec := &lab.Spec{Name: "c" + short(), Nodes: []lab.NodeSpec{{Name: "n1", PodCIDR: "10.244.5.0/24"}}}
	l, err := lab.Up(context.Background(), spec, lab.Options{AgentBinary: bins.agent, StateRoot: "/run/weir/lab-test", PinRoot: mounts.DefaultBPFFS + "/weir-lab-test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Down(); err != nil {
			t.Errorf("lab down: %v", err)
		}
	})
	e := &env{t: t, lab: l, node: l.Nodes[0], dataDir: t.TempDir()}
	e.rawConf = []byte(fmt.Sprintf(`{"cniVersion":"1.1.0","name":"weir","plugins":[{"type":"weir-cni","agentSocket":%q,"dataDir":%q}]}`, e.node.APISocket, e.dataDir))
	e.conf, err = libcni.ConfListFromBytes(e.rawConf)
	if err != nil {
		t.Fatal(err)
	}
	e.cni = libcni.NewCNIConfigWithCacheDir([]string{bins.dir}, t.TempDir(), nil)
	return e
}

// sandbox makes a pod namespace, removed when the test ends.
func (e *env) sandbox() (id, path string) {
	e.t.Helper()
	name := e.lab.Spec.Name + "-p" + short()
	path, err := netns.Create(name)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { _ = netns.Delete(name) })
	return "ctr-" + short(), path
}

func (e *env) rt(id, path string) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{ContainerID: id, NetNS: path, IfName: "eth0",
		Args: [][2]string{{"K8S_POD_NAMESPACE", "default"}, {"K8S_POD_NAME", "pod-" + id}}}
}

func (e *env) add(id, path string) *current.Result {
	e.t.Helper()
	r, err := e.cni.AddNetworkList(context.Background(), e.conf, e.rt(id, path))
	if err != nil {
		e.t.Fatalf("ADD: %v", err)
	}
	res, err := current.NewResultFromResult(r)
	if err != nil {
		e.t.Fatal(err)
	}
	return res
}

func TestAddCheckDel(t *testing.T) {
	e := setup(t)
	ctx := context.Background()
	idA, nsA := e.sandbox()
	idB, nsB := e.sandbox()
	a, b := e.add(idA, nsA), e.add(idB, nsB)

	cidr := netip.MustParsePrefix("10.244.5.0/24")
	ipA, _ := netip.AddrFromSlice(a.IPs[0].Address.IP.To4())
	ipB, _ := netip.AddrFromSlice(b.IPs[0].Address.IP.To4())
	if !cidr.Contains(ipA) || !cidr.Contains(ipB) || ipA == ipB {
		t.Fatalf("addresses %s and %s (want two distinct ones in %s)", ipA, ipB, cidr)
	}
	if a.IPs[0].Gateway.String() != "169.254.1.1" || a.Interfaces[0].Sandbox != nsA || a.Interfaces[0].Name != "eth0" || a.Interfaces[0].Mac == "" {
		t.Fatalf("result %+v / %+v", a.IPs[0], a.Interfaces[0])
	}
	// The pods reach each other.
	srv, err := lab.Serve("b", nsB, lab.Workload{HTTP: 8080})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	who, err := lab.Get(ctx, lab.HTTPClient(nsA, 3*time.Second), "http://"+ipB.String()+":8080/")
	if err != nil || who != "b" {
		t.Fatalf("pod A to pod B: %q %v", who, err)
	}

	// ADD again for the same container returns the same address.
	if again := e.add(idA, nsA); !again.IPs[0].Address.IP.Equal(a.IPs[0].Address.IP) {
		t.Fatalf("repeated ADD gave %s, first %s", again.IPs[0].Address.IP, a.IPs[0].Address.IP)
	}
	if err := e.cni.CheckNetworkList(ctx, e.conf, e.rt(idA, nsA)); err != nil {
		t.Fatalf("CHECK: %v", err)
	}

	if err := e.cni.DelNetworkList(ctx, e.conf, e.rt(idA, nsA)); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if err := e.cni.DelNetworkList(ctx, e.conf, e.rt(idA, nsA)); err != nil {
		t.Fatalf("repeated DEL: %v", err)
	}
	if _, err := os.Stat(filepath.Join(e.dataDir, ipA.String())); !os.IsNotExist(err) {
		t.Fatalf("address %s still allocated after DEL (%v)", ipA, err)
	}
	h, err := netns.Handle(nsA)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if _, err := h.LinkByName("eth0"); err == nil {
		t.Fatal("eth0 still in the pod after DEL")
	}
	if _, err := e.node.Client().Endpoint(ctx, idA); err == nil {
		t.Fatal("agent still has the endpoint after DEL")
	}
	// CHECK of a deleted attachment fails (libcni needs a cached result:
	// check B after removing its endpoint behind the plugin's back).
	if err := e.node.Client().DeleteEndpoint(ctx, idB); err != nil {
		t.Fatal(err)
	}
	if err := e.cni.CheckNetworkList(ctx, e.conf, e.rt(idB, nsB)); err == nil || !strings.Contains(err.Error(), "not wired") {
		t.Fatalf("CHECK of an unwired pod: %v", err)
	}
}

// The agent restarts between attachments: existing pods stay wired and new
// ones are added; no address is handed out twice.
func TestAddAfterAgentRestart(t *testing.T) {
	e := setup(t)
	ctx := context.Background()
	id1, ns1 := e.sandbox()
	first := e.add(id1, ns1)
	if err := e.lab.StopAgent("n1"); err != nil {
		t.Fatal(err)
	}
	// While the agent is down, ADD asks the runtime to try again.
	id2, ns2 := e.sandbox()
	_, err := e.cni.AddNetworkList(ctx, e.conf, e.rt(id2, ns2))
	var ce *types.Error
	if !asCNIError(err, &ce) || ce.Code != types.ErrTryAgainLater {
		t.Fatalf("ADD with the agent down: %v (want code %d)", err, types.ErrTryAgainLater)
	}
	if err := e.lab.StartAgent(ctx, "n1"); err != nil {
		t.Fatal(err)
	}
	second := e.add(id2, ns2)
	if second.IPs[0].Address.IP.Equal(first.IPs[0].Address.IP) {
		t.Fatalf("address %s handed out twice", first.IPs[0].Address.IP)
	}
	if err := e.cni.CheckNetworkList(ctx, e.conf, e.rt(id1, ns1)); err != nil {
		t.Fatalf("CHECK of the pod wired before the restart: %v", err)
	}
}

// asCNIError finds the plugin's error result inside libcni's wrapping.
func asCNIError(err error, target **types.Error) bool {
	return errors.As(err, target)
}

func TestGCAndStatus(t *testing.T) {
	e := setup(t)
	ctx := context.Background()
	id1, ns1 := e.sandbox()
	id2, ns2 := e.sandbox()
	e.add(id1, ns1)
	second := e.add(id2, ns2)
	if err := e.cni.GetStatusNetworkList(ctx, e.conf); err != nil {
		t.Fatalf("STATUS with the agent up: %v", err)
	}
	err := e.cni.GCNetworkList(ctx, e.conf, &libcni.GCArgs{ValidAttachments: []types.GCAttachment{{ContainerID: id1, IfName: "eth0"}}})
	if err != nil {
		t.Fatalf("GC: %v", err)
	}
	if _, err := e.node.Client().Endpoint(ctx, id2); err == nil {
		t.Fatal("GC left the endpoint of a container the runtime no longer has")
	}
	if _, err := os.Stat(filepath.Join(e.dataDir, second.IPs[0].Address.IP.String())); !os.IsNotExist(err) {
		t.Fatal("GC left the address allocated")
	}
	if err := e.cni.CheckNetworkList(ctx, e.conf, e.rt(id1, ns1)); err != nil {
		t.Fatalf("GC broke a valid attachment: %v", err)
	}
	if err := e.lab.StopAgent("n1"); err != nil {
		t.Fatal(err)
	}
	err = e.cni.GetStatusNetworkList(ctx, e.conf)
	var ce *types.Error
	if !asCNIError(err, &ce) || ce.Code != types.ErrPluginNotAvailable {
		t.Fatalf("STATUS with the agent down: %v", err)
	}
}

// Run the binary as a runtime does (cnitool-style): bad input gets a CNI
// error result with a code and a message naming the problem.
func TestBadConfigGetsAClearError(t *testing.T) {
	run := func(cmd, conf string, extra ...string) (int, types.Error) {
		t.Helper()
		c := exec.Command(bins.cni)
		c.Stdin = strings.NewReader(conf)
		c.Env = append([]string{"CNI_COMMAND=" + cmd, "CNI_CONTAINERID=x1", "CNI_NETNS=/run/netns/none", "CNI_IFNAME=eth0", "CNI_PATH=" + bins.dir}, extra...)
		var out bytes.Buffer
		c.Stdout = &out
		err := c.Run()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		var res types.Error
		_ = json.Unmarshal(out.Bytes(), &res)
		return code, res
	}
	cases := []struct {
		name, conf string
		code       uint
		detail     string
	}{
		{"not JSON", "{", types.ErrDecodingFailure, ""},
		{"no name", `{"cniVersion":"1.1.0","type":"weir-cni"}`, types.ErrInvalidNetworkConfig, "missing network name"},
		{"relative socket", `{"cniVersion":"1.1.0","name":"weir","type":"weir-cni","agentSocket":"agent.sock"}`, types.ErrInvalidNetworkConfig, `"agentSocket" "agent.sock" must be an absolute path`},
		{"agent not there", `{"cniVersion":"1.1.0","name":"weir","type":"weir-cni","agentSocket":"/nonexistent/agent.sock","dataDir":"/tmp/x"}`, types.ErrTryAgainLater, "/nonexistent/agent.sock"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			exit, res := run("ADD", c.conf)
			if exit == 0 || res.Code != c.code || !strings.Contains(res.Msg+" "+res.Details, c.detail) {
				t.Fatalf("exit %d, result %+v; want code %d mentioning %q", exit, res, c.code, c.detail)
			}
		})
	}
	// VERSION works without any agent.
	c := exec.Command(bins.cni)
	c.Stdin = strings.NewReader(`{"cniVersion":"1.1.0"}`)
	c.Env = []string{"CNI_COMMAND=VERSION"}
	out, err := c.Output()
	if err != nil || !strings.Contains(string(out), `"1.1.0"`) {
		t.Fatalf("VERSION: %s %v", out, err)
	}
}
