package pluginhost

import (
	"context"
	"errors"
	"reflect"

	"github.com/cilium/ebpf"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pluginv1 "github.com/weirnet/weir/plugins/proto/v1"
)

// hostServer answers a plugin's calls on its own maps; it has no others.
type hostServer struct {
	pluginv1.UnimplementedHostServer
	plugin string
	maps   map[string]*ebpf.Map
}

func (h *hostServer) m(name string) (*ebpf.Map, error) {
	m, ok := h.maps[name]
	if !ok {
		return nil, status.Errorf(codes.PermissionDenied, "plugin %s has no map %q of its own", h.plugin, name)
	}
	return m, nil
}

// sized checks a key or value's length against the map's, so a wrong
// struct is an error that says so rather than a kernel EINVAL.
func sized(what string, b []byte, want uint32) error {
	if uint32(len(b)) != want {
		return status.Errorf(codes.InvalidArgument, "%s is %d bytes; the map takes %d", what, len(b), want)
	}
	return nil
}

// valueSize is the size of a whole value as the kernel copies it: every
// possible CPU's for per-CPU maps.
func valueSize(m *ebpf.Map) (uint32, error) {
	if !perCPU(m) {
		return m.ValueSize(), nil
	}
	n, err := ebpf.PossibleCPU()
	if err != nil {
		return 0, status.Errorf(codes.Internal, "counting CPUs: %v", err)
	}
	// Per-CPU values are 8-byte aligned.
	return uint32(n) * ((m.ValueSize() + 7) &^ 7), nil
}

func (h *hostServer) MapUpdate(_ context.Context, r *pluginv1.MapUpdateRequest) (*pluginv1.MapUpdateResponse, error) {
	m, err := h.m(r.Map)
	if err != nil {
		return nil, err
	}
	if err := sized("key", r.Key, m.KeySize()); err != nil {
		return nil, err
	}
	if perCPU(m) {
		return nil, status.Errorf(codes.InvalidArgument, "%s is per-CPU: its programs write it", r.Map)
	}
	if err := sized("value", r.Value, m.ValueSize()); err != nil {
		return nil, err
	}
	if err := m.Update(r.Key, r.Value, ebpf.UpdateAny); err != nil {
		return nil, status.Errorf(codes.Internal, "updating %s: %v", r.Map, err)
	}
	return &pluginv1.MapUpdateResponse{}, nil
}

func (h *hostServer) MapLookup(_ context.Context, r *pluginv1.MapLookupRequest) (*pluginv1.MapLookupResponse, error) {
	m, err := h.m(r.Map)
	if err != nil {
		return nil, err
	}
	if err := sized("key", r.Key, m.KeySize()); err != nil {
		return nil, err
	}
	n, err := valueSize(m)
	if err != nil {
		return nil, err
	}
	val := make([]byte, n)
	if err := lookupRaw(m, r.Key, val); errors.Is(err, ebpf.ErrKeyNotExist) {
		return &pluginv1.MapLookupResponse{}, nil
	} else if err != nil {
		return nil, status.Errorf(codes.Internal, "reading %s: %v", r.Map, err)
	}
	return &pluginv1.MapLookupResponse{Found: true, Value: val}, nil
}

func (h *hostServer) MapDelete(_ context.Context, r *pluginv1.MapDeleteRequest) (*pluginv1.MapDeleteResponse, error) {
	m, err := h.m(r.Map)
	if err != nil {
		return nil, err
	}
	if err := sized("key", r.Key, m.KeySize()); err != nil {
		return nil, err
	}
	if err := m.Delete(r.Key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil, status.Errorf(codes.Internal, "deleting from %s: %v", r.Map, err)
	}
	return &pluginv1.MapDeleteResponse{}, nil
}

// maxEntries bounds one MapEntries answer (gRPC's default message limit
// is 4 MiB).
const maxEntries = 16384

func (h *hostServer) MapEntries(_ context.Context, r *pluginv1.MapEntriesRequest) (*pluginv1.MapEntriesResponse, error) {
	m, err := h.m(r.Map)
	if err != nil {
		return nil, err
	}
	n, err := valueSize(m)
	if err != nil {
		return nil, err
	}
	out := &pluginv1.MapEntriesResponse{}
	var prev any // nil: the first key
	for len(out.Entries) < maxEntries {
		// A fresh slice per key: each one is kept in the answer.
		key := make([]byte, m.KeySize())
		if err := m.NextKey(prev, key); errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		} else if err != nil {
			return nil, status.Errorf(codes.Internal, "listing %s: %v", r.Map, err)
		}
		prev = key
		val := make([]byte, n)
		if err := lookupRaw(m, key, val); errors.Is(err, ebpf.ErrKeyNotExist) {
			continue // gone meanwhile
		} else if err != nil {
			return nil, status.Errorf(codes.Internal, "reading %s: %v", r.Map, err)
		}
		out.Entries = append(out.Entries, &pluginv1.MapEntry{Key: key, Value: val})
	}
	return out, nil
}

// lookupRaw reads a value as the kernel lays it out (per-CPU values
// concatenated).
func lookupRaw(m *ebpf.Map, key, val []byte) error {
	if !perCPU(m) {
		return m.Lookup(key, val)
	}
	n, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	stride := int((m.ValueSize() + 7) &^ 7)
	// A slice of fixed-size arrays, one per CPU, as the library decodes
	// per-CPU values.
	per := reflect.New(reflect.SliceOf(reflect.ArrayOf(int(m.ValueSize()), reflect.TypeFor[byte]())))
	if err := m.Lookup(key, per.Interface()); err != nil {
		return err
	}
	vals := per.Elem()
	for i := 0; i < vals.Len() && i < n; i++ {
		reflect.Copy(reflect.ValueOf(val[i*stride:i*stride+int(m.ValueSize())]), vals.Index(i))
	}
	return nil
}

func perCPU(m *ebpf.Map) bool {
	switch m.Type() {
	case ebpf.PerCPUHash, ebpf.PerCPUArray, ebpf.LRUCPUHash, ebpf.PerCPUCGroupStorage:
		return true
	}
	return false
}
