package mounts

import (
	"strings"
	"testing"
)

const sample = `sysfs /sys sysfs rw,nosuid 0 0
tmpfs /sys/fs/cgroup tmpfs rw 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0
bpffs /sys/fs/bpf bpf rw 0 0
tmpfs /mnt/with\040space tmpfs rw 0 0
`

func TestCgroup2RootFromMountTable(t *testing.T) {
	ms, err := parse(strings.NewReader(sample))
	if err != nil {
		t.Fatal(err)
	}
	root, err := cgroup2Root(ms)
	if err != nil || root != "/sys/fs/cgroup/unified" {
		t.Fatalf("cgroup2Root = %q, %v", root, err)
	}
	if ms[5].Target != "/mnt/with space" {
		t.Fatalf("escaped target decoded as %q", ms[5].Target)
	}
	if _, err := cgroup2Root(ms[:2]); err == nil {
		t.Fatal("expected an error without a cgroup2 line")
	}
}

func TestCgroup2RootOnThisMachine(t *testing.T) {
	root, err := Cgroup2Root()
	if err != nil {
		t.Fatal(err)
	}
	if ok, _ := IsBPFFS(root); ok {
		t.Fatalf("%s reported as bpffs", root)
	}
}

func TestEnsurePinDirRejectsNonBPFFS(t *testing.T) {
	err := EnsurePinDir(t.TempDir())
	if err == nil || !strings.Contains(err.Error(), "not on a bpf filesystem") {
		t.Fatalf("EnsurePinDir(tmp) = %v", err)
	}
	if err := EnsurePinDir("relative/dir"); err == nil {
		t.Fatal("relative pin dir accepted")
	}
}
