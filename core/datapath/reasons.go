package datapath

import "fmt"

// Reason is why the datapath dropped a packet (0: it passed).
type Reason uint8

// Reasons, numbered as enum weir_reason in bpf/include/weir/maps.h.
const (
	ReasonPass            = Reason(coreWeirReasonWEIR_REASON_PASS)
	DropEthTruncated      = Reason(coreWeirReasonWEIR_DROP_ETH_TRUNCATED)
	DropIPTruncated       = Reason(coreWeirReasonWEIR_DROP_IP_TRUNCATED)
	DropIPBadHeader       = Reason(coreWeirReasonWEIR_DROP_IP_BAD_HEADER)
	DropIPBadLength       = Reason(coreWeirReasonWEIR_DROP_IP_BAD_LENGTH)
	DropL4Truncated       = Reason(coreWeirReasonWEIR_DROP_L4TRUNCATED)
	DropTCPBadOffset      = Reason(coreWeirReasonWEIR_DROP_TCP_BAD_OFFSET)
	DropARPMalformed      = Reason(coreWeirReasonWEIR_DROP_ARP_MALFORMED)
	DropUnsupportedL3     = Reason(coreWeirReasonWEIR_DROP_UNSUPPORTED_L3)
	DropNoBackend         = Reason(coreWeirReasonWEIR_DROP_NO_BACKEND)
	DropFragmentToService = Reason(coreWeirReasonWEIR_DROP_FRAGMENT_TO_SERVICE)
	DropChecksumRewrite   = Reason(coreWeirReasonWEIR_DROP_CSUM_REWRITE)
	DropTTLExceeded       = Reason(coreWeirReasonWEIR_DROP_TTL_EXCEEDED)
	DropScratch           = Reason(coreWeirReasonWEIR_DROP_SCRATCH)
	DropRedirect          = Reason(coreWeirReasonWEIR_DROP_REDIRECT)
	DropTunnelMalformed   = Reason(coreWeirReasonWEIR_DROP_TUNNEL_MALFORMED)
	DropEncap             = Reason(coreWeirReasonWEIR_DROP_ENCAP)
	DropDecap             = Reason(coreWeirReasonWEIR_DROP_DECAP)
	DropFragNeeded        = Reason(coreWeirReasonWEIR_DROP_FRAG_NEEDED)
	DropCTCreate          = Reason(coreWeirReasonWEIR_DROP_CT_CREATE)
	DropNATNoPort         = Reason(coreWeirReasonWEIR_DROP_NAT_NO_PORT)
	DropMissedTailCall    = Reason(coreWeirReasonWEIR_DROP_MISSED_TAIL_CALL)
	DropFragState         = Reason(coreWeirReasonWEIR_DROP_FRAG_STATE)
	DropNATExhausted      = Reason(coreWeirReasonWEIR_DROP_NAT_EXHAUSTED)
	DropNoRoute           = Reason(coreWeirReasonWEIR_DROP_NO_ROUTE)
	DropNATOrphan         = Reason(coreWeirReasonWEIR_DROP_NAT_ORPHAN)
	DropSourceRange       = Reason(coreWeirReasonWEIR_DROP_SOURCE_RANGE)
	DropDSR               = Reason(coreWeirReasonWEIR_DROP_DSR)
	RejectNoEndpoints     = Reason(coreWeirReasonWEIR_REJECT_NO_ENDPOINTS)
	DropPlugin            = Reason(coreWeirReasonWEIR_DROP_PLUGIN)
	DropPluginDown        = Reason(coreWeirReasonWEIR_DROP_PLUGIN_DOWN)
)

var reasonNames = map[Reason]string{
	ReasonPass:            "passed",
	DropEthTruncated:      "truncated Ethernet header",
	DropIPTruncated:       "truncated IPv4 header",
	DropIPBadHeader:       "invalid IPv4 header (version or IHL)",
	DropIPBadLength:       "IPv4 total length disagrees with the frame",
	DropL4Truncated:       "truncated L4 header",
	DropTCPBadOffset:      "invalid TCP data offset",
	DropARPMalformed:      "malformed ARP",
	DropUnsupportedL3:     "unsupported L3 protocol",
	DropNoBackend:         "service has no backend",
	DropFragmentToService: "IP fragment to a service (retired: earlier agents dropped them)",
	DropCTCreate:          "conntrack entry could not be created",
	DropNATNoPort:         "no free client port for a colliding tuple",
	DropMissedTailCall:    "missed tail call into a filled slot",
	DropFragState:         "fragment state could not be recorded",
	DropNATExhausted:      "source NAT port range exhausted",
	DropNoRoute:           "no route for a translated packet",
	DropNATOrphan:         "reply to a source NAT whose flow is gone",
	DropSourceRange:       "client outside the service's loadBalancerSourceRanges",
	DropDSR:               "the service address could not be added for DSR",
	RejectNoEndpoints:     "rejected (TCP reset, ICMP port unreachable): the service has no endpoint",
	DropPlugin:            "dropped by a datapath plugin (its own counters say why)",
	DropPluginDown:        "a plugin's process is down and its failurePolicy is closed",
	DropChecksumRewrite:   "header rewrite failed",
	DropTTLExceeded:       "TTL exceeded",
	DropScratch:           "per-CPU scratch unavailable",
	DropRedirect:          "redirect to endpoint failed",
	DropTunnelMalformed:   "malformed tunnel header (or another VNI)",
	DropEncap:             "encapsulation failed",
	DropDecap:             "decapsulation failed",
	DropFragNeeded:        "too big for the path (ICMP fragmentation needed sent when DF is set)",
}

func (r Reason) String() string {
	if n, ok := reasonNames[r]; ok {
		return n
	}
	return fmt.Sprintf("reason %d", uint8(r))
}
