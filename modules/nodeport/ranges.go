package nodeport

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/weirnet/weir/core/datapath"
	"github.com/weirnet/weir/core/model"
)

// srcFront is a load-balancer frontend restricted by source ranges.
type srcFront struct {
	addr  netip.AddrPort
	proto model.Proto
}

func (f srcFront) key() datapath.SrcFrontendKey {
	return datapath.SrcFrontendKey{Addr: datapath.AddrToBE(f.addr.Addr()), Port: datapath.PortToBE(f.addr.Port()), Proto: uint8(f.proto)}
}

func (f srcFront) rangeKey(p netip.Prefix) datapath.SrcRangeKey {
	k := f.key()
	return datapath.SrcRangeKey{Prefixlen: 64 + uint32(p.Bits()), Faddr: k.Addr, Fport: k.Port, Proto: k.Proto, Client: datapath.AddrToBE(p.Addr())}
}

// sourceRanges keeps weir_src_frontends and weir_src_ranges as the
// services' loadBalancerSourceRanges say, make-before-break: a frontend's
// new ranges are written before it is marked restricted, and it is
// unmarked before its ranges go, so a client in a range is never refused
// by a half-written change.
type sourceRanges struct {
	maps func() (fronts, ranges *ebpf.Map, err error)

	// byService are the restricted frontends each service wants.
	byService map[model.ServiceName]map[srcFront][]netip.Prefix
	// applied is what the maps hold; nil until read.
	applied map[srcFront]map[netip.Prefix]bool
}

func newSourceRanges(dp *datapath.Datapath) *sourceRanges {
	return &sourceRanges{
		byService: map[model.ServiceName]map[srcFront][]netip.Prefix{},
		maps: func() (*ebpf.Map, *ebpf.Map, error) {
			f, err := dp.Map(datapath.MapSrcFrontends)
			if err != nil {
				return nil, nil, err
			}
			r, err := dp.Map(datapath.MapSrcRanges)
			return f, r, err
		},
	}
}

// restricted are the frontends of svc its source ranges apply to: its
// load-balancer IPs (as kube-proxy applies them).
func restricted(svc *model.Service) map[srcFront][]netip.Prefix {
	if svc == nil || len(svc.SourceRanges) == 0 {
		return nil
	}
	out := map[srcFront][]netip.Prefix{}
	for _, f := range svc.Frontends {
		if f.Type == model.LoadBalancer {
			out[srcFront{f.Addr, f.Proto}] = svc.SourceRanges
		}
	}
	return out
}

// read loads what the maps hold (after a restart, the last agent's).
func (s *sourceRanges) read(fronts, ranges *ebpf.Map) error {
	s.applied = map[srcFront]map[netip.Prefix]bool{}
	var (
		fk datapath.SrcFrontendKey
		n  uint32
	)
	it := fronts.Iterate()
	for it.Next(&fk, &n) {
		f := srcFront{netip.AddrPortFrom(datapath.AddrFromBE(fk.Addr), datapath.PortFromBE(fk.Port)), model.Proto(fk.Proto)}
		if s.applied[f] == nil {
			s.applied[f] = map[netip.Prefix]bool{}
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("reading %s: %w", datapath.MapSrcFrontends, err)
	}
	var (
		rk datapath.SrcRangeKey
		v  uint8
	)
	it = ranges.Iterate()
	for it.Next(&rk, &v) {
		f := srcFront{netip.AddrPortFrom(datapath.AddrFromBE(rk.Faddr), datapath.PortFromBE(rk.Fport)), model.Proto(rk.Proto)}
		p := netip.PrefixFrom(datapath.AddrFromBE(rk.Client), int(rk.Prefixlen)-64)
		if s.applied[f] == nil {
			// Ranges of a frontend not marked restricted (a write cut
			// short): they go with the first apply.
			s.applied[f] = map[netip.Prefix]bool{}
		}
		s.applied[f][p] = true
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("reading %s: %w", datapath.MapSrcRanges, err)
	}
	return nil
}

// apply follows a change of services.
func (s *sourceRanges) apply(d model.Delta) error {
	fronts, ranges, err := s.maps()
	if err != nil {
		return err
	}
	if s.applied == nil || d.Full {
		if err := s.read(fronts, ranges); err != nil {
			return err
		}
	}
	if d.Full {
		clear(s.byService)
	}
	for name, svc := range d.Services {
		if r := restricted(svc); r != nil {
			s.byService[name] = r
		} else {
			delete(s.byService, name)
		}
	}
	desired := map[srcFront][]netip.Prefix{}
	for _, fs := range s.byService {
		for f, ps := range fs {
			desired[f] = ps
		}
	}
	var errs []error
	for f, want := range desired {
		have := s.applied[f]
		if have == nil {
			have = map[netip.Prefix]bool{}
		}
		for _, p := range want {
			if !have[p] {
				if err := ranges.Put(f.rangeKey(p), uint8(1)); err != nil {
					errs = append(errs, fmt.Errorf("source range %s of %s: %w", p, f.addr, err))
					continue
				}
				have[p] = true
			}
		}
		// Marked restricted only once every range is in.
		if len(errs) == 0 {
			if err := fronts.Put(f.key(), uint32(len(want))); err != nil {
				errs = append(errs, fmt.Errorf("restricting %s: %w", f.addr, err))
			}
		}
		s.applied[f] = have
	}
	for f, have := range s.applied {
		want, keep := desired[f]
		if !keep {
			if err := fronts.Delete(f.key()); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, fmt.Errorf("unrestricting %s: %w", f.addr, err))
				continue
			}
		}
		wanted := map[netip.Prefix]bool{}
		for _, p := range want {
			wanted[p] = true
		}
		for p := range have {
			if wanted[p] {
				continue
			}
			if err := ranges.Delete(f.rangeKey(p)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, fmt.Errorf("source range %s of %s: %w", p, f.addr, err))
				continue
			}
			delete(have, p)
		}
		if !keep && len(have) == 0 {
			delete(s.applied, f)
		}
	}
	return errors.Join(errs...)
}
