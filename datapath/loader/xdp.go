package loader

import (
	"encoding/binary"
	"fmt"
	"reflect"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
)

// XDPMinKernel is the release from which the XDP node-device program
// loads (bpf_xdp_load_bytes, bpf_xdp_store_bytes); tests apply the matrix
// policy with it.
const XDPMinKernel = "5.18"

// ProbeXDP reports whether the kernel can run the XDP node-device program
// (bpf/bpf_xdp.c): XDP programs with every helper it calls. An error
// wrapping ebpf.ErrNotSupported names the first one missing.
func ProbeXDP() error {
	for _, h := range []struct {
		name string
		fn   asm.BuiltinFunc
	}{
		{"bpf_xdp_load_bytes", asm.FnXdpLoadBytes},
		{"bpf_xdp_store_bytes", asm.FnXdpStoreBytes},
		{"bpf_xdp_adjust_head", asm.FnXdpAdjustHead},
		{"bpf_xdp_adjust_meta", asm.FnXdpAdjustMeta},
		{"bpf_fib_lookup", asm.FnFibLookup},
		{"bpf_csum_diff", asm.FnCsumDiff},
		{"bpf_redirect", asm.FnRedirect},
		{"bpf_check_mtu", asm.FnCheckMtu},
	} {
		if err := features.HaveProgramHelper(ebpf.XDP, h.fn); err != nil {
			return fmt.Errorf("the XDP node-device program needs %s in XDP programs: %w", h.name, err)
		}
	}
	return nil
}

// loadXDP loads the XDP object with every map replaced by the node-device
// object's of the same name (with conntrack zones, sp_ct is the
// north-south zone there), so the two programs share all state.
func (d *Datapath) loadXDP(spec, host *ebpf.CollectionSpec, opts ebpf.CollectionOptions) error {
	hostMaps := objectMaps(&d.host.HostMaps)
	opts.MapReplacements = map[string]*ebpf.Map{}
	for name, ms := range spec.Maps {
		if name[0] == '.' {
			continue // the object's own .rodata, .data, .bss
		}
		m, ok := hostMaps[name]
		if !ok {
			return fmt.Errorf("XDP object: map %s is not the node-device object's", name)
		}
		// A replacement must match its spec: take the host's, as sized.
		*ms = *host.Maps[name].Copy()
		opts.MapReplacements[name] = m
	}
	return spec.LoadAndAssign(&d.xdp, &opts)
}

// objectMaps are the maps of a bpf2go maps struct by their ELF names.
func objectMaps(v any) map[string]*ebpf.Map {
	out := map[string]*ebpf.Map{}
	rv := reflect.ValueOf(v).Elem()
	for i := range rv.NumField() {
		if m, ok := rv.Field(i).Interface().(*ebpf.Map); ok && m != nil {
			out[rv.Type().Field(i).Tag.Get("ebpf")] = m
		}
	}
	return out
}

// What the XDP program leaves tc to do with a packet it translated but
// does not send itself (bpf/lib/nodeport.h: enum np_handover).
const (
	HandoverDeliver uint32 = 1 // into a local backend's pod
	HandoverRoute   uint32 = 2 // off the node, neighbour unresolved
	// HandoverTooBig: a DSR packet too big for its route, for tc to answer
	// with frag needed / packet too big; the MTU to announce goes above
	// the low 8 bits (HandoverTooBig | mtu<<8).
	HandoverTooBig uint32 = 3
)

// handoverMagic is NP_HANDOVER_MAGIC.
const handoverMagic = 0x5e9a0000

// HandoverMeta is the metadata the XDP program puts ahead of a packet it
// hands to tc with action, when loaded in the calling thread's netns: the
// word's tag names that netns (cfg_host_netns_cookie), so no other node's
// tc takes it for its own.
func HandoverMeta(action uint32) ([]byte, error) {
	cookie, err := netnsCookie()
	if err != nil {
		return nil, err
	}
	b := binary.NativeEndian.AppendUint32(nil, handoverMagic^uint32(cookie))
	return binary.NativeEndian.AppendUint32(b, action), nil
}
