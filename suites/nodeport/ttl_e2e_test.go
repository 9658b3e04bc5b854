package nodeport

import (
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/servicepath/servicepath/datapath/service"
	"github.com/servicepath/servicepath/harness/cluster"
	"github.com/servicepath/servicepath/harness/traffic"
)

// A traceroute from the external client through a NodePort: every node
// that forwards by BPF counts as the hop the kernel's forwarding would
// make it, and answers as ip_forward does where the TTL / hop limit runs
// out, with time exceeded about the client's datagram to the service.
func TestNorthSouthTraceroute(t *testing.T) {
	exerciseTraceroute(t, cluster.NewNorthSouth(t, nil), NodePort+400)
}

// exerciseTraceroute traces NodePorts from after port on, on ns.
func exerciseTraceroute(t *testing.T, ns *cluster.NorthSouth, port uint16) {
	// Every hop, and every backend refusing, answers the one client
	// address faster than the kernel's one error a second.
	require.NoError(t, traffic.UnlimitICMP(ns.Topo.External), "the client's netns")
	for _, n := range ns.Nodes {
		require.NoError(t, traffic.UnlimitICMP(n), "%s's netns", n.Name)
		require.NoError(t, traffic.UnlimitICMP(ns.Topo.Pod(n.Backend)), "%s's netns", n.Backend)
	}
	for _, f := range e2eFamilies(ns) {
		cases := []struct {
			name    string
			backend string
			edit    func(*service.Service)
			// routers are the nodes before the backend's pod, by index.
			routers []int
		}{
			{"local-backend", "backend-0", nil, []int{0}},
			{"snat", "backend-1", nil, []int{0, 1}},
			{"dsr-option", "backend-1", dsr(service.Option), []int{0, 1}},
			{"dsr-ipip", "backend-1", dsr(service.IPIP), []int{0, 1}},
		}
		for _, c := range cases {
			t.Run(f.name+"/"+c.name, func(t *testing.T) {
				port++
				be := service.Backend{Addr: ns.Backend(c.backend, f.client).Addr, Port: closedPort}
				dst := programOne(t, ns, f, port, service.UDP, be, c.edit)
				before := ns.Counters(t, 0)
				hops, err := traffic.Traceroute(ns.Topo.External, dst, 5, timeout)
				require.NoError(t, err, "trace %s", dst)
				require.Len(t, hops, len(c.routers)+1, "hops to %s: %+v", dst, hops)
				for i, node := range c.routers {
					assert.True(t, hops[i].TimeExceeded(), "hop %d: time exceeded, not %+v", i+1, hops[i])
					assert.Equal(t, f.nodes[node], hops[i].Offender, "hop %d is node %d", i+1, node)
					assert.Equal(t, dst, hops[i].About, "hop %d's error is about the datagram to the service", i+1)
				}
				last := hops[len(hops)-1]
				assert.Equal(t, syscall.ECONNREFUSED, last.Errno, "the backend refused at the last hop: %+v", last)
				assert.Equal(t, dst.Addr(), last.Offender, "the refusal came from the service address")
				assert.Positive(t, grew(before, ns.Counters(t, 0), "ttl_exceeded"), "node 0 left the expiring probe to its stack")
			})
		}
	}
}
