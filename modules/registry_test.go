package modules

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/weirnet/weir/core/config"
)

// The real registry's requirements reach the user as configuration errors
// naming the module, the field and what to enable.
func TestRequirementsOfTheInTreeModules(t *testing.T) {
	reg, err := Registry()
	if err != nil {
		t.Fatal(err)
	}
	cases := map[string]string{
		"modules: [endpoints, socketlb]\n": `modules: module "socketlb" (modules[1]) requires module "lb", which is not enabled`,
		"modules: [socketlb, lb]\n":        `modules: module "lb" (modules[1]) requires module "endpoints", which is not enabled`,
	}
	for yaml, want := range cases {
		path := filepath.Join(t.TempDir(), "weir.yaml")
		if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := config.Load(path, reg)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v; want %q", yaml, err, want)
		}
	}
	path := filepath.Join(t.TempDir(), "weir.yaml")
	if err := os.WriteFile(path, []byte("modules: [endpoints, lb, socketlb]\nsettings:\n  socketlb:\n    hostNamespaceOnly: true\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := config.Load(path, reg); err != nil {
		t.Errorf("endpoints, lb, socketlb: %v", err)
	}
}

// Settings of the north-south modules that cannot work together are
// refused at load, naming the fields; so is a second NodePort dispatch
// module.
func TestNorthSouthConfigErrors(t *testing.T) {
	reg, err := Registry()
	if err != nil {
		t.Fatal(err)
	}
	const base = "modules: [endpoints, lb, nodeport, masquerade]\n"
	cases := map[string]string{
		base + "settings:\n  masquerade: {portRange: 31000-40000}\n":                           `settings.nodeport.nodePortRange: 30000-32767 overlaps masquerade.portRange 31000-40000: ports that serve services cannot also be given to translated flows`,
		base + "settings:\n  nodeport: {snatPortRange: 32000-65535}\n":                         `settings.nodeport.snatPortRange: 32000-65535 overlaps nodeport.nodePortRange 30000-32767: ports that serve services cannot also be given to translated flows`,
		base + "settings:\n  nodeport: {nodePortRange: 32767-30000}\n":                         `settings.nodeport.nodePortRange: "32767-30000" starts above its end`,
		base + "settings:\n  masquerade: {nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.1.1/24]}\n": `settings.masquerade.nonMasqueradeCIDRs[1]: "192.168.1.1/24" has host bits set; the network is 192.168.1.0/24`,
		base + "settings:\n  masquerade: {nonMasqueradeCIDRs: [10.0.0.0/33]}\n":                `settings.masquerade.nonMasqueradeCIDRs[0]: "10.0.0.0/33" is not an IPv4 CIDR such as 10.0.0.0/8`,
		"modules: [endpoints, masquerade]\n":                                                   `module "masquerade" (modules[1]) requires module "lb", which is not enabled`,
		// DSR needs the client's address to reach the backend's node as
		// it is: native routing.
		"modules: [endpoints, lb, tunnel, dsr-ipoption]\n":                                                                      `module "dsr-ipoption" (modules[3]) requires module "nativerouting", which is not enabled`,
		"modules: [endpoints, lb, nativerouting, dsr-ipoption]\nsettings:\n  dsr-ipoption: {mode: direct}\n":                    `settings.dsr-ipoption.mode: "direct" is not one of snat, dsr, hybrid`,
		"modules: [endpoints, lb, nativerouting, dsr-ipoption]\nsettings:\n  dsr-ipoption: {ipipSourcePrefix: 100.64.0.0/24}\n": `settings.dsr-ipoption.ipipSourcePrefix: only dsr-ipip sends IP-in-IP`,
		"modules: [endpoints, lb, nativerouting, dsr-ipip]\nsettings:\n  dsr-ipip: {ipipSourcePrefix: 100.64.0.0/31}\n":         `settings.dsr-ipip.ipipSourcePrefix: "100.64.0.0/31" is not an IPv4 network of /8 to /30 such as 100.64.10.0/24`,
		"modules: [endpoints, lb, nodeport]\nsettings:\n  nodeport: {mode: dsr}\n":                                              `settings.nodeport.mode: "dsr" needs a DSR module (dsr-ipoption or dsr-ipip); nodeport dispatches by snat only`,
		"modules: [endpoints, lb, nativerouting, nodeport, dsr-ipoption]\n":                                                     `modules "dsr-ipoption" (modules[4]) and "nodeport" (modules[3]) both claim slot netdev-ingress/nodeport (NodePort dispatch); enable only one`,
	}
	for yaml, want := range cases {
		path := filepath.Join(t.TempDir(), "weir.yaml")
		if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := config.Load(path, reg)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v\nwant %q", yaml, err, want)
		}
	}

	// The two DSR modules are members of the group too.
	path := filepath.Join(t.TempDir(), "weir.yaml")
	if err := os.WriteFile(path, []byte("modules: [endpoints, lb, nativerouting, dsr-ipoption, dsr-ipip]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = config.Load(path, reg)
	if want := `modules "dsr-ipip" (modules[4]) and "dsr-ipoption" (modules[3]) both claim slot netdev-ingress/nodeport (NodePort dispatch); enable only one`; err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("two DSR modules: %v; want %q", err, want)
	}
}
