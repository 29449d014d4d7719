package netns

import (
	"crypto/rand"
	"encoding/hex"
	"net"
	"os"
	"testing"
)

func uniq(t *testing.T) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return "wt-netns-" + hex.EncodeToString(b[:])
}

func TestCreateDoDelete(t *testing.T) {
	name := uniq(t)
	path, err := Create(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Delete(name) })
	if _, err := Create(name); err == nil {
		t.Fatal("creating an existing namespace succeeded")
	}

	// A fresh namespace has only a loopback device, and it is down.
	var names []string
	if err := Do(path, func() error {
		ifs, err := net.Interfaces()
		for _, i := range ifs {
			names = append(names, i.Name)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if len(names) != 1 || names[0] != "lo" {
		t.Fatalf("interfaces in new namespace: %v", names)
	}

	// The netlink handle works there without moving threads.
	h, err := Handle(path)
	if err != nil {
		t.Fatal(err)
	}
	lo, err := h.LinkByName("lo")
	h.Close()
	if err != nil || lo.Attrs().Index != 1 {
		t.Fatalf("lo in namespace: %v %v", lo, err)
	}

	if err := Delete(name); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("namespace file still exists: %v", err)
	}
	if err := Delete(name); err != nil {
		t.Fatalf("deleting twice: %v", err)
	}
}

func TestCreateRejectsBadNames(t *testing.T) {
	for _, n := range []string{"", "a/b", "../x"} {
		if _, err := Create(n); err == nil {
			t.Errorf("Create(%q) succeeded", n)
		}
	}
}
