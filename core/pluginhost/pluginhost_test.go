package pluginhost

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/weirnet/weir/core/config"
	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/datapath/dptest"
	"github.com/weirnet/weir/core/slots"
	"github.com/weirnet/weir/modules/lb"
)

// testPlugin is plugins/testplugin, built once for the package.
var testPlugin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "weir-pluginhost")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	testPlugin = filepath.Join(dir, "testplugin")
	cmd := exec.Command("go", "build", "-o", testPlugin, "../../plugins/testplugin")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building the test plugin:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func sum(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(data)
	return hex.EncodeToString(s[:])
}

// decl declares the test plugin in mode, with its real checksum.
func decl(t *testing.T, mode string) config.Plugin {
	t.Helper()
	t.Setenv("WEIR_TESTPLUGIN_MODE", mode)
	return config.Plugin{Name: "testplugin", Path: testPlugin, SHA256: sum(t, testPlugin), CallTimeout: "2s"}
}

// Plugins that cannot be run are refused at Start, each with an error
// that names the plugin and what was wrong, and no process is left.
func TestBadPluginsAreRefusedAtStart(t *testing.T) {
	cases := []struct {
		name, mode string
		change     func(*config.Plugin)
		want       []string
	}{
		{name: "wrong checksum", mode: "good", change: func(d *config.Plugin) { d.SHA256 = strings.Repeat("ab", 32) },
			want: []string{"plugin testplugin: ", " has SHA-256 ", "but the configuration says abab", "not started"}},
		{name: "missing binary", mode: "good", change: func(d *config.Plugin) { d.Path = "/nonexistent/plugin" },
			want: []string{"plugin testplugin: reading the plugin binary: open /nonexistent/plugin: no such file or directory"}},
		{name: "exits before the handshake", mode: "exit",
			want: []string{"plugin testplugin: starting " + testPlugin + ": the process exited before the go-plugin handshake (its output is in the agent's log; a Weir plugin calls sdk.Serve)"}},
		{name: "another protocol version", mode: "version2",
			want: []string{"plugin testplugin: starting ", "incompatible API version with plugin. Plugin version: 2, Client versions: [1] (a Weir plugin speaks protocol version 1 over gRPC"}},
		{name: "hangs on Describe", mode: "hang",
			want: []string{"plugin testplugin: Describe did not answer within 2s (callTimeout)"}},
		{name: "claims an in-tree slot", mode: "in-tree-slot",
			want: []string{"plugin testplugin (" + testPlugin + "): plugin testplugin claims slot pod-egress/lb, which belongs to in-tree modules; plugin slots: " + strings.Join(slots.PluginSlots(), ", ")}},
		{name: "declared under another name", mode: "good", change: func(d *config.Plugin) { d.Name = "other" },
			want: []string{`plugin other (` + testPlugin + `): it describes itself as "testplugin", but is declared as "other"`}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := decl(t, tc.mode)
			if tc.change != nil {
				tc.change(&d)
			}
			start := time.Now()
			p, err := Start(d, nil)
			if err == nil {
				p.Kill()
				t.Fatal("started")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q\nlacks %q", err, w)
				}
			}
			if el := time.Since(start); el > 10*time.Second {
				t.Errorf("took %s to refuse", el)
			}
			assertNoTestPlugin(t)
		})
	}
}

// assertNoTestPlugin checks that no process of the test plugin runs.
func assertNoTestPlugin(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		running := runningPlugins(t)
		if len(running) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("test plugin processes left running: %v", running)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func runningPlugins(t *testing.T) []string {
	t.Helper()
	var out []string
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		exe, err := os.Readlink(filepath.Join(d, "exe"))
		if err == nil && exe == testPlugin {
			if st, err := os.ReadFile(filepath.Join(d, "stat")); err == nil && strings.Contains(string(st), ") Z ") {
				continue // a zombie is gone already
			}
			out = append(out, d)
		}
	}
	return out
}

// A plugin that starts but whose object cannot be used: refused with what
// was wrong, before any slot changes; the datapath keeps what it had.
func TestBadObjectsLeaveTheDatapathAsItWas(t *testing.T) {
	dp := dptest.Open(t)
	lbSpec, err := lb.New(nil).Object()
	if err != nil {
		t.Fatal(err)
	}
	lbClaims := map[string]string{}
	for _, c := range lb.Factory.Slots {
		lbClaims[c.Slot] = c.Program
	}
	lbObj := datapath.Object{Module: "lb", Spec: lbSpec, Slots: lbClaims}
	dptest.Install(t, dp, lbObj)
	mask := func() uint32 {
		t.Helper()
		m, err := dp.Map(datapath.MapSlotMask)
		if err != nil {
			t.Fatal(err)
		}
		var v uint32
		if err := m.Lookup(uint32(slots.PodEgress), &v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	before := mask()
	if before == 0 {
		t.Fatal("lb did not fill its slot")
	}

	for _, tc := range []struct {
		mode string
		want []string
	}{
		{"verifier", []string{"module testplugin: loading the BPF object of plugin testplugin: program rejected: load program: permission denied: invalid access to map value"}},
		{"undeclared-map", []string{"plugin testplugin: program uses_nat uses map weir_nat, which the plugin did not declare (core maps: ; own maps: none)"}},
		{"bad-settings", []string{"speed: must be slow"}},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			p, err := Start(decl(t, tc.mode), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer p.Kill()
			s := &Settings{p: p}
			err = s.Validate()
			var spec *ebpf.CollectionSpec
			if err == nil {
				spec, err = Spec(p.Desc, s.obj)
			}
			if err == nil {
				_, err = dp.Install([]datapath.Object{lbObj, {Module: "testplugin", Spec: spec, Slots: map[string]string{"pod-egress/plugin-early": p.Desc.Slots[0].Program}, Plugin: true}})
			}
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q\nlacks %q", err, w)
				}
			}
			if got := mask(); got != before {
				t.Fatalf("pod-egress slots %b after the refusal, %b before", got, before)
			}
		})
	}
}

// A plugin process that dies is started again (go-plugin does not), with
// its settings; meanwhile its BPF keeps running under failurePolicy open,
// and its slots drop under closed. The binary is moved away while the
// process is down, so the window can be seen; moved back, it is restarted.
func TestCrashedPluginRestartsUnderItsFailurePolicy(t *testing.T) {
	for _, policy := range []string{config.FailOpen, config.FailClosed} {
		t.Run(policy, func(t *testing.T) {
			dp := dptest.Open(t)
			bin := filepath.Join(t.TempDir(), "testplugin")
			data, err := os.ReadFile(testPlugin)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(bin, data, 0o755); err != nil {
				t.Fatal(err)
			}
			d := decl(t, "good")
			d.Path, d.SHA256, d.FailurePolicy = bin, sum(t, bin), policy
			p, s := configured(t, d)
			spec, err := Spec(p.Desc, s.obj)
			if err != nil {
				t.Fatal(err)
			}
			inst := dptest.Install(t, dp, datapath.Object{Module: "testplugin", Spec: spec, Plugin: true,
				Slots: map[string]string{"pod-egress/plugin-early": "pass_stage"}})
			m := &Module{p: p, settings: s, dp: dp}
			if err := m.Loaded(inst.Collections["testplugin"]); err != nil {
				t.Fatal(err)
			}
			if err := m.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			defer m.Stop(context.Background())

			slot := func() ebpf.ProgramID {
				t.Helper()
				calls, err := dp.Map(datapath.MapCalls)
				if err != nil {
					t.Fatal(err)
				}
				s, _ := slots.Lookup("pod-egress/plugin-early")
				var id ebpf.ProgramID
				if err := calls.Lookup(s.Index(), &id); err != nil {
					t.Fatal(err)
				}
				return id
			}
			progID := func(prog *ebpf.Program) ebpf.ProgramID {
				t.Helper()
				info, err := prog.Info()
				if err != nil {
					t.Fatal(err)
				}
				id, _ := info.ID()
				return id
			}
			own, down := progID(inst.Collections["testplugin"].Programs["pass_stage"]), progID(dp.PluginDownProgram())
			if slot() != own {
				t.Fatal("the plugin's program is not in its slot")
			}
			if err := os.Rename(bin, bin+".away"); err != nil {
				t.Fatal(err)
			}
			pid := p.Pid()
			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			want, what := own, "its own program (open: its BPF runs on)"
			if policy == config.FailClosed {
				want, what = down, "the dropping stand-in (closed)"
			}
			waitUntil(t, 5*time.Second, "the slot to hold "+what+" while the process is down", func() bool {
				return p.Pid() == 0 && slot() == want
			})
			if err := os.Rename(bin+".away", bin); err != nil {
				t.Fatal(err)
			}
			waitUntil(t, 10*time.Second, "the plugin to be restarted", func() bool { return m.Restarts() == 1 })
			if got := p.Pid(); got == 0 || got == pid {
				t.Fatalf("process %d after the restart (was %d)", got, pid)
			}
			if slot() != own {
				t.Fatal("after the restart the slot does not hold the plugin's program")
			}
		})
	}
}

func waitUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A plugin that hangs in Start is an error naming the call and the bound.
func TestPluginHangingInStart(t *testing.T) {
	p, s := configured(t, decl(t, "hang-start"))
	m := &Module{p: p, settings: s}
	err := m.Start(context.Background())
	if err == nil || err.Error() != "plugin testplugin: Start did not answer within 2s (callTimeout)" {
		t.Fatalf("Start: %v", err)
	}
}

// configured starts a plugin and validates empty settings, as the agent
// does before composing it; the process ends with the test.
func configured(t *testing.T, d config.Plugin) (*Plugin, *Settings) {
	t.Helper()
	p, err := Start(d, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Kill)
	s := &Settings{p: p}
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	return p, s
}
