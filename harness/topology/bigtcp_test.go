package topology_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/servicepath/servicepath/datapath/netdev"
	"github.com/servicepath/servicepath/harness/topology"
)

// Spec.BigTCP leaves both ends of every pod device at netdev.BigTCPSize,
// for IPv6 and IPv4, as read back from the kernel. A limit the kernel
// refused or does not have (zero) skips, named; one it took and did not
// keep fails.
func TestBigTCPLimits(t *testing.T) {
	for _, k := range topology.Kinds {
		t.Run(string(k), func(t *testing.T) {
			topo := topology.NewForTest(t, topology.Spec{Name: "btcp", Kind: k, BigTCP: true, Pods: []topology.PodSpec{{Name: "a"}}})
			p := topo.Pod("a")
			type end struct {
				do  func(func() error) error
				dev string
			}
			ends := []end{{p.Do, p.IfName}}
			if p.HostIf != "" {
				ends = append(ends, end{p.Node.Do, p.HostIf})
			}
			refused := fmt.Sprint(p.BigTCP)
			for _, b := range p.BigTCP {
				refused += fmt.Sprint(b.Refused)
			}
			var missing []string
			for _, e := range ends {
				var a *netlink.LinkAttrs
				if err := e.do(func() error {
					l, err := netlink.LinkByName(e.dev)
					if err == nil {
						a = l.Attrs()
					}
					return err
				}); err != nil {
					t.Fatalf("%s: %v", e.dev, err)
				}
				for name, v := range map[string]uint32{
					"gso_max_size": a.GSOMaxSize, "gro_max_size": a.GROMaxSize,
					"gso_ipv4_max_size": a.GSOIPv4MaxSize, "gro_ipv4_max_size": a.GROIPv4MaxSize,
				} {
					switch {
					case v >= netdev.BigTCPSize:
					case v == 0 || strings.Contains(refused, name+" "):
						missing = append(missing, fmt.Sprintf("%s %s=%d", e.dev, name, v))
					default:
						t.Errorf("%s %s=%d, want %d", e.dev, name, v, netdev.BigTCPSize)
					}
				}
			}
			if len(missing) > 0 && !t.Failed() {
				t.Skipf("the kernel refused or lacks BIG TCP limits: %v (%s)", missing, refused)
			}
		})
	}
}
