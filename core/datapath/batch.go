package datapath

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// BatchReader is what ReadAll needs of a map.
type BatchReader interface {
	BatchLookup(cursor *ebpf.MapBatchCursor, keysOut, valuesOut any, opts *ebpf.BatchOptions) (int, error)
	Iterate() *ebpf.MapIterator
}

// readChunk is how many entries one batch lookup returns at most.
const readChunk = 4096

// ReadAll calls fn with every entry of a hash map, read a few thousand
// per system call (an agent restoring a million entries one call per
// entry spends seconds on it). A map the batch calls cannot read is
// iterated one entry at a time instead; fn then sees entries already
// passed to it again, and must not mind.
func ReadAll[K, V any](m BatchReader, fn func(k *K, v *V)) error {
	keys := make([]K, readChunk)
	vals := make([]V, readChunk)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		for i := range n {
			fn(&keys[i], &vals[i])
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return iterateAll(m, fn)
		}
	}
}

func iterateAll[K, V any](m BatchReader, fn func(k *K, v *V)) error {
	var (
		k K
		v V
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		fn(&k, &v)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("reading map: %w", err)
	}
	return nil
}
