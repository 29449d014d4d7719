package lab

import (
	"context"
	"encoding/binary"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

const dsrServices = `services:
  - name: web
    clusterIP: 10.96.0.10
    type: LoadBalancer
    loadBalancerIPs: [` + lbIP + `]
    ports:
      - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
      - {name: udp, port: 53, targetPort: 5353, protocol: UDP, nodePort: 30053}
    backends: [{ip: 10.244.2.11, nodeName: n2}]
`

func upDSR(t *testing.T, mode string) *Lab {
	t.Helper()
	cfg := filepath.Join(t.TempDir(), "agent.yaml")
	config := "modules: [endpoints, lb, nativerouting, dsr-ipoption]\nsettings:\n  dsr-ipoption: {mode: " + mode + "}\n"
	if err := os.WriteFile(cfg, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	spec := threeNodes(cfg)
	spec.Externals = []ExternalSpec{{Name: "ext", Routes: map[string]string{lbIP + "/32": "n1"}}}
	l := up(t, spec)
	for _, n := range l.Nodes {
		if err := l.Apply(n.Name, []byte(dsrServices)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 10*time.Second, "services on every node", func() bool {
		for _, n := range l.Nodes {
			if len(serviceRows(t, n)) != 6 {
				return false
			}
		}
		return true
	})
	return l
}

// wireStats are what crossed one underlay port, as gopacket decodes it.
type wireStats struct {
	toExt       map[string]int // replies to the client, by "src:port proto"
	dsrOptions  []string       // DSR options seen, as "addr:port"
	framesToExt int
}

func wire(frames [][]byte, extIP string) wireStats {
	st := wireStats{toExt: map[string]int{}}
	for _, f := range frames {
		pkt := gopacket.NewPacket(f, layers.LayerTypeEthernet, gopacket.Default)
		ip, _ := pkt.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
		if ip == nil {
			continue
		}
		for _, o := range ip.Options {
			if o.OptionType == 0x9a && o.OptionLength == 8 && len(o.OptionData) == 6 {
				a := netip.AddrFrom4([4]byte(o.OptionData[2:6]))
				st.dsrOptions = append(st.dsrOptions, netip.AddrPortFrom(a, binary.BigEndian.Uint16(o.OptionData[0:2])).String())
			}
		}
		if ip.DstIP.String() != extIP {
			continue
		}
		st.framesToExt++
		if tcp, _ := pkt.Layer(layers.LayerTypeTCP).(*layers.TCP); tcp != nil {
			st.toExt[ip.SrcIP.String()+":"+strconv.Itoa(int(tcp.SrcPort))+" TCP"]++
		}
		if udp, _ := pkt.Layer(layers.LayerTypeUDP).(*layers.UDP); udp != nil {
			st.toExt[ip.SrcIP.String()+":"+strconv.Itoa(int(udp.SrcPort))+" UDP"]++
		}
	}
	return st
}

// Direct Server Return with the service address in an IPv4 option, native
// routing: the client reaches a backend on n2 through n1's NodePort and
// load-balancer IP; the backend sees the client's address; on the wire the
// SYN reaches n2 with the option naming the address the client called, and
// the replies leave n2 for the client from that address without passing n1.
func TestDSRIPOption(t *testing.T) {
	l := upDSR(t, "dsr")
	ctx := context.Background()
	ext := l.External("ext")
	n1 := l.Node("n1")
	c := HTTPClient(ext.NetnsPath(), 3*time.Second)
	for _, url := range []string{"http://" + n1.IP + ":30080/client", "http://" + lbIP + "/client"} {
		got, err := Get(ctx, c, url)
		if err != nil {
			t.Fatalf("ext -> %s: %v", url, err)
		}
		if who, seen, _ := strings.Cut(got, " "); who != "web-2" || !strings.HasPrefix(seen, ext.IP+":") {
			t.Errorf("ext -> %s: %q; want web-2 to see the client %s", url, got, ext.IP)
		}
	}
	var atN1, atN2 [][]byte
	atN1 = capture(t, l, "u-n1", func() {
		atN2 = capture(t, l, "u-n2", func() {
			for range 5 {
				if _, err := Get(ctx, c, "http://"+n1.IP+":30080/"); err != nil {
					t.Errorf("ext -> n1:30080: %v", err)
				}
				if got, err := UDPAsk(ctx, ext.NetnsPath(), n1.IP+":30053", "ping", 3*time.Second); err != nil || got != "web-2: ping" {
					t.Errorf("ext -> n1:30053/udp: %q %v", got, err)
				}
			}
		})
	})
	w1, w2 := wire(atN1, ext.IP), wire(atN2, ext.IP)
	if w1.framesToExt != 0 {
		t.Errorf("%d frames to the client crossed n1's port: %v; DSR replies must not pass the receiving node", w1.framesToExt, w1.toExt)
	}
	want := map[string]bool{n1.IP + ":30080 TCP": true, n1.IP + ":30053 UDP": true}
	for k := range want {
		if w2.toExt[k] == 0 {
			t.Errorf("no reply to the client left n2 from %s; replies seen: %v", k, w2.toExt)
		}
	}
	for k := range w2.toExt {
		if !want[k] {
			t.Errorf("a reply to the client left n2 from %s", k)
		}
	}
	// One option per TCP connection (its SYN) and one per datagram.
	opts := map[string]int{}
	for _, o := range w2.dsrOptions {
		opts[o]++
	}
	if opts[n1.IP+":30080"] != 5 || opts[n1.IP+":30053"] != 5 || len(opts) != 2 {
		t.Errorf("DSR options reaching n2: %v; want 5 naming %s:30080 (SYNs) and 5 naming %s:30053 (datagrams)", opts, n1.IP, n1.IP)
	}
}
