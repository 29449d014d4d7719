package datapath

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// Layout 1 (agents before conntrack tracked flows as ORIG/REPLY pairs):
// reverse NAT ids were 16 bits, and conntrack kept a SERVICE entry (client
// to frontend, with the backend) and a REPLY entry (backend to client, with
// the reverse NAT id) per translated flow. Only what the converters read.

type svcValV1 struct {
	BackendID       uint32
	Count           uint16
	RevNat          uint16
	Type            uint8
	Flags2          uint8
	_               uint16
	AffinityTimeout uint32
}

type affinityKeyV1 struct {
	Client uint32
	RevNat uint16
	_      uint16
}

type ctKeyV1 struct {
	Saddr, Daddr uint32
	Sport, Dport uint16
	Proto        uint8
	Kind         uint8 // 1 service, 2 reply
	_            uint16
}

type ctEntryV1 struct {
	Packets, Bytes    uint64
	Created, Lifetime uint32
	BackendID         uint32
	RevNat            uint16
	Flags             uint16 // 1 SYN, 2 FIN, 4 RST, 8 ESTABLISHED
}

// convertEach puts every entry of old, converted by conv, counting those
// that could not be written.
func convertEach[K, V any](old *ebpf.Map, put func(k, v any) error, conv func(K, V) (any, any)) (int, error) {
	var (
		k K
		v V
	)
	lost := 0
	it := old.Iterate()
	for it.Next(&k, &v) {
		if err := put(conv(k, v)); err != nil {
			lost++
		}
	}
	return lost, it.Err()
}

func convertServicesV1(_ *migration, old *ebpf.Map, put func(k, v any) error) (int, error) {
	return convertEach(old, put, func(k ServiceKey, v svcValV1) (any, any) {
		return k, ServiceValue{BackendId: v.BackendID, RevNat: uint32(v.RevNat), Count: v.Count, Type: v.Type, Flags2: v.Flags2, AffinityTimeout: v.AffinityTimeout}
	})
}

func convertRevNATV1(_ *migration, old *ebpf.Map, put func(k, v any) error) (int, error) {
	return convertEach(old, put, func(k uint16, v RevNAT) (any, any) { return uint32(k), v })
}

func convertAffinityV1(_ *migration, old *ebpf.Map, put func(k, v any) error) (int, error) {
	return convertEach(old, put, func(k affinityKeyV1, v Affinity) (any, any) {
		return AffinityKey{Client: k.Client, RevNat: uint32(k.RevNat)}, v
	})
}

// convertCTV1 turns each translated flow's two entries into the ORIG and
// REPLY entries of layout 2, which say how packets leave: the SERVICE
// entry gets its backend's address from the backends map, the REPLY entry
// its frontend's from the reverse NAT map (both of the old agent).
func convertCTV1(m *migration, old *ebpf.Map, put func(k, v any) error) (int, error) {
	backends, revnat := m.old[MapBackends], m.old[MapRevNAT]
	if backends == nil || revnat == nil {
		return 0, errors.New("the backends or reverse NAT map of layout 1 is missing")
	}
	var (
		k ctKeyV1
		v ctEntryV1
	)
	lost := 0
	it := old.Iterate()
	for it.Next(&k, &v) {
		nk := CTKey{Saddr: k.Saddr, Daddr: k.Daddr, Sport: k.Sport, Dport: k.Dport, Proto: k.Proto}
		e := CTEntry{Packets: v.Packets, Bytes: v.Bytes, Created: v.Created, Lifetime: v.Lifetime,
			BackendId: v.BackendID, RevNat: uint32(v.RevNat), Flags: ctFlagsV1(v.Flags)}
		switch k.Kind {
		case 1:
			var be Backend
			if err := backends.Lookup(v.BackendID, &be); err != nil {
				lost++
				continue
			}
			e.Dir = CTOrig
			e.NatSaddr, e.NatSport = k.Saddr, k.Sport
			e.NatDaddr, e.NatDport = be.Addr, be.Port
		case 2:
			var rn RevNAT
			if err := revnat.Lookup(v.RevNat, &rn); err != nil {
				lost++
				continue
			}
			e.Dir = CTReply
			e.NatSaddr, e.NatSport = rn.Addr, rn.Port
			e.NatDaddr, e.NatDport = k.Daddr, k.Dport
		default:
			lost++
			continue
		}
		if err := put(nk, e); err != nil {
			lost++
		}
	}
	if err := it.Err(); err != nil {
		return lost, fmt.Errorf("reading conntrack of layout 1: %w", err)
	}
	return lost, nil
}

func ctFlagsV1(f uint16) uint16 {
	var out uint16
	if f&8 != 0 {
		out |= CTFlagSeenReply | CTFlagEstablished
	}
	if f&2 != 0 {
		out |= CTFlagFINOrig // which side closed is unknown: half-closed
	}
	if f&4 != 0 {
		out |= CTFlagRST
	}
	return out
}
