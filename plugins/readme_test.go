package plugins_test

import (
	"crypto/sha256"
	"encoding/hex"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/gopacket/gopacket/layers"

	"github.com/weirnet/weir/core/config"
	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/datapath/dptest"
	"github.com/weirnet/weir/core/pluginhost"
	"github.com/weirnet/weir/core/slots"
)

// The walkthrough in README.md is the code of examples/plugins/hello, so
// it cannot drift: the README's blocks are those files (the include path
// aside), and the plugin they make, built here, is started by the agent's
// host, loaded into a node's datapath, and counts a SYN.
func TestWalkthroughIsTheHelloExample(t *testing.T) {
	doc, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	blocks := regexp.MustCompile("(?s)```(c|go)\n(.*?)```").FindAllStringSubmatch(string(doc), -1)
	dir := "../examples/plugins/hello"
	want := map[string]string{}
	for _, f := range []string{"hello.c", "gen.go", "main.go"} {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		want[f] = strings.ReplaceAll(string(b), "-I../../../bpf/include", "-I<weir checkout>/bpf/include")
	}
	var got []string
	for _, b := range blocks {
		got = append(got, b[2])
	}
	if len(got) != 3 || got[0] != want["hello.c"] || got[1] != want["gen.go"] || got[2] != want["main.go"] {
		t.Fatalf("README's code blocks differ from %s (hello.c, gen.go, main.go, in that order)", dir)
	}

	bin := filepath.Join(t.TempDir(), "hello")
	if out, err := exec.Command("go", "build", "-o", bin, dir).CombinedOutput(); err != nil {
		t.Fatalf("building hello: %v\n%s", err, out)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	p, err := pluginhost.Start(config.Plugin{Name: "hello", Path: bin, SHA256: hex.EncodeToString(sum[:])}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	f := p.Factory()
	s := f.NewSettings()
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	spec, err := pluginhost.Spec(p.Desc, s.(*pluginhost.Settings).Object())
	if err != nil {
		t.Fatal(err)
	}
	dp := dptest.Open(t)
	dptest.Install(t, dp, datapath.Object{Module: "hello", Spec: spec, Plugin: true, Slots: map[string]string{"pod-egress/plugin-early": "hello"}})
	entry, err := dp.Entry(slots.PodEgress)
	if err != nil {
		t.Fatal(err)
	}
	syn := dptest.Flow{Src: netip.MustParseAddrPort("10.244.1.5:40000"), Dst: netip.MustParseAddrPort("10.96.0.10:80"), Proto: layers.IPProtocolTCP, SYN: true}
	if res := dptest.Run(t, entry, dptest.Build(t, syn)); res.Verdict != dptest.ActOK {
		t.Fatalf("the SYN got verdict %d", res.Verdict)
	}
	pinned, err := datapath.OpenPinned(dp.PinDir())
	if err != nil {
		t.Fatal(err)
	}
	defer pinned.Close()
	rows, err := pinned.PluginMaps()
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 1 || rows[0].Plugin != "hello" || rows[0].Map != "hello_syns" || len(rows[0].Counters) != 1 || rows[0].Counters[0] != 1 {
		t.Fatalf("plugin maps after one SYN: %+v", rows)
	}
}
