package datapath

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// Go mirrors of the shared BPF structs, generated from
// bpf/include/weir/maps.h; these names are the package's public face.
type (
	// Ctx is the per-packet context stages share.
	Ctx = coreWeirCtx
	// ServiceKey keys weir_services: a frontend and a backend slot.
	ServiceKey = coreWeirSvcKey
	// ServiceValue is a master entry (slot 0) or a backend slot.
	ServiceValue = coreWeirSvcVal
	// Backend is a weir_backends value.
	Backend = coreWeirBackend
	// RevNAT is a weir_revnat value.
	RevNAT = coreWeirRevnatEntry
	// CTKey keys weir_ct.
	CTKey = coreWeirCtKey
	// CTEntry is a weir_ct value.
	CTEntry = coreWeirCtEntry
	// EndpointKey keys weir_endpoints.
	EndpointKey = coreWeirEndpointKey
	// Endpoint is a weir_endpoints value.
	Endpoint = coreWeirEndpoint
	// IPCacheKey keys weir_ipcache (an LPM trie).
	IPCacheKey = coreWeirIpcacheKey
	// IPCacheEntry is a weir_ipcache value.
	IPCacheEntry = coreWeirIpcacheEntry
	// AffinityKey keys weir_affinity.
	AffinityKey = coreWeirAffinityKey
	// Affinity is a weir_affinity value.
	Affinity = coreWeirAffinityEntry
	// BackendAddrKey keys weir_backend_addrs.
	BackendAddrKey = coreWeirBackendAddrKey
	// FragKey keys weir_frags.
	FragKey = coreWeirFragKey
	// FragEntry is a weir_frags value.
	FragEntry = coreWeirFragEntry
	// Metric is one per-CPU counter of weir_metrics.
	Metric = coreWeirMetric
	// Event is one weir_events record.
	Event = coreWeirEvent
	// SockRev is a socket's weir_sock_rev storage: the frontends socket
	// LB translated on it.
	SockRev = coreWeirSockRevState
	// SockRevEntry is one frontend of a SockRev.
	SockRevEntry = coreWeirSockRevEntry
	// SockAffinityKey keys weir_sock_affinity.
	SockAffinityKey = coreWeirSockAffinityKey
	// SockTermKey keys weir_sock_term: a backend that left a frontend.
	SockTermKey = coreWeirSockTermKey
	// NATKey keys weir_nat.
	NATKey = coreWeirNatKey
	// NATEntry is a weir_nat value.
	NATEntry = coreWeirNatEntry
	// NATCounters is one CPU's weir_nat_stats value.
	NATCounters = coreWeirNatCounters
	// SrcRangeKey keys weir_src_ranges (an LPM trie).
	SrcRangeKey = coreWeirSrcRangeKey
)

// NAT entry directions stored in NATKey.Dir.
const (
	NATOut = uint8(coreWeirNatDirWEIR_NAT_OUT)
	NATIn  = uint8(coreWeirNatDirWEIR_NAT_IN)
)

// NAT entry owners stored in NATEntry.Owner.
const (
	NATNodePort   = uint8(coreWeirNatOwnerWEIR_NAT_NODEPORT)
	NATMasquerade = uint8(coreWeirNatOwnerWEIR_NAT_MASQUERADE)
)

// Frontend types stored in ServiceValue.Type.
const (
	SvcClusterIP    = uint8(coreWeirSvcTypeWEIR_SVC_CLUSTER_IP)
	SvcNodePort     = uint8(coreWeirSvcTypeWEIR_SVC_NODE_PORT)
	SvcLoadBalancer = uint8(coreWeirSvcTypeWEIR_SVC_LOAD_BALANCER)
	SvcExternalIP   = uint8(coreWeirSvcTypeWEIR_SVC_EXTERNAL_IP)
)

// Frontend scopes stored in ServiceKey.Scope.
const (
	ScopeExternal = uint8(coreWeirScopeWEIR_SCOPE_EXTERNAL)
	ScopeInternal = uint8(coreWeirScopeWEIR_SCOPE_INTERNAL)
)

// ServiceValue.Flags2 bits (WEIR_SVC_F2_* in maps.h).
const (
	SvcFlagAffinity  = 0x01
	SvcFlagTwoScopes = 0x02
	// SvcFlagSourceRanges: clients from outside only from weir_src_ranges.
	SvcFlagSourceRanges = 0x04
	// SvcFlagModeSNAT and SvcFlagModeDSR: the service's own forwarding
	// mode for this frontend, over the node pool's.
	SvcFlagModeSNAT = 0x08
	SvcFlagModeDSR  = 0x10
	// SvcFlagReject: the frontend has no usable endpoint at all; new
	// flows are rejected (kube-proxy's REJECT), not dropped.
	SvcFlagReject = 0x20
)

// Why a master entry's slots hold their backends, stored in the master's
// ServiceValue.BackendId (enum weir_svc_selection; model.Selection has the
// same numbers).
const (
	SelectAll   = uint32(coreWeirSvcSelectionWEIR_SVC_SELECT_ALL)
	SelectLocal = uint32(coreWeirSvcSelectionWEIR_SVC_SELECT_LOCAL)
	SelectZone  = uint32(coreWeirSvcSelectionWEIR_SVC_SELECT_ZONE)
	SelectNode  = uint32(coreWeirSvcSelectionWEIR_SVC_SELECT_NODE)
)

// Backend states stored in Backend.State.
const (
	BackendActive      = uint8(coreWeirBackendStateWEIR_BACKEND_ACTIVE)
	BackendTerminating = uint8(coreWeirBackendStateWEIR_BACKEND_TERMINATING)
	BackendQuarantined = uint8(coreWeirBackendStateWEIR_BACKEND_QUARANTINED)
)

// Conntrack entry directions stored in CTEntry.Dir.
const (
	CTOrig  = uint8(coreWeirCtDirWEIR_CT_ORIG)
	CTReply = uint8(coreWeirCtDirWEIR_CT_REPLY)
)

// CTEntry.Flags bits (WEIR_CT_F_* in maps.h).
const (
	CTFlagSeenReply   = 0x0001
	CTFlagEstablished = 0x0002
	CTFlagFINOrig     = 0x0004
	CTFlagFINReply    = 0x0008
	CTFlagRST         = 0x0010
	CTFlagRSTReply    = 0x0020
	CTFlagRemapped    = 0x0040
	CTFlagNodePort    = 0x0080
	CTFlagSNAT        = 0x0100
	CTFlagHairpin     = 0x0200
	CTFlagDSR         = 0x0400
)

// IPCacheEntry.Flags bits (WEIR_IPCACHE_* in maps.h).
const (
	IPCacheLocalPod  = 0x01
	IPCacheRemotePod = 0x02
	IPCacheNode      = 0x04
	IPCacheEncap     = 0x08
)

// NumReasons is the stride of weir_metrics per hook (WEIR_REASON_MAX).
const NumReasons = uint32(coreWeirReasonWEIR_REASON_MAX)

// Addresses and ports are stored in network byte order; on the
// little-endian hosts this build supports, a map field holding a be32 reads
// as the byte-swapped host integer. These helpers convert at the edge.

// AddrToBE returns the map representation of an IPv4 address.
func AddrToBE(a netip.Addr) uint32 {
	b := a.As4()
	return binary.LittleEndian.Uint32(b[:])
}

// AddrFromBE is the inverse of AddrToBE.
func AddrFromBE(v uint32) netip.Addr {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

// PortToBE returns the map representation of a port.
func PortToBE(p uint16) uint16 { return p<<8 | p>>8 }

// PortFromBE is the inverse of PortToBE.
func PortFromBE(v uint16) uint16 { return v<<8 | v>>8 }

// ProtoName names an IP protocol number for tables.
func ProtoName(p uint8) string {
	switch p {
	case 6:
		return "TCP"
	case 17:
		return "UDP"
	case 1:
		return "ICMP"
	case 132:
		return "SCTP"
	}
	return fmt.Sprintf("proto-%d", p)
}
