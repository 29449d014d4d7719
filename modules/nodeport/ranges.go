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

func (f srcFront) rangeKey(p netip.Prefix) datapath.SrcRangeKey {
	return datapath.SrcRangeKey{Prefixlen: 64 + uint32(p.Bits()), Faddr: datapath.AddrToBE(f.addr.Addr()),
		Fport: datapath.PortToBE(f.addr.Port()), Proto: uint8(f.proto), Client: datapath.AddrToBE(p.Addr())}
}

// sourceRanges keeps weir_src_ranges as the services' loadBalancerSourceRanges
// say. Whether a frontend is restricted is the service maps' flag
// (written by core's reconciler), so a frontend is closed, not open, until
// its ranges are written; here a frontend's new ranges go in before its
// old ones go, and the old ones stay while any new one could not be
// written, so a change never refuses a client both versions let in.
type sourceRanges struct {
	ranges func() (*ebpf.Map, error)

	// byService are the restricted frontends each service wants.
	byService map[model.ServiceName]map[srcFront][]netip.Prefix
	// applied is what the map holds; nil until read.
	applied map[srcFront]map[netip.Prefix]bool
}

func newSourceRanges(dp *datapath.Datapath) *sourceRanges {
	return &sourceRanges{
		byService: map[model.ServiceName]map[srcFront][]netip.Prefix{},
		ranges:    func() (*ebpf.Map, error) { return dp.Map(datapath.MapSrcRanges) },
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

// read loads what the map holds (after a restart, the last agent's).
func (s *sourceRanges) read(ranges *ebpf.Map) error {
	s.applied = map[srcFront]map[netip.Prefix]bool{}
	var (
		rk datapath.SrcRangeKey
		v  uint8
	)
	it := ranges.Iterate()
	for it.Next(&rk, &v) {
		f := srcFront{netip.AddrPortFrom(datapath.AddrFromBE(rk.Faddr), datapath.PortFromBE(rk.Fport)), model.Proto(rk.Proto)}
		if s.applied[f] == nil {
			s.applied[f] = map[netip.Prefix]bool{}
		}
		s.applied[f][netip.PrefixFrom(datapath.AddrFromBE(rk.Client), int(rk.Prefixlen)-64)] = true
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("reading %s: %w", datapath.MapSrcRanges, err)
	}
	return nil
}

// apply follows a change of services.
func (s *sourceRanges) apply(d model.Delta) error {
	ranges, err := s.ranges()
	if err != nil {
		return err
	}
	if s.applied == nil || d.Full {
		if err := s.read(ranges); err != nil {
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
	desired := map[srcFront]map[netip.Prefix]bool{}
	for _, fs := range s.byService {
		for f, ps := range fs {
			set := map[netip.Prefix]bool{}
			for _, p := range ps {
				set[p] = true
			}
			desired[f] = set
		}
	}
	var errs []error
	fronts := map[srcFront]bool{}
	for f := range desired {
		fronts[f] = true
	}
	for f := range s.applied {
		fronts[f] = true
	}
	for f := range fronts {
		want, have := desired[f], s.applied[f]
		if have == nil {
			have = map[netip.Prefix]bool{}
			s.applied[f] = have
		}
		added := true
		for p := range want {
			if have[p] {
				continue
			}
			if err := ranges.Put(f.rangeKey(p), uint8(1)); err != nil {
				errs = append(errs, fmt.Errorf("source range %s of %s: %w", p, f.addr, err))
				added = false
				continue
			}
			have[p] = true
		}
		// Old ranges go only once every new one is in.
		if !added {
			continue
		}
		for p := range have {
			if want[p] {
				continue
			}
			if err := ranges.Delete(f.rangeKey(p)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, fmt.Errorf("source range %s of %s: %w", p, f.addr, err))
				continue
			}
			delete(have, p)
		}
		if len(have) == 0 {
			delete(s.applied, f)
		}
	}
	return errors.Join(errs...)
}
