package endpoints_test

import (
	"encoding/binary"
	"net/netip"
	"reflect"
	"testing"

	"github.com/cilium/ebpf/btf"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/endpoints"
	"github.com/servicepath/servicepath/datapath/loader"
)

// The Go mirrors have the C layout the object's BTF records.
func TestLayoutMatchesBTF(t *testing.T) {
	spec, err := loader.LoadLxc()
	require.NoError(t, err, "read the pod-device object")
	ms, ok := spec.Maps[endpoints.MapName]
	require.True(t, ok, "map %s is in the object", endpoints.MapName)
	for _, c := range []struct {
		typ btf.Type
		val any
	}{{ms.Key, endpoints.Key{}}, {ms.Value, endpoints.Info{}}} {
		size, err := btf.Sizeof(c.typ)
		require.NoError(t, err, "BTF size of %s", c.typ)
		assert.Equal(t, size, binary.Size(c.val), "%T has the size of C %s", c.val, c.typ)
		st, ok := btf.UnderlyingType(c.typ).(*btf.Struct)
		require.True(t, ok, "%s is a struct", c.typ)
		gt := reflect.TypeOf(c.val)
		require.Equal(t, len(st.Members), gt.NumField(), "%T has a field per C member", c.val)
		for i, m := range st.Members {
			assert.Equal(t, uintptr(m.Offset.Bytes()), gt.Field(i).Offset, "%T.%s sits at offsetof %s", c.val, gt.Field(i).Name, m.Name)
		}
	}
}

func TestKeyOf(t *testing.T) {
	k := endpoints.KeyOf(netip.MustParseAddr("198.18.0.10"))
	assert.Equal(t, uint8(4), k.Family, "IPv4 family")
	assert.Equal(t, [16]byte{198, 18, 0, 10}, k.Addr, "IPv4 address in the first four bytes, the rest zero")
	k = endpoints.KeyOf(netip.MustParseAddr("::ffff:198.18.0.10"))
	assert.Equal(t, uint8(4), k.Family, "a v4-mapped address is IPv4")
	k = endpoints.KeyOf(netip.MustParseAddr("fd00:5e::10"))
	assert.Equal(t, uint8(6), k.Family, "IPv6 family")
	assert.Equal(t, netip.MustParseAddr("fd00:5e::10").As16(), k.Addr, "IPv6 address as is")
}
