// Package ct reads and garbage-collects the datapath's connection
// tracking table. Entries carry an expiry the datapath refreshes on every
// packet; LRU eviction only happens under pressure, so expired entries are
// removed here.
package ct

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/servicepath/servicepath/datapath/maps"
)

// Now is the datapath's clock (bpf_ktime_get_ns is CLOCK_MONOTONIC).
func Now() (uint64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, err
	}
	return uint64(ts.Nano()), nil
}

// Entry is one CT entry in readable form.
type Entry struct {
	// Zone is the zone the entry is in (DumpZones; Dump leaves it empty).
	Zone       string         `json:"zone,omitempty"`
	Service    bool           `json:"service"`
	Protocol   uint8          `json:"protocol"`
	Source     netip.AddrPort `json:"source"`
	Dest       netip.AddrPort `json:"destination"`
	NAT        netip.AddrPort `json:"nat"`
	BackendID  uint32         `json:"backendID"`
	State      []string       `json:"state"`
	ExpiresIn  time.Duration  `json:"expiresIn"`
	FwdPackets uint64         `json:"fwdPackets"`
	FwdBytes   uint64         `json:"fwdBytes"`
	RevPackets uint64         `json:"revPackets"`
	RevBytes   uint64         `json:"revBytes"`
}

// StateNames spells out the CT_S_* bits.
func StateNames(s uint16) []string {
	var out []string
	for _, b := range []struct {
		bit  uint16
		name string
	}{
		{maps.CTEstablished, "established"},
		{maps.CTReplied, "replied"},
		{maps.CTFwdFin, "fwd-fin"},
		{maps.CTRevFin, "rev-fin"},
		{maps.CTNSSNAT, "ns-snat"},
		{maps.CTNSDSR, "ns-dsr"},
		{maps.CTNSDSRIPIP, "ns-dsr-ipip"},
		{maps.CTNSLearned, "ns-learned"},
		{maps.CTRst, "rst"},
	} {
		if s&b.bit != 0 {
			out = append(out, b.name)
		}
	}
	return out
}

func readable(k maps.CTKey, v maps.CTEntry, now uint64) Entry {
	return Entry{
		Service:    k.Flags&maps.CTFlagService != 0,
		Protocol:   k.Proto,
		Source:     netip.AddrPortFrom(k.SAddr.Netip(k.Family), k.SPort.Uint16()),
		Dest:       netip.AddrPortFrom(k.DAddr.Netip(k.Family), k.DPort.Uint16()),
		NAT:        netip.AddrPortFrom(v.NATAddr.Netip(k.Family), v.NATPort.Uint16()),
		BackendID:  v.BackendID,
		State:      StateNames(v.State),
		ExpiresIn:  time.Duration(int64(v.Expires) - int64(now)),
		FwdPackets: v.FwdPackets,
		FwdBytes:   v.FwdBytes,
		RevPackets: v.RevPackets,
		RevBytes:   v.RevBytes,
	}
}

// Dump returns every entry.
func Dump(m *ebpf.Map) ([]Entry, error) {
	now, err := Now()
	if err != nil {
		return nil, err
	}
	var out []Entry
	var k maps.CTKey
	var v maps.CTEntry
	it := m.Iterate()
	for it.Next(&k, &v) {
		out = append(out, readable(k, v, now))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate conntrack: %w", err)
	}
	return out, nil
}

// pairKey is the other entry of a load-balanced flow: a service entry's
// flow entry (client -> backend) or a flow entry's service entry
// (client -> VIP).
func pairKey(k maps.CTKey, v maps.CTEntry) maps.CTKey {
	p := k
	p.DAddr = v.NATAddr
	p.DPort = v.NATPort
	p.Flags ^= maps.CTFlagService
	return p
}
