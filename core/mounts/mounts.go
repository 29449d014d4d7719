// Package mounts finds and prepares the kernel filesystems the agent needs:
// bpffs for pinned objects and the cgroup v2 hierarchy for socket hooks.
// Mount points are read from /proc, never assumed.
package mounts

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultBPFFS is where bpffs is conventionally mounted; the agent mounts it
// there when it is missing, as Cilium does.
const DefaultBPFFS = "/sys/fs/bpf"

// Mount is one line of /proc/self/mounts.
type Mount struct {
	Source, Target, FSType string
}

// Read returns the mount table of the calling process.
func Read() ([]Mount, error) {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return nil, fmt.Errorf("reading the mount table: %w", err)
	}
	defer f.Close()
	return parse(f)
}

func parse(r io.Reader) ([]Mount, error) {
	var out []Mount
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 3 {
			continue
		}
		out = append(out, Mount{Source: f[0], Target: unescape(f[1]), FSType: f[2]})
	}
	return out, sc.Err()
}

// unescape decodes the octal escapes (\040 for space) of /proc/mounts.
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			ok := true
			for _, c := range []byte(s[i+1 : i+4]) {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + (c - '0')
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Cgroup2Root returns the mount point of the cgroup v2 hierarchy.
func Cgroup2Root() (string, error) {
	ms, err := Read()
	if err != nil {
		return "", err
	}
	return cgroup2Root(ms)
}

func cgroup2Root(ms []Mount) (string, error) {
	for _, m := range ms {
		if m.FSType == "cgroup2" {
			return m.Target, nil
		}
	}
	return "", errors.New("no cgroup v2 hierarchy is mounted (no cgroup2 line in /proc/self/mounts)")
}

// IsBPFFS reports whether path lies on a bpf filesystem.
func IsBPFFS(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false, err
	}
	return st.Type == unix.BPF_FS_MAGIC, nil
}

// EnsurePinDir makes dir, a directory for pinned objects, exist on a bpf
// filesystem. When dir is under DefaultBPFFS and nothing is mounted there,
// bpffs is mounted first; any other location must already be on bpffs.
func EnsurePinDir(dir string) error {
	dir = filepath.Clean(dir)
	if !filepath.IsAbs(dir) {
		return fmt.Errorf("pin directory %q must be an absolute path", dir)
	}
	if dir == DefaultBPFFS || strings.HasPrefix(dir, DefaultBPFFS+"/") {
		on, err := IsBPFFS(DefaultBPFFS)
		if errors.Is(err, os.ErrNotExist) {
			if err := os.MkdirAll(DefaultBPFFS, 0o755); err != nil {
				return fmt.Errorf("creating %s: %w", DefaultBPFFS, err)
			}
			on = false
		} else if err != nil {
			return fmt.Errorf("checking %s: %w", DefaultBPFFS, err)
		}
		if !on {
			if err := unix.Mount("bpffs", DefaultBPFFS, "bpf", 0, "mode=0700"); err != nil {
				return fmt.Errorf("mounting bpffs at %s: %w", DefaultBPFFS, err)
			}
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating pin directory %s: %w", dir, err)
	}
	on, err := IsBPFFS(dir)
	if err != nil {
		return fmt.Errorf("checking pin directory %s: %w", dir, err)
	}
	if !on {
		return fmt.Errorf("pin directory %s is not on a bpf filesystem: mount one (mount -t bpf bpffs <dir>) or use a path under %s", dir, DefaultBPFFS)
	}
	return nil
}
