package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/weirnet/weir/core/slots"
)

// CheckCgroup says whether path is a directory of a cgroup v2 hierarchy,
// the only place socket programs attach. It returns the cgroup's id (the
// directory's inode), which is how the kernel names it in link info.
func CheckCgroup(path string) (uint64, error) {
	if path == "" {
		return 0, errors.New("no cgroup given: socket hooks attach to a cgroup v2 directory (--cgroup)")
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", path, err)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return 0, fmt.Errorf("cgroup %s is not on a cgroup v2 file system (type %#x): socket hooks need cgroup v2", path, fs.Type)
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", path, err)
	}
	if st.Mode&syscall.S_IFMT != syscall.S_IFDIR {
		return 0, fmt.Errorf("cgroup %s is not a directory", path)
	}
	return st.Ino, nil
}

// Cgroup is the cgroup v2 directory whose sockets the socket hooks see.
func (d *Datapath) Cgroup() string { return d.opts.Cgroup }

// cgroupPin is where the link of a socket hook is pinned.
func (d *Datapath) cgroupPin(h slots.CgroupHook) string {
	return filepath.Join(d.opts.PinDir, "links", strings.ReplaceAll(h.Name, "/", "_"))
}

// attachCgroup runs prog at the socket hook of the node's cgroup through a
// pinned link (pinLink: moved in one step on a restart, replaced when
// left on another cgroup).
func (d *Datapath) attachCgroup(h slots.CgroupHook, prog *ebpf.Program, cgroupID uint64) error {
	alive := func(info *link.Info) bool {
		cg := info.Cgroup()
		return cg != nil && cg.CgroupId == cgroupID && ebpf.AttachType(cg.AttachType) == h.Attach
	}
	attach := func() (link.Link, error) {
		return link.AttachCgroup(link.CgroupOptions{Path: d.opts.Cgroup, Attach: h.Attach, Program: prog})
	}
	if err := pinLink(d.cgroupPin(h), prog, alive, attach); err != nil {
		return fmt.Errorf("%s on cgroup %s: %w", h.Name, d.opts.Cgroup, err)
	}
	return nil
}

// detachCgroup removes whatever program runs at the socket hook.
func (d *Datapath) detachCgroup(h slots.CgroupHook) error {
	if err := removeLink(d.cgroupPin(h)); err != nil {
		return fmt.Errorf("the link of %s: %w", h.Name, err)
	}
	return nil
}

// CgroupAttached says which program (by name) runs at a socket hook of the
// node, or "" when none does.
func (d *Datapath) CgroupAttached(name string) (string, error) {
	h, ok := slots.LookupCgroupHook(name)
	if !ok {
		return "", fmt.Errorf("unknown cgroup hook %q", name)
	}
	l, err := link.LoadPinnedLink(d.cgroupPin(h), nil)
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return "", err
	}
	prog, err := ebpf.NewProgramFromID(info.Program)
	if err != nil {
		return "", err
	}
	defer prog.Close()
	pi, err := prog.Info()
	if err != nil {
		return "", err
	}
	return pi.Name, nil
}
