package maps_test

import (
	"encoding/binary"
	"github.com/cilium/ebpf"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/cilium/ebpf/btf"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/loader"
	"github.com/servicepath/servicepath/datapath/maps"
)

// normalize makes C member names ("backend_id") and Go field names
// ("BackendID") comparable.
func normalize(s string) string {
	return strings.ToLower(strings.ReplaceAll(s, "_", ""))
}

// checkLayout asserts that the Go type goType has the size and, for
// structs, the member names, offsets and sizes of the BTF type typ.
func checkLayout(t *testing.T, what string, typ btf.Type, goType reflect.Type) {
	t.Helper()
	btfSize, err := btf.Sizeof(typ)
	require.NoError(t, err, "%s: BTF size", what)
	assert.Equal(t, btfSize, binary.Size(reflect.New(goType).Elem().Interface()),
		"%s: binary.Size of %s equals the C sizeof", what, goType)
	assert.Equal(t, uintptr(btfSize), goType.Size(),
		"%s: in-memory size of %s equals the C sizeof (no Go padding)", what, goType)

	st, ok := btf.UnderlyingType(typ).(*btf.Struct)
	if !ok {
		require.NotEqual(t, reflect.Struct, goType.Kind(), "%s: Go %s is a struct but C %s is not", what, goType, typ)
		return
	}
	require.Equal(t, reflect.Struct, goType.Kind(), "%s: C type is a struct, so must Go %s be", what, goType)
	require.Equal(t, len(st.Members), goType.NumField(), "%s: %s has as many fields as C struct %s has members", what, goType, st.Name)
	for i, m := range st.Members {
		f := goType.Field(i)
		assert.Zero(t, m.BitfieldSize, "%s: member %s is not a bitfield", what, m.Name)
		assert.Equal(t, normalize(m.Name), normalize(f.Name), "%s: field %d of %s mirrors C member %s", what, i, goType, m.Name)
		assert.Equal(t, uintptr(m.Offset.Bytes()), f.Offset, "%s: offset of %s.%s equals offsetof(%s, %s)", what, goType, f.Name, st.Name, m.Name)
		msize, err := btf.Sizeof(m.Type)
		require.NoError(t, err, "%s: BTF size of member %s", what, m.Name)
		assert.Equal(t, uintptr(msize), f.Type.Size(), "%s: size of %s.%s equals the C member %s (union v6addr counts as 16 bytes)", what, goType, f.Name, m.Name)
	}
}

// The Go mirrors in types.go must have exactly the C layout of the maps'
// keys and values, as the compiled object's BTF records it.
func TestGoTypesMirrorBTFLayout(t *testing.T) {
	all := map[string]*ebpf.MapSpec{}
	for _, load := range []func() (*ebpf.CollectionSpec, error){loader.LoadLxc, loader.LoadSock, loader.LoadSockDestroy, loader.LoadHost} {
		spec, err := load()
		require.NoError(t, err, "read the compiled BPF objects")
		for name, ms := range spec.Maps {
			all[name] = ms
		}
	}

	for _, c := range []struct {
		mapName      string
		key, value   any
		keyC, valueC string
	}{
		{maps.ServicesName, maps.ServiceKey{}, maps.ServiceValue{}, "lb_svc_key", "lb_svc_value"},
		{maps.BackendsName, uint32(0), maps.Backend{}, "", "lb_backend"},
		{maps.SvcMetaName, maps.ServiceKey{}, maps.ServiceMeta{}, "lb_svc_key", "lb_svc_meta"},
		{maps.CTName, maps.CTKey{}, maps.CTEntry{}, "ct_key", "ct_entry"},
		{maps.AffinityName, maps.AffinityKey{}, maps.AffinityValue{}, "lb_affinity_key", "lb_affinity_value"},
		{"sp_sock_destroy", maps.SockDestroyKey{}, uint8(0), "sock_destroy_key", ""},
		{maps.SockCtxName, int32(0), maps.SockCtx{}, "", "sock_ctx"},
		{maps.SockRevName, maps.SockRevNATKey{}, maps.SockRevNATValue{}, "sock_revnat_key", "sock_revnat_value"},
		{"sp_src_ranges", maps.SrcRangeKey{}, uint8(0), "src_range_key", ""},
		{maps.FrontendAddrName, maps.NodeAddrKey{}, uint8(0), "node_addr_key", ""},
		{maps.NATName, maps.CTKey{}, maps.NATEntry{}, "ct_key", "nat_entry"},
		{maps.NetdevsName, uint32(0), maps.NetdevInfo{}, "", "netdev_info"},
		{maps.EDTPodsName, uint32(0), maps.EDTPod{}, "", "edt_pod"},
		{maps.EDTRatesName, uint32(0), maps.EDTRate{}, "", "edt_rate"},
	} {
		t.Run(c.mapName, func(t *testing.T) {
			ms, ok := all[c.mapName]
			require.True(t, ok, "map %s is in the object", c.mapName)
			require.NotNil(t, ms.Key, "map %s has a BTF key type", c.mapName)
			require.NotNil(t, ms.Value, "map %s has a BTF value type", c.mapName)

			for _, side := range []struct {
				what  string
				typ   btf.Type
				goVal any
				cName string
				size  uint32
			}{
				{"key", ms.Key, c.key, c.keyC, ms.KeySize},
				{"value", ms.Value, c.value, c.valueC, ms.ValueSize},
			} {
				if side.cName != "" {
					st, ok := btf.UnderlyingType(side.typ).(*btf.Struct)
					require.True(t, ok, "%s %s is a struct", c.mapName, side.what)
					assert.Equal(t, side.cName, st.Name, "%s %s is struct %s", c.mapName, side.what, side.cName)
				}
				assert.Equal(t, int(side.size), binary.Size(side.goVal), "%s %s: Go size equals the map spec's size", c.mapName, side.what)
				checkLayout(t, c.mapName+" "+side.what, side.typ, reflect.TypeOf(side.goVal))
			}
		})
	}
}

func TestAddrRoundTrip(t *testing.T) {
	for _, c := range []struct {
		in     string
		fam    maps.Family
		bytes  []byte
		unmaps string
	}{
		{"198.18.0.10", maps.IPv4, []byte{198, 18, 0, 10}, "198.18.0.10"},
		{"fd00:5e::10", maps.IPv6, netip.MustParseAddr("fd00:5e::10").AsSlice(), "fd00:5e::10"},
		{"::ffff:198.18.0.10", maps.IPv4, []byte{198, 18, 0, 10}, "198.18.0.10"},
		{"::1", maps.IPv6, netip.IPv6Loopback().AsSlice(), "::1"},
	} {
		t.Run(c.in, func(t *testing.T) {
			a, fam := maps.AddrFrom(netip.MustParseAddr(c.in))
			assert.Equal(t, c.fam, fam, "family of %s", c.in)
			var want maps.Addr
			copy(want[:], c.bytes)
			assert.Equal(t, want, a, "%s is laid out as union v6addr (IPv4 in the first 4 bytes, rest zero)", c.in)
			assert.Equal(t, netip.MustParseAddr(c.unmaps), a.Netip(fam), "Netip gives back %s (IPv4-mapped comes back unmapped)", c.in)
		})
	}
}

func TestBE16(t *testing.T) {
	b := maps.NewBE16(0x1f90)
	assert.Equal(t, maps.BE16{0x1f, 0x90}, b, "NewBE16 stores network byte order")
	assert.Equal(t, uint16(0x1f90), b.Uint16(), "Uint16 reads network byte order back")
	for _, v := range []uint16{0, 1, 80, 0xff00, 0xffff} {
		assert.Equal(t, v, maps.NewBE16(v).Uint16(), "BE16 round trip of %d", v)
	}
}

func TestServiceMetaNames(t *testing.T) {
	m, err := maps.NewServiceMeta("default/kubernetes", "https")
	require.NoError(t, err, "names that fit are accepted")
	name, port := m.Names()
	assert.Equal(t, "default/kubernetes", name, "service name round trip")
	assert.Equal(t, "https", port, "port name round trip")

	_, err = maps.NewServiceMeta(strings.Repeat("n", 127), strings.Repeat("p", 63))
	assert.NoError(t, err, "the longest names with room for the NUL are accepted")
	_, err = maps.NewServiceMeta(strings.Repeat("n", 128), "")
	assert.Error(t, err, "a 128-byte service name leaves no room for the NUL and is refused")
	_, err = maps.NewServiceMeta("a/b", strings.Repeat("p", 64))
	assert.Error(t, err, "a 64-byte port name leaves no room for the NUL and is refused")
}
